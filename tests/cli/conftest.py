"""Every CLI test runs in its own temporary folder: the CLI writes its outputs to the current
folder, so a test that forgets ``--out`` writes there, never into the repository. ``--arch
tiny_archs:NAME`` and pickles of ``tiny_archs`` classes resolve in-process, and errors are the
user's one line (no ``DECOUPLE_DEBUG`` from the caller's environment)."""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    monkeypatch.delenv("DECOUPLE_DEBUG", raising=False)

"""Every CLI test runs in its own temporary folder: the CLI writes its outputs to the current
folder, so a test that forgets ``--out`` writes there, never into the repository."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

"""The experiment notebooks run end to end on a small setting, so they never rot.

``method_sweep.py --quick`` (ResNet-20, one budget, few images) writes a results folder; each
notebook then runs against it and must draw its figures. Needs the shared CIFAR-10 assets.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "experiments").glob("*.ipynb"))


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory, cifar_assets):
    out = tmp_path_factory.mktemp("results")
    env = {**os.environ, "DECOUPLE_ASSETS": str(cifar_assets)}
    subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "method_sweep.py"), "--quick", "--out", str(out)],
        check=True, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    return out


def test_quick_sweep_writes_every_result(quick_results):
    for name in (
        "methods.csv",
        "layer_error.csv",
        "methods_vs_flops.png",
        "layer_error.png",
        "methods.md",
    ):
        assert (quick_results / name).stat().st_size > 0, name
    table = (quick_results / "methods.md").read_text()
    for method in ("nd dw-pw", "nd pw-dw", "cp", "tucker"):
        assert method in table


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_and_draws(path, quick_results, monkeypatch):
    monkeypatch.setenv("DECOUPLE_RESULTS", str(quick_results))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel draws inline
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure drawn"


def test_there_is_a_notebook():
    assert NOTEBOOKS

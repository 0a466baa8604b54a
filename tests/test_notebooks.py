"""The experiment notebooks run end to end, so they never rot; the sweep that feeds them runs too.

Every ``experiments/*.ipynb`` is executed, in seconds, and must draw at least one figure and print
what shows it used the right inputs:

* ``compare_methods`` and ``accuracy_vs_cost`` read the result files of the folder in
  ``DECOUPLE_RESULTS`` and compute nothing: they run on a copy of the committed ``results/`` (real
  results of the full sweeps, copied so that nothing is written there);
* ``spectra`` reads the pretrained ResNet-20 of the shared CIFAR-10 assets (``DECOUPLE_ASSETS``);
* ``quickstart`` decouples a torchvision ResNet-18 with random weights at 64×64 (needs
  torchvision; ONNX Runtime when installed).

``method_sweep.py --smoke`` runs its whole code path in seconds (ResNet-20, one budget, two
methods, a handful of images; needs the shared CIFAR-10 assets) and must write every file the
notebook reads, in the same format.
"""

from __future__ import annotations

import csv
import runpy
import shutil
import tempfile
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "experiments").glob("*.ipynb"))
SWEEP_FILES = ("methods.csv", "layer_error.csv", "methods_vs_flops.png", "layer_error.png",
               "methods.md")  # fmt: skip


@pytest.fixture(scope="module")
def committed_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("results") / "results"
    shutil.copytree(ROOT / "results", out)
    return out


# What each notebook must print: proof that it read the intended inputs.
PRINTS = {
    "compare_methods.ipynb": "runs on resnet20, resnet32",  # the committed runs, no other folder
    "accuracy_vs_cost.ipynb": "runs on resnet20, resnet32",
    "spectra.ipynb": "pretrained ResNet-20 (CIFAR-10): 19 k×k convs",
    "quickstart.ipynb": "reloaded vs in-memory",
}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_and_draws(path, committed_results, monkeypatch, request, tmp_path):
    monkeypatch.setenv("DECOUPLE_RESULTS", str(committed_results))
    scratch = tmp_path / "tmp"  # the kernel's temporary folder: it must be empty at the end
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # this process caches the folder
    # torch's compiler cache (made under TMPDIR when torchvision's import pulls in dynamo, on
    # some installs) is torch's, not the notebook's leftover: it goes elsewhere.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel draws inline
    if path.name == "spectra.ipynb":  # the real checkpoint (CI requires the assets)
        monkeypatch.setenv("DECOUPLE_ASSETS", str(request.getfixturevalue("cifar_assets")))
    if path.name == "quickstart.ipynb":
        pytest.importorskip("torchvision")
    nb = nbformat.read(path, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
        "commit notebooks with their outputs stripped"
    )
    # Generous limits: they only stop a hung kernel (a busy machine starts one slowly).
    client = NotebookClient(nb, timeout=600, startup_timeout=600,
                            resources={"metadata": {"path": str(path.parent)}})  # fmt: skip
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure drawn"
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert PRINTS.get(path.name, "") in text
    left = [p.name for p in scratch.iterdir() if not p.name.startswith(".")]  # the kernel's own
    assert left == [], "the notebook left files in its tmp folder"


def test_every_notebook_says_what_it_must_print():
    assert {p.name for p in NOTEBOOKS} == set(PRINTS)


def _columns(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f))


def test_smoke_sweep_writes_what_the_notebook_reads(cifar_assets, tmp_path, monkeypatch):
    out = tmp_path / "smoke"
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))  # its sibling accuracy_sweep
    argv = ["method_sweep.py", "--smoke", "--assets", str(cifar_assets), "--out", str(out)]
    monkeypatch.setattr("sys.argv", argv)
    results_before = {p.name: p.stat().st_mtime_ns for p in (ROOT / "results").iterdir()}
    runpy.run_path(str(ROOT / "experiments" / "method_sweep.py"), run_name="__main__")
    for name in SWEEP_FILES:
        assert (out / name).stat().st_size > 0, name
    for name in ("methods.csv", "layer_error.csv"):  # the notebook's input, as committed
        assert _columns(out / name) == _columns(ROOT / "results" / name), name
    with open(out / "methods.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} == {"", "nd dw-pw", "tucker"}
    assert sum(r["scheme"] == "budget" for r in rows) == 4  # 2 methods x data-free, calibrated
    table = (out / "methods.md").read_text()
    assert "method_sweep.py --smoke" in table and "| nd dw-pw | tucker |" in table
    assert {p.name: p.stat().st_mtime_ns for p in (ROOT / "results").iterdir()} == results_before


def test_quick_and_smoke_never_write_into_results(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    for flag in ("--quick", "--smoke"):
        monkeypatch.setattr("sys.argv", ["method_sweep.py", flag, "--out", str(ROOT / "results")])
        with pytest.raises(SystemExit) as e:
            runpy.run_path(str(ROOT / "experiments" / "method_sweep.py"), run_name="__main__")
        assert e.value.code == 2
        assert "never write into results/" in capsys.readouterr().err


def test_there_is_a_notebook():
    assert NOTEBOOKS

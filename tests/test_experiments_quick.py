"""A quick or partial run of an experiment script never overwrites the committed ``results/``.

Only the command line is parsed: no sweep runs, so each check takes well under a second (once
the script's imports are loaded).
"""

from __future__ import annotations

import importlib
import shutil
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = (ROOT / "results").resolve()
# script -> its small modes (each writes a handful of rows, not the full run)
SMALL_MODES = {
    "accuracy_sweep": ["--quick"],
    "latency_bench": ["--quick"],
    "method_sweep": ["--quick", "--smoke"],
    "pareto_sweep": ["--quick"],
    "cp_speed": ["--quick"],
    "coverage": ["--quick"],
    "mbv2_accuracy": ["--quick"],
    "default_path_cost": ["--quick"],
    "data_free": ["--quick"],
    "ort_memory": ["--quick"],
    "cost_model": ["--quick"],
    "aligned_ranks": ["--quick"],
    "runtimes": ["--quick"],
    "latency_table": ["--quick"],
    "cp_realizations": ["--quick"],
    "latency_targets": ["--quick"],
    "synthetic_sensitivity": ["--quick"],
}
CASES = [(s, f) for s, flags in SMALL_MODES.items() for f in flags]


@pytest.fixture
def script(monkeypatch, request):
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))  # their sibling imports
    pytest.importorskip("torchvision")  # latency_bench's models
    pytest.importorskip("onnxruntime")
    return importlib.import_module(request.param)


def test_every_small_mode_is_listed():
    """A new script with ``--quick`` (or ``--smoke``) must be added here."""
    marks = ('add_argument("--quick"', 'add_argument("--smoke"', "quick_or_full(__doc__")
    found = {
        p.stem
        for p in (ROOT / "experiments").glob("*.py")
        if p.stem != "experiment_io" and any(m in p.read_text() for m in marks)
    }
    assert found == set(SMALL_MODES)


@pytest.mark.parametrize(("script", "flag"), CASES, ids=[f"{s} {f}" for s, f in CASES],
                         indirect=["script"])  # fmt: skip
def test_small_mode_defaults_to_a_temp_folder(script, flag, capsys):
    args = script.parse_args([flag])
    out = Path(args.out).resolve()
    try:
        assert out != RESULTS and RESULTS not in out.parents
        assert out.is_dir() and not any(out.iterdir())  # new and empty
        assert str(out) in capsys.readouterr().out  # the run says where it writes
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.mark.parametrize(("script", "flag"), CASES, ids=[f"{s} {f}" for s, f in CASES],
                         indirect=["script"])  # fmt: skip
def test_small_mode_refuses_results(script, flag, capsys):
    with pytest.raises(SystemExit) as e:
        script.parse_args([flag, "--out", str(ROOT / "results")])
    assert e.value.code == 2
    assert "never write into results/" in capsys.readouterr().err


@pytest.mark.parametrize("script", list(SMALL_MODES), indirect=True)
def test_full_run_writes_results(script):
    assert Path(script.parse_args([]).out).resolve() == RESULTS


def test_progress_speaks_while_an_item_runs_when_piped(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    from experiment_io import progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    items = progress([0, 1], "demo", every=0.01)
    assert next(items) == 0
    time.sleep(0.2)  # the first item "runs": the heartbeat prints meanwhile
    assert list(items) == [1]
    assert "[demo] 0/2 done" in capsys.readouterr().err

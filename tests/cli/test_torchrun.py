"""``torchrun --nproc-per-node 2 -m decouple ...`` gives what one process gives (gloo, 2 CPU
processes): the same plan, the same weights, the same accuracy and agreement figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from decouple.cli.run import main

TESTS = Path(__file__).resolve().parent.parent


@pytest.fixture
def files(tmp_path):
    """A small_cnn state_dict, 100 labelled images and 100 calibration images (3×8×8): an odd
    number of batches of 16, so the two processes' shares differ in size."""
    import tiny_archs

    tiny_archs.write_small_cnn_files(tmp_path, 100)
    return tmp_path


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("WORLD_SIZE", None)
    env["TMPDIR"] = str(cwd)  # torchrun's torchelastic_* folders go with the test's, not /tmp
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "decouple", *args]  # fmt: skip
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "budget",
    [["--target-flops", "0.6"], ["--max-change", "25"]],
    ids=["target-flops", "max-change"],
)
def test_two_processes_give_what_one_gives(files, capsys, budget):
    common = ["net.pt", "--arch", "tiny_archs:small_cnn", "--input-shape", "3,8,8", *budget,
              "--calib", "calib.pt", "--data", "data.pt", "--batch-size", "16", "--quiet"]  # fmt: skip
    assert main([*common, "--out", str(files / "one" / "net.pt")]) == 0, capsys.readouterr().err
    two = _torchrun([*common, "--out", "two/net.pt"], files)
    assert two.returncode == 0, two.stderr[:6000]
    assert two.stdout.count("wrote model") == 1  # process 0 alone writes and reports

    one_report, two_report = (
        json.loads((files / d / "net.report.json").read_text()) for d in ("one", "two")
    )
    for key in ("allocation", "max_change"):  # the plan: every rank and method alike
        if key in one_report:
            got, want = two_report[key], one_report[key]
            losses = ("predicted_loss", "uniform_baseline")  # sums of floats: to rounding
            assert {k: v for k, v in got.items() if k not in losses} == {
                k: v for k, v in want.items() if k not in losses
            }
            u, v = got.get("uniform_baseline") or {}, want.get("uniform_baseline") or {}
            assert u.get("loss", 0) == pytest.approx(v.get("loss", 0), rel=1e-9)
            assert {**u, "loss": 0} == {**v, "loss": 0}
    assert two_report["accuracy"] == one_report["accuracy"]  # counts summed over both shares
    assert len(two_report["calibration"]) == len(one_report["calibration"]) > 0
    for a, b in zip(two_report["calibration"], one_report["calibration"], strict=True):
        assert a["mode"] == b["mode"]
        assert a["error_after"] == pytest.approx(b["error_after"], rel=1e-9)
    assert (files / "two" / "net.recipe.json").read_text() == (
        files / "one" / "net.recipe.json"
    ).read_text()
    one_w = torch.load(files / "one" / "net.pt", weights_only=True)
    two_w = torch.load(files / "two" / "net.pt", weights_only=True)
    assert one_w.keys() == two_w.keys()
    for k in one_w:
        torch.testing.assert_close(two_w[k], one_w[k], rtol=1e-5, atol=1e-6)

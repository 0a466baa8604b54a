"""The command line on 1×1 convs and linear layers: ``--method svd``, budgets that reach them,
``--skip`` naming a linear layer, ONNX export and reloading of the low-rank layers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import tiny_archs
import torch
from test_cli import assert_one_line_error, cli

from decouple import load_decoupled

HAVE_ORT = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))


def _report(out: Path) -> dict:
    return json.loads(out.with_name(out.stem + ".report.json").read_text())


def _saved(tmp_path: Path, build) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "m.pt"
    torch.save(build().state_dict(), path)
    return path


@pytest.mark.skipif(not HAVE_ORT, reason="onnx/onnxruntime not installed (pip install '.[export]')")
def test_method_svd_rewrites_1x1_convs_and_exports_and_reloads(tmp_path: Path, capsys) -> None:
    path, out = _saved(tmp_path, tiny_archs.pointwise_only), tmp_path / "o.pt"
    code, stdout, err = cli(capsys, path, "--arch", "tiny_archs:pointwise_only", "--input-shape",
                            "3,8,8", "--method", "svd", "--rank", "2", "--onnx", "--out", out)  # fmt: skip
    assert code == 0, err
    layers = {r["name"]: r for r in _report(out)["layers"]}
    assert layers["0"]["reason"].startswith("kept: stem")  # 3 input channels
    assert layers["2"]["method"] == "svd" and layers["2"]["rank_text"] == "2/4"
    assert "8->4 1x1" in stdout and "svd" in stdout
    assert _report(out)["onnx"]["ok"]
    model = load_decoupled(tiny_archs.pointwise_only(), out)
    assert type(model[2]).__name__ == "LowRankConv2d" and model[2].rank == 2


def test_a_budget_reaches_the_linear_head_and_skip_may_name_it(tmp_path: Path, capsys) -> None:
    path = _saved(tmp_path, tiny_archs.small_cnn)
    arch = ["--arch", "tiny_archs:small_cnn", "--input-shape", "3,8,8"]
    code, _, err = cli(capsys, path, *arch, "--target-flops", "0.6", "--method", "nd",
                       "--out", tmp_path / "a.pt")  # fmt: skip
    assert code == 0, err
    plan = _report(tmp_path / "a.pt")["allocation"]
    assert "7" in plan["ranks"]  # the linear head was priced (in svd) under a k×k method
    code, _, err = cli(capsys, path, *arch, "--target-flops", "0.6", "--method", "nd",
                       "--skip", "7", "--out", tmp_path / "b.pt")  # fmt: skip
    assert code == 0, err
    assert "7" not in _report(tmp_path / "b.pt")["allocation"]["ranks"]
    code, _, err = cli(
        capsys, path, *arch, "--rank", "2", "--skip", "8", "--out", tmp_path / "c.pt"
    )
    assert code == 2 and "matches no conv or linear layer" in err
    assert_one_line_error(err)

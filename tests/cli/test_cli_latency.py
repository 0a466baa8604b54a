"""The CLI's latency flags: ``--latency``, ``--target-latency``, ``--runtime``, ``--batch``,
``--device``, ``--threads``, and ``--onnx``.

Timings are shortened (a patched ``LatencyConfig``) so the suite stays fast; what is checked is
what the report says and that every conv is either decoupled or kept for a stated reason.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from test_cli import assert_one_line_error, cli

from decouple import load_decoupled
from decouple.cli import flags as cli_flags
from decouple.models import build_model
from decouple.runtime.latency import LatencyConfig

HAVE_ORT = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))


@pytest.fixture(autouse=True)
def _quick_timings(monkeypatch: pytest.MonkeyPatch) -> None:
    quick = functools.partial(
        LatencyConfig, min_run_time=0.02, layer_rounds=1, layer_min_run_time=0.002
    )
    monkeypatch.setattr(cli_flags, "LatencyConfig", quick)


def _report(out: Path) -> dict:
    return json.loads(out.with_name(out.stem + ".report.json").read_text())


def test_latency_reports_before_after_and_per_layer_times(tmp_path: Path, capsys) -> None:
    out = tmp_path / "d.pt"
    code, stdout, err = cli(capsys, "--demo", "--rank", "2", "--latency", "--batch", "4",
                            "--out", out)  # fmt: skip
    assert code == 0, err
    report = _report(out)
    lat = report["latency"]
    assert lat["batch"] == 4 and lat["runtime"] == "eager" and lat["device"] == "cpu"
    assert lat["threads"] == torch.get_num_threads()
    assert lat["before"]["median_ms"] > 0 and lat["after"]["median_ms"] > 0
    assert lat["speedup"] == pytest.approx(lat["before"]["median_ms"] / lat["after"]["median_ms"])
    assert "BatchNorm folded" in lat["baseline"]
    assert set(report["realizations"]) == {"conv1", "conv2", "conv3", "conv4"}
    for layer in report["layers"]:
        assert layer["latency_before_ms"] > 0
        if layer["action"] == "kept":
            assert layer["reason"].startswith("kept: not faster")
        else:
            assert layer["latency_after_ms"] < layer["latency_before_ms"]
    assert any(line.startswith("latency: ") for line in stdout.splitlines())
    assert "ms (alone)" in stdout
    # The saved model reloads with each layer's realization, or its original conv.
    reloaded = load_decoupled(build_model("digits_cnn"), out)
    for layer in report["layers"]:
        module = reloaded.get_submodule(layer["name"])
        if layer["action"] == "kept":
            assert type(module) is torch.nn.Conv2d
        else:
            assert module.realization == layer["realization"]


def _fake_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """A clock on which an original 3×3 conv takes 1 ms and a decoupled one 0.1 ms per term,
    beside 0.5 ms of other work: a busy machine cannot make the plan slower than the model."""
    from decouple.nn.decoupled import DecoupledConv2d
    from decouple.plan import latency_budget
    from decouple.runtime import latency
    from decouple.runtime.realize import ORIGINAL

    def time_candidates(candidates, x, *args, **kwargs):
        return {k: 1.0 if k == ORIGINAL else 0.1 * m.rank for k, m in candidates.items()}

    def measure(model, *args, **kwargs):
        ms, inside = 0.5, set()
        for m in model.modules():
            if isinstance(m, DecoupledConv2d):
                ms += 0.1 * m.rank
                inside |= {id(c) for c in m.modules()}  # its own convs are priced with it
            elif type(m) is torch.nn.Conv2d and id(m) not in inside:
                ms += 1.0
        return latency.Latency(ms, 0.0, 1, "eager", "cpu", 1, 1)

    monkeypatch.setattr(latency_budget, "time_candidates", time_candidates)
    monkeypatch.setattr(latency_budget, "measure", measure)
    monkeypatch.setattr(latency, "measure", measure)


def test_target_latency_plans_from_layer_timings(tmp_path: Path, capsys, monkeypatch) -> None:
    _fake_clock(monkeypatch)
    out = tmp_path / "d.pt"
    code, stdout, err = cli(capsys, "--demo", "--target-latency", "0.9", "--batch", "32",
                            "--method", "nd", "--out", out)  # fmt: skip
    assert code == 0, err
    report = _report(out)
    plan = report["latency_allocation"]
    assert plan["criterion"] == "energy" and plan["model_ms"] > 0
    assert plan["target_ms"] == pytest.approx(0.9 * plan["model_ms"], rel=1e-4)
    assert set(plan["ranks"]) == {"conv1", "conv2", "conv3", "conv4"}
    for name, rank in plan["ranks"].items():
        layer = next(r for r in report["layers"] if r["name"] == name)
        assert (layer["action"] == "decoupled") == (rank > 0)
        if rank:
            assert layer["rank"] == rank and name in plan["realizations"]
    assert "latency budget:" in stdout and "latency:" in stdout


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--rank", "2", "--runtime", "onnxruntime"], "add --latency"),
        (["--rank", "2", "--batch", "8"], "add --latency"),
        (["--rank", "2", "--latency", "--batch", "0"], "batch"),
        (["--rank", "2", "--latency", "--threads", "0"], "threads"),
        (["--target-latency", "0"], "--target-latency"),
        (["--target-latency", "1.5"], "--target-latency"),
        (["--rank", "2", "--target-latency", "0.5"], "not allowed with"),
        (["--target-flops", "0.5", "--target-latency", "0.5"], "not allowed with"),
    ],
)
def test_bad_latency_flags_are_one_line(tmp_path: Path, capsys, argv, match) -> None:
    code, _, err = cli(capsys, "--demo", *argv, "--out", tmp_path / "d.pt")
    assert code == 2
    assert_one_line_error(err)
    assert match in err
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_cpu_machine_is_one_line(tmp_path: Path, capsys) -> None:
    code, _, err = cli(capsys, "--demo", "--rank", "2", "--latency", "--device", "cuda",
                       "--out", tmp_path / "d.pt")  # fmt: skip
    assert code == 2
    assert_one_line_error(err)
    assert "cuda" in err


@pytest.mark.skipif(not HAVE_ORT, reason="onnx/onnxruntime not installed (pip install '.[export]')")
def test_onnx_output_and_onnxruntime_latency(tmp_path: Path, capsys) -> None:
    out = tmp_path / "d.pt"
    code, stdout, err = cli(capsys, "--demo", "--rank", "2", "--onnx", "--latency",
                            "--runtime", "onnxruntime", "--out", out)  # fmt: skip
    assert code == 0, err
    onnx_path = tmp_path / "d.onnx"
    assert onnx_path.is_file() and "wrote onnx" in stdout
    report = _report(out)
    assert report["onnx"]["ok"] and report["onnx"]["checker"]
    assert report["latency"]["runtime"] == "onnxruntime"
    # Nothing is overwritten without --force.
    code, _, err = cli(capsys, "--demo", "--rank", "2", "--onnx", "--out", out)
    assert code == 2 and "--force" in err


@pytest.mark.skipif(not HAVE_ORT, reason="onnx/onnxruntime not installed (pip install '.[export]')")
def test_onnx_over_the_protobuf_limit_writes_its_weights_beside(tmp_path, capsys, monkeypatch):
    """Past 2 GiB (here: past 1 kB) the weights go to X.onnx.data, which ONNX Runtime reads."""
    import numpy as np
    import onnxruntime as ort

    import decouple.runtime.export

    monkeypatch.setattr(decouple.runtime.export, "PROTOBUF_LIMIT", 1000)
    out = tmp_path / "d.pt"
    (tmp_path / "d.onnx.data").write_bytes(b"old")  # nothing is overwritten without --force
    code, _, err = cli(capsys, "--demo", "--rank", "2", "--onnx", "--out", out)
    assert code == 2 and "--force" in err and "d.onnx.data" in err
    assert not out.exists() and not (tmp_path / "d.onnx").exists()
    code, stdout, err = cli(capsys, "--demo", "--rank", "2", "--onnx", "--out", out, "--force")
    assert code == 0, err
    graph, weights = tmp_path / "d.onnx", tmp_path / "d.onnx.data"
    assert "wrote onnx data" in stdout and weights.stat().st_size > graph.stat().st_size
    assert _report(out)["onnx"]["ok"]
    model = load_decoupled(build_model("digits_cnn"), out).eval()
    x = torch.randn(3, 1, 8, 8)
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-5)

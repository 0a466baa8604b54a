"""The CLI's latency flags: ``--latency``, ``--target-latency``, ``--runtime``, ``--batch``,
``--device``, ``--threads``, and ``--onnx``.

The eager runs time on the fake clock of ``tests/conftest.py`` (modules cost what the test says),
so the report's numbers and choices are known exactly and a busy machine cannot change them;
the ONNX Runtime run times for real and checks only what is recorded. Timings are shortened (a
patched ``LatencyConfig``) so the suite stays fast.
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


# The fake clock's prices (ms per call): a conv 1 ms, the head 0.5 ms; a decoupled layer 0.1 ms
# per term (2 ms in all in conv1, whose one input channel leaves nothing to gain) plus its
# realization's extra.
EXTRA_MS = {"grouped": 0.003, "split": 0.001, "repeat": 0.002, "tile": 0.004, "sum": 0.005}
CALL_MS = 0.01  # each timed call of a whole model also pays the fake clock's call_ms


def _prices(module: torch.nn.Module) -> float:
    from decouple.nn.decoupled import DecoupledConv2d

    if isinstance(module, DecoupledConv2d):
        terms = 2.0 if module.in_channels == 1 else 0.1 * module.rank
        return terms + EXTRA_MS[module.realization]
    return {torch.nn.Conv2d: 1.0, torch.nn.Linear: 0.5}.get(type(module), 0.0)


def test_latency_reports_before_after_and_per_layer_times(tmp_path: Path, capsys, fake_clock):
    fake_clock.cost = _prices
    out = tmp_path / "d.pt"
    # without the data-free bias correction: at rank 2 it makes this demo plan a wreck, refused
    code, stdout, err = cli(capsys, "--demo", "--include-stem", "--rank", "2", "--latency", "--batch", "4",
                            "--no-bias-correction", "--out", out)  # fmt: skip
    assert code == 0, err
    report = _report(out)
    lat = report["latency"]
    assert lat["batch"] == 4 and lat["runtime"] == "eager" and lat["device"] == "cpu"
    assert lat["threads"] == torch.get_num_threads()
    # conv1 keeps its conv; conv2-4 run as split, the cheapest realization.
    before, after = 4 * 1.0 + 0.5 + CALL_MS, 1.0 + 3 * 0.201 + 0.5 + CALL_MS
    assert lat["before"]["median_ms"] == pytest.approx(before)
    assert lat["after"]["median_ms"] == pytest.approx(after)
    assert lat["speedup"] == pytest.approx(before / after)
    assert "BatchNorm folded" in lat["baseline"]
    assert report["realization_check"]["kept"] == "per layer"
    assert set(report["realizations"]) == {"conv1", "conv2", "conv3", "conv4"}
    layers = {r["name"]: r for r in report["layers"]}
    assert layers["conv1"]["action"] == "kept"
    assert layers["conv1"]["reason"].startswith("kept: not faster (best realization split 2.001")
    assert layers["conv1"]["latency_before_ms"] == pytest.approx(1.0)
    for name in ("conv2", "conv3", "conv4"):
        assert layers[name]["action"] == "decoupled" and layers[name]["realization"] == "split"
        assert layers[name]["latency_before_ms"] == pytest.approx(1.0)
        assert layers[name]["latency_after_ms"] == pytest.approx(0.201)
    assert any(line.startswith("latency: ") for line in stdout.splitlines())
    assert "ms (alone)" in stdout
    # The saved model reloads with each layer's realization, or its original conv.
    reloaded = load_decoupled(build_model("digits_cnn"), out)
    for layer in report["layers"]:
        module = reloaded.get_submodule(layer["name"])
        if layer["action"] == "kept":  # a conv, or the linear head a k×k rank never touches
            assert type(module) is (
                torch.nn.Linear if layer["kind"] == "linear" else torch.nn.Conv2d
            )
        else:
            assert module.realization == layer["realization"]


def test_target_latency_plans_from_layer_timings(tmp_path: Path, capsys, fake_clock) -> None:
    """On the fake clock the model takes 4.51 ms; a layer's table is its price net of the call
    overhead and adds up exactly inside the model, so the first plan measures what it planned."""
    fake_clock.cost = _prices
    out = tmp_path / "d.pt"
    code, stdout, err = cli(capsys, "--demo", "--include-stem", "--target-latency", "0.9", "--batch", "32",
                            "--method", "nd", "--latency-table", "measured", "--out", out)  # fmt: skip
    assert code == 0, err
    report = _report(out)
    plan = report["latency_allocation"]
    model_ms = 4 * 1.0 + 0.5 + CALL_MS
    assert plan["criterion"] == "energy" and plan["model_ms"] == pytest.approx(model_ms)
    assert plan["target_ms"] == pytest.approx(0.9 * model_ms, rel=1e-4)
    assert plan["reached"] and [s["priced"] for s in plan["steps"]].count("time") == 1
    assert plan["measured_ms"] == pytest.approx(plan["planned_ms"], abs=1e-5)
    assert 0.8 * plan["target_ms"] <= plan["measured_ms"] <= plan["target_ms"]
    fc = plan["table_ms"].pop("fc")  # the linear head, priced in svd: two linears cost 1 ms
    assert fc["original"] == pytest.approx(0.5) and all(
        k.startswith("svd R=") for k in fc if k != "original"
    )
    assert plan["ranks"].pop("fc") == 0 and plan["reasons"]["fc"] == "kept: not faster"
    for name, table in plan["table_ms"].items():
        assert table["original"] == pytest.approx(1.0)
        for key, ms in table.items():
            if key != "original":
                t, real = int(key.split("T=")[1].split(":")[0]), key.split(": ")[1]
                want = (2.0 if name == "conv1" else 0.1 * t) + EXTRA_MS[real]
                assert ms == pytest.approx(want), key
    assert plan["ranks"]["conv1"] == 0 and plan["reasons"]["conv1"] == "kept: not faster"
    assert set(plan["ranks"]) == {"conv1", "conv2", "conv3", "conv4"}
    assert set(plan["realizations"].values()) == {"split"}
    assert report["latency"]["speedup"] == pytest.approx(model_ms / plan["measured_ms"])
    for name, rank in plan["ranks"].items():
        layer = next(r for r in report["layers"] if r["name"] == name)
        assert (layer["action"] == "decoupled") == (rank > 0)
        if rank:
            assert layer["rank"] == rank and name in plan["realizations"]
            assert layer["latency_after_ms"] == pytest.approx(0.1 * rank + EXTRA_MS["split"])
    assert "latency budget:" in stdout and "latency:" in stdout


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--rank", "2", "--batch", "0"], "batch"),  # checked without --latency too
        (["--rank", "2", "--rank-multiple", "8"], "--rank-multiple"),  # needs a budget
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
    # --allow-miss: which layers stay exact ("not faster than the original conv") follows the
    # timings, and with none kept rank 2 with the stem wrecks the demo (the wreck check's exit 3)
    code, stdout, err = cli(capsys, "--demo", "--include-stem", "--rank", "2", "--onnx", "--latency",
                            "--runtime", "onnxruntime", "--allow-miss", "--out", out)  # fmt: skip
    assert code == 0, err
    onnx_path = tmp_path / "d.onnx"
    assert onnx_path.is_file() and "wrote onnx" in stdout
    report = _report(out)
    assert report["onnx"]["ok"] and report["onnx"]["checker"]
    lat = report["latency"]  # timed for real: only what was recorded is checked
    assert lat["runtime"] == "onnxruntime" and lat["batch"] == 1
    assert lat["before"]["median_ms"] > 0 and lat["after"]["median_ms"] > 0
    assert all(r["latency_before_ms"] > 0 for r in report["layers"] if r["kind"] == "conv")
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
    code, stdout, err = cli(capsys, "--demo", "--rank", "6", "--onnx", "--out", out, "--force")
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


@pytest.mark.skipif(not HAVE_ORT, reason="onnx/onnxruntime not installed (pip install '.[export]')")
def test_every_report_predicts_speed_from_the_cost_model(tmp_path: Path, capsys, monkeypatch):
    code, out, _ = cli(capsys, "--demo", "--target-flops", "0.5", "--runtime", "onnxruntime",
                       "--batch", "4", "--out", tmp_path / "d.pt")  # fmt: skip
    assert code == 0
    report = json.loads((tmp_path / "d.report.json").read_text())
    pred = report["predicted_speed"]
    assert (pred["runtime"], pred["batch"]) == ("onnxruntime", 4) and "latency" not in report
    assert pred["speedup"] == pytest.approx(pred["before_ms"] / pred["after_ms"])
    assert "DECOUPLE_COST_MODEL=" in pred["source"]
    line = next(x for x in out.splitlines() if x.startswith("predicted speed:"))
    assert ("SLOWER" in line) == (pred["speedup"] < 1)
    monkeypatch.setenv("DECOUPLE_COST_MODEL", "off")
    code, out, _ = cli(capsys, "--demo", "--target-flops", "0.5", "--out", tmp_path / "e.pt")
    assert code == 0 and "predicted speed" not in out
    assert "predicted_speed" not in json.loads((tmp_path / "e.report.json").read_text())

"""The latency cost model: the census of a forward pass, the fit, its cache and the report's line.

No test times anything: fits get a timer that returns a planted linear function of the features.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from decouple import predicted_speed
from decouple.io import cost_model_cache
from decouple.io.errors import InputError
from decouple.nn.factorized import CPConv2d
from decouple.predicted_speed import predicted_line
from decouple.runtime import cost_model as cm
from decouple.runtime.cost_model import FEATURES, CostModel, census, fit, fit_cost_model


def _net(c: int = 8) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
        nn.Conv2d(c, c, 3, padding=1, groups=c),  # depthwise
        nn.Conv2d(c, 2 * c, 3, padding=1, groups=c),  # depth multiplier 2
        nn.Conv2d(2 * c, c, 1), nn.Flatten(), nn.Linear(c * 4 * 4, 5),
    ).eval()  # fmt: skip


def test_census_counts_every_op_with_its_macs_and_kind() -> None:
    x = torch.randn(2, 3, 4, 4)
    eager = census(_net(), x, "eager")
    convs = [op for op in eager if op.op == "convolution"]
    assert [op.kind for op in convs] == ["dense", "depthwise", "grouped", "dense"]
    # MACs: output elements times the inputs each one reads
    assert convs[0].gmac == pytest.approx(2 * 8 * 16 * 3 * 9 / 1e9)
    assert convs[2].gmac == pytest.approx(2 * 16 * 16 * 1 * 9 / 1e9)
    assert [op for op in eager if op.op == "addmm"][0].gmac == pytest.approx(2 * 5 * 128 / 1e9)
    names = {op.op for op in eager}
    assert "relu" in names and any("batch_norm" in n for n in names)
    assert "view" not in {op.op for op in eager}  # views move nothing
    ort = census(_net(), x, "onnxruntime")  # BatchNorm folded, ReLU fused by the runtime
    assert {op.op for op in ort} == {"convolution", "addmm"}


def test_census_on_the_meta_device_matches_a_real_forward_pass() -> None:
    x = torch.randn(2, 3, 4, 4)
    real = census(_net(), x, "onnxruntime")
    meta = census(copy.deepcopy(_net()).to("meta"), x.to("meta"), "onnxruntime")
    assert real == meta


def test_ops_on_weights_alone_are_constants_in_onnxruntime_not_in_eager() -> None:
    class Scaled(nn.Module):  # a kernel computed at run time, as a fused factored layer does
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4, 1, 1))

        def forward(self, x):
            return nn.functional.conv2d(x, self.w * 2.0)

    x = torch.randn(1, 4, 2, 2)
    assert [op.op for op in census(Scaled(), x, "onnxruntime")] == ["convolution"]
    assert [op.op for op in census(Scaled(), x, "eager")] == ["mul", "convolution"]


@pytest.mark.parametrize("rank", [16, 32])
def test_the_micro_benchmark_times_the_graph_a_square_cp_layer_runs(rank) -> None:
    """The cost model is fitted on graphs shaped like what the methods produce: a CP layer
    realized as three ops is, op for op, the benchmark's ``cp square`` block (its kernel a
    constant in ONNX Runtime)."""
    c = 16
    layer = CPConv2d.from_conv(nn.Conv2d(c, c, 3, padding=1), rank).set_realization("square")
    x = torch.randn(2, c, 8, 8)
    label = "cp square" if rank == c else "cp square, 2x rank"
    block = cm._blocks(c)[label]
    assert census(layer, x, "onnxruntime") == census(block, x, "onnxruntime")
    assert len(census(layer, x, "onnxruntime")) == 3


def test_onnxruntime_pads_channels_to_its_block_and_leaves_odd_counts_unblocked(
    monkeypatch,
) -> None:
    monkeypatch.setattr(cm, "block_size", lambda: 16)
    x = torch.randn(1, 20, 4, 4)
    (aligned,) = census(nn.Conv2d(20, 20, 1, bias=False), x, "onnxruntime")
    (plain,) = census(nn.Conv2d(20, 20, 1, bias=False), x, "eager")
    assert aligned.kind == plain.kind == "dense"
    assert aligned.gmac == pytest.approx(plain.gmac * (32 / 20) ** 2)  # both 20s padded to 32
    (odd,) = census(nn.Conv2d(20, 21, 1, bias=False), x, "onnxruntime")
    assert odd.kind == "unblocked" and odd.gmac == pytest.approx(16 * 21 * 20 / 1e9)


def test_fit_recovers_planted_coefficients() -> None:
    rng = np.random.default_rng(0)
    planted = rng.uniform(0.01, 2.0, len(FEATURES))
    features = rng.uniform(0, 1, (60, len(FEATURES)))
    coefficients, error = fit(features, features @ planted, floor_ms=1e-6)
    assert np.allclose([coefficients[k] for k in FEATURES], planted, rtol=1e-6)
    assert error < 1e-9


def test_fit_keeps_coefficients_non_negative() -> None:
    rng = np.random.default_rng(1)
    features = rng.uniform(0, 1, (40, len(FEATURES)))
    times = features[:, 0] * 3.0 - features[:, 1] * 0.5 + 0.1  # a negative slope is not a cost
    coefficients, _ = fit(features, np.maximum(times, 0.01))
    assert min(coefficients.values()) >= 0


def test_fit_cost_model_with_a_planted_timer_predicts_the_timer() -> None:
    planted = dict(zip(FEATURES, np.linspace(0.5, 3.0, len(FEATURES)), strict=True))

    def timer(module, x) -> float:  # what a runtime would take if the model were exact
        return sum(planted[k] * v for op in census(module, x, "eager")
                   for k, v in zip(FEATURES, op.features(), strict=True))  # fmt: skip

    model = fit_cost_model("eager", batch=1, threads=1, timer=timer)
    assert model.graphs_timed == len(cm.benchmark_graphs(1))
    assert model.fit_error < 1e-3
    net, x = _net(), torch.randn(1, 3, 4, 4)
    assert model.predict_ms(census(net, x, "eager")) == pytest.approx(timer(net, x), rel=1e-3)


def _model(runtime="onnxruntime", batch=1, **coef) -> CostModel:
    coefficients = dict.fromkeys(FEATURES, 0.0) | coef
    return CostModel(runtime, batch, 1, "cpu", "v", coefficients, 0.1, 3)


def test_cost_model_round_trips_through_json_and_checks_itself() -> None:
    model = _model(gmac_dense=5.0, op=0.01)
    assert CostModel.from_dict(json.loads(json.dumps(model.to_dict()))) == model
    with pytest.raises(ValueError, match="coefficient"):
        _model(op=-1.0)
    with pytest.raises(ValueError, match="exactly"):
        CostModel("eager", 1, 1, "cpu", "v", {"op": 1.0}, 0.0, 0)
    with pytest.raises(ValueError, match="format"):
        CostModel.from_dict({**model.to_dict(), "format": 0})


def test_a_given_cost_model_file_is_used_per_runtime_and_batch(tmp_path, monkeypatch) -> None:
    path = tmp_path / "models.json"
    models = [_model("eager", 1, op=1.0), _model("onnxruntime", 1, op=2.0),
              _model("onnxruntime", 32, op=3.0)]  # fmt: skip
    path.write_text(json.dumps([m.to_dict() for m in models]))
    monkeypatch.setenv("DECOUPLE_COST_MODEL", str(path))
    assert predicted_speed.cost_model_for("onnxruntime", 32)[0] == models[2]
    assert predicted_speed.cost_model_for("onnxruntime", 8)[0] == models[1]
    with pytest.raises(InputError, match="channels-last"):
        predicted_speed.cost_model_for("channels-last", 1)
    path.write_text("{")
    with pytest.raises(InputError, match="not a cost model"):
        predicted_speed.cost_model_for("eager", 1)
    monkeypatch.setenv("DECOUPLE_COST_MODEL", "off")
    assert predicted_speed.cost_model_for("eager", 1) is None


def test_a_fitted_cost_model_is_cached_and_refitted_when_unreadable(monkeypatch) -> None:
    monkeypatch.delenv("DECOUPLE_COST_MODEL")
    fits = []
    monkeypatch.setattr(predicted_speed, "fit_cost_model",
                        lambda runtime, batch, threads: fits.append(1) or _model(runtime, batch, op=1.0))  # fmt: skip
    first, where = predicted_speed.cost_model_for("onnxruntime", 4, 1)
    assert "fitted on this machine" in where and "cached in" in where
    again, where = predicted_speed.cost_model_for("onnxruntime", 4, 1)
    assert again == first and "read from" in where and len(fits) == 1
    path = where.rsplit("read from ", 1)[1]
    with open(path, "w") as f:
        f.write("not json")
    predicted_speed.cost_model_for("onnxruntime", 4, 1)
    assert len(fits) == 2
    assert cost_model_cache.load(cost_model_cache.path_for({"other": 1})) is None


def test_predict_speed_compares_two_models_and_the_line_says_slower() -> None:
    before = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1)).eval()
    wider = nn.Sequential(nn.Conv2d(16, 64, 1), nn.Conv2d(64, 16, 3, padding=1)).eval()
    got = predicted_speed.predict_speed(before, wider, (16, 8, 8), "onnxruntime", batch=2)
    assert got["after_ms"] > got["before_ms"] > 0
    assert got["speedup"] == pytest.approx(got["before_ms"] / got["after_ms"])
    line = predicted_line(got, measured=False)
    assert "slower" in line and "predicted SLOWER" in line and "--rank-multiple 8" in line
    assert "--latency measures" in line
    faster = {**got, "speedup": 1.5, "runtime": "eager"}
    assert "SLOWER" not in predicted_line(faster, measured=True)

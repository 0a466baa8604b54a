"""A latency budget priced by the cost model: no layer is timed alone, every candidate costs
what the model predicts, and the plans are still timed whole (here on a fake clock that agrees
with the model, so the right plan is known)."""

from __future__ import annotations

import json

import pytest
import torch
from clocks import whole_model_clock
from toys import toy

from decouple import DecoupleConfig, build_report
from decouple.pipeline import compress_
from decouple.plan import latency_budget as lb
from decouple.runtime import latency as latency_module
from decouple.runtime.cost_model import FEATURES, CostModel, census
from decouple.runtime.latency import Latency, LatencyConfig

CONFIG = DecoupleConfig(order="dw-pw", fold_bn=False, include_stem=True, overrides={"head": "skip"})
PREDICTED = LatencyConfig(layer_table="predicted")


def model_of_macs(runtime: str = "eager") -> CostModel:
    """1 ms per 10⁶ multiply-adds of any kind and 1 µs per op: time follows the arithmetic."""
    coefficients = dict.fromkeys(FEATURES, 0.0)
    coefficients.update({f"gmac_{k}": 1000.0 for k in ("dense", "depthwise", "grouped",
                                                       "unblocked")}, op=0.001)  # fmt: skip
    return CostModel(runtime, 1, 1, "test", "test", coefficients, 0.0, 0)


@pytest.fixture
def clock_of(monkeypatch):
    """Whole models take what ``cm`` predicts; timing a layer alone is an error."""

    def use(cm: CostModel):
        def measure(model, example, *args, **kwargs):
            ms = cm.predict_ms(census(model, example.to(next(model.parameters())), cm.runtime))
            return Latency(ms, 0.0, 1, "eager", "cpu", 1, 1)

        def no_clock(*args, **kwargs):
            raise AssertionError("a layer was timed although the table is predicted")

        whole_model_clock(monkeypatch, measure)
        monkeypatch.setattr(lb, "time_candidates", no_clock)

    return use


def test_every_candidate_costs_what_the_cost_model_predicts(clock_of):
    cm = model_of_macs()
    clock_of(cm)
    model = toy()
    plan = lb.plan_latency(model, CONFIG, (3, 8, 8), 0.6, PREDICTED, cost_model=cm)
    assert plan.layer_table == "predicted" and plan.table_passes == 1
    assert json.loads(json.dumps(plan.to_dict()))["layer_table"] == "predicted"
    x = PREDICTED.example((3, 8, 8), torch.float64)
    inputs = latency_module.capture_inputs(model, ["conv1", "conv2", "conv3"], x)
    for name in ("conv1", "conv2", "conv3"):
        original = cm.predict_ms(census(model.get_submodule(name), inputs[name], "eager"))
        assert plan.table[name][lb.ORIGINAL] == pytest.approx(original)
        assert len(plan.table[name]) > 1  # every rank in every realization, none left out
    assert plan.measured_ms <= plan.target_ms and plan.allocation.ranks()  # reached, by factoring
    # a tighter budget buys no less loss: the table prices ranks by their arithmetic
    tight = lb.plan_latency(toy(), CONFIG, (3, 8, 8), 0.4, PREDICTED, cost_model=cm)
    assert tight.allocation.loss >= plan.allocation.loss


def test_a_predicted_table_needs_a_cost_model():
    with pytest.raises(ValueError, match="cost model"):
        lb.plan_latency(toy(), CONFIG, (3, 8, 8), 0.6, PREDICTED)


def test_compress_prices_the_table_with_the_cost_model_it_is_given(clock_of, tmp_path, monkeypatch):
    cm = model_of_macs()
    clock_of(cm)
    path = tmp_path / "cost_model.json"
    path.write_text(json.dumps(cm.to_dict()))
    monkeypatch.setenv("DECOUPLE_COST_MODEL", str(path))  # what the pipeline reads it from
    model = toy()
    result = compress_(model, CONFIG, (3, 8, 8), target_latency=0.6, latency=PREDICTED)
    assert result.latency_plan.layer_table == "predicted"
    report = build_report(toy(), model, result.records, (3, 8, 8), extra=result.extra())
    assert "from per-layer predictions of the cost model" in report.to_text()
    monkeypatch.setenv("DECOUPLE_COST_MODEL", "off")
    with pytest.raises(ValueError, match="DECOUPLE_COST_MODEL"):
        compress_(toy(), CONFIG, (3, 8, 8), target_latency=0.6, latency=PREDICTED)


def test_auto_predicts_the_table_where_there_is_a_cost_model_and_times_it_where_not(
    clock_of, tmp_path, monkeypatch
):
    """The default table: the cost model's where one can be had (on the CPU); every layer timed
    when prediction is turned off."""
    cm = model_of_macs()
    clock_of(cm)  # a layer timed alone fails the test
    path = tmp_path / "cost_model.json"
    path.write_text(json.dumps(cm.to_dict()))
    monkeypatch.setenv("DECOUPLE_COST_MODEL", str(path))
    assert LatencyConfig().layer_table == "auto"
    result = compress_(toy(), CONFIG, (3, 8, 8), target_latency=0.6, latency=LatencyConfig())
    assert result.latency_plan.layer_table == "predicted"
    monkeypatch.setenv("DECOUPLE_COST_MODEL", "off")
    timed = []

    def time_candidates(candidates, *args, **kwargs):
        timed.append(sorted(candidates))
        return {k: 1.0 if k == lb.ORIGINAL else 0.1 for k in candidates}

    monkeypatch.setattr(lb, "time_candidates", time_candidates)
    result = compress_(toy(), CONFIG, (3, 8, 8), target_latency=0.6, latency=LatencyConfig())
    assert result.latency_plan.layer_table == "measured" and timed
    report = build_report(toy(), toy(), result.records, (3, 8, 8), extra=result.extra())
    assert "from per-layer predictions of the cost model" not in report.to_text()


@pytest.mark.parametrize("table", ["auto", "measured", "predicted"])
def test_the_cli_flag_reaches_the_latency_config(table):
    from decouple.cli.flags import make_latency_config
    from decouple.cli.parser import build_parser

    args = build_parser().parse_args(["m.pt", "--target-latency", "0.6", "--latency-table", table])
    assert make_latency_config(args).layer_table == table
    default = build_parser().parse_args(["m.pt", "--target-latency", "0.6"])
    assert make_latency_config(default).layer_table == "auto"

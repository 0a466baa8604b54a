"""Plans allocated by FLOPs inside a latency search, handed back in the table's ns."""

from __future__ import annotations

from decouple.plan.allocate import Option
from decouple.plan.flops_pricing import FlopsPricing
from decouple.plan.prune_options import ChainUnit
from decouple.surgery.chains import Chain


def _layers(costs):
    """``{layer: [keep, rank 1, rank 2]}`` with costs ``costs[layer]`` and losses 0, 2, 1."""
    return {
        n: [Option(0, c[0], 0.0, "", ""), Option(1, c[1], 2.0, "cp", ""),
            Option(2, c[2], 1.0, "cp", "")]
        for n, c in costs.items()
    }  # fmt: skip


def test_a_flops_plan_spends_its_budget_where_the_flops_are_and_comes_back_in_ns():
    # By time, "a" and "b" look alike (the table's view); by FLOPs, "b" holds almost all of them.
    ns = _layers({"a": (100, 40, 60), "b": (100, 40, 60)})
    flops = _layers({"a": (10, 4, 6), "b": (1000, 400, 600)})
    priced = FlopsPricing(flops, [], fixed=50, options=ns, units=[], fixed_ns=7)
    plan = priced.plan(budget=50 + 10 + 600)
    assert plan.unit == "ns" and plan.methods() == {"a": "keep", "b": "cp R=2"}
    assert plan.choice["b"] is ns["b"][2] and plan.total_flops == 7 + 100 + 60
    assert priced.flops_of(plan) == 50 + 10 + 600
    assert "allocated by FLOPs" in plan.reasons["b"]


def test_a_pruned_chain_is_priced_by_its_width_and_its_consumer_inside_it():
    chain = Chain(producer="a", mids=(), consumer="b", width=8, joins_sum=False)
    ns = _layers({"a": (100, 90, 95), "b": (100, 90, 95)})
    flops = _layers({"a": (400, 300, 350), "b": (400, 300, 350)})
    widths = [Option(k, 25 * k, 0.01 * (8 - k), "prune", "") for k in (2, 4)]  # ns
    unit = ChainUnit(chain, widths, order=list(range(8)), flops=800)
    funit = ChainUnit(chain, [Option(k, 100 * k, 0.01 * (8 - k), "prune", "") for k in (2, 4)],
                      order=list(range(8)), flops=800)  # fmt: skip
    priced = FlopsPricing(flops, [funit], fixed=0, options=ns, units=[unit], fixed_ns=0)
    plan = priced.plan(budget=450)
    assert plan.choice["a"] is widths[1] and plan.pruned["a"][1] == [0, 1, 2, 3]
    assert plan.choice["b"].cost == 0  # the consumer's time is in the width's
    assert priced.flops_of(plan) == 400 and plan.total_flops == 100

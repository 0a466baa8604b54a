"""A plan timed whole also runs with its CP layers as three ops where the table said four.

A predicted table prices CP's ``square`` graph by its multiply-adds and ranks it slower than it
runs; the whole-model check after the search switches to it anyway. The search must time each
plan as that model will run, or it takes speed nobody asked for out of accuracy.
"""

from __future__ import annotations

import pytest
from clocks import whole_model_clock
from toys import toy

from decouple import DecoupleConfig
from decouple.nn.factorized import CPConv2d
from decouple.plan import latency_budget as lb
from decouple.runtime.latency import Latency, LatencyConfig
from decouple.runtime.realize import ORIGINAL

CONFIG = DecoupleConfig(method="cp", fold_bn=False, include_stem=True, overrides={"head": "skip"})


def _clock(monkeypatch, square_ms: float):
    """Alone, a CP layer costs 30 µs as four ops and 40 µs as three (the table's view); in the
    model it costs 30 µs as four ops and ``square_ms`` as three; each original conv 100 µs."""

    def time_candidates(candidates, x, *args, **kwargs):
        return {
            k: 0.1 if k == ORIGINAL else (0.04 if k.endswith(": square") else 0.03)
            for k in candidates
        }

    def measure(model, *args, **kwargs):
        ms = 0.2
        for name in ("conv1", "conv2", "conv3"):
            layer = model.get_submodule(name)
            if not isinstance(layer, CPConv2d):
                ms += 0.1
            else:
                ms += square_ms if layer.realization == "square" else 0.03
        return Latency(ms, 0.0, 1, "eager", "cpu", 1, 1)

    monkeypatch.setattr(lb, "time_candidates", time_candidates)
    whole_model_clock(monkeypatch, measure)


@pytest.mark.parametrize("square_ms, kept", [(0.01, "square"), (0.05, "separable")])
def test_a_plan_is_timed_in_the_faster_of_its_cp_graphs(monkeypatch, square_ms, kept):
    _clock(monkeypatch, square_ms)
    plan = lb.plan_latency(toy(), CONFIG, (3, 8, 8), 0.6, LatencyConfig(), flops_tries=0)
    cp = [n for n, o in plan.allocation.choice.items() if o.method == "cp" and o.rank]
    assert cp, "the plan factors some layer"
    assert {plan.realizations[n] for n in cp} == {kept}
    # the time recorded is the model's in those realizations
    expected = 0.2 + 0.1 * (3 - len(cp)) + len(cp) * min(square_ms, 0.03)
    assert plan.measured_ms == pytest.approx(expected)

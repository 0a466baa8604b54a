"""Uniform plans as the allocator's baseline: never a plan worse than every layer alike."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from decouple.plan.allocate import Option, _greedy, allocate
from decouple.plan.uniform import best_uniform


def _opts(pairs, method="cp", order=""):
    """The original (cost 100) and factored options ``(cost, loss)``."""
    return [Option(0, 100, 0.0, "", "")] + [
        Option(i + 1, c, loss, method, order) for i, (c, loss) in enumerate(pairs)
    ]


# Found by a random search: the greedy pass buys b's 55-FLOP option first (the best loss saved
# per FLOP), after which a cannot afford anything but its 40; a uniform plan at 20 % keeps a
# exact and takes b's cheapest, for less loss.
NONCONVEX = {
    "a": _opts([(40, 0.94), (85, 0.37), (65, 0.87)]),
    "b": _opts([(55, 0.26), (35, 0.69), (20, 0.98)]),
}


def test_uniform_plan_replaces_a_worse_greedy_one_and_says_so():
    greedy = _greedy(NONCONVEX, 0, 120)
    greedy_loss = sum(o.loss for o in greedy.values())
    plan = allocate(NONCONVEX, 0, 120)
    assert greedy_loss == pytest.approx(1.13)
    assert plan.loss == pytest.approx(0.98)
    assert plan.total_flops <= 120
    assert plan.uniform["taken"] and plan.uniform["loss"] == pytest.approx(0.98)
    assert all("uniform cp" in r for r in plan.reasons.values())


def test_uniform_plan_picks_the_same_fraction_everywhere_and_its_own_methods_elsewhere():
    options = {
        "k3": _opts([(20, 0.5), (50, 0.2)]),
        "k3b": _opts([(25, 0.4), (50, 0.1)]),
        "p1": _opts([(30, 0.3), (50, 0.05)], method="svd"),  # a 1×1 conv: svd is all it has
    }
    u = best_uniform(options, 10, 10 + 150)
    assert u.kind == "cp" and u.fraction == pytest.approx(0.5)
    assert [u.choice[n].cost for n in options] == [50, 50, 50]
    assert u.loss == pytest.approx(0.35) and u.cost == 160
    assert best_uniform(options, 10, 10 + 40) is None  # even the cheapest fractions cost more


def test_the_greedy_plan_stays_where_it_is_better():
    options = {"a": _opts([(50, 0.1), (20, 0.9)]), "b": _opts([(50, 0.8), (20, 0.85)])}
    plan = allocate(options, 0, 100)  # both at 50: loss 0.9, the best there is
    assert plan.loss == pytest.approx(0.9)
    assert not plan.uniform["taken"]


layer = st.lists(
    st.tuples(st.integers(1, 99), st.floats(0, 1, allow_nan=False)), min_size=1, max_size=4
)


@given(
    st.lists(st.tuples(layer, st.sampled_from(["cp", "tucker"])), min_size=1, max_size=5),
    st.integers(0, 600),
)
def test_allocation_is_never_worse_than_any_uniform_plan_that_fits(layers, target):
    options = {f"l{i}": _opts(pairs, method) for i, (pairs, method) in enumerate(layers)}
    plan = allocate(options, 0, target)
    u = best_uniform(options, 0, target)
    if u is not None:
        assert plan.total_flops <= target
        assert plan.loss <= u.loss + 1e-9


def test_the_report_states_the_uniform_baseline_and_whether_it_was_taken():
    from toys import toy

    from decouple import DecoupleConfig, build_report, compress_

    original, model = toy(), toy()
    result = compress_(model, DecoupleConfig(method="auto", fold_bn=True), (3, 8, 8), 0.6)
    report = build_report(original, model, result.records, (3, 8, 8), extra=result.extra())
    uni = report.extra["allocation"]["uniform_baseline"]
    assert uni["loss"] >= result.allocation.loss - 1e-12  # the plan is never worse
    line = next(x for x in report.to_text().splitlines() if x.startswith("uniform baseline: "))
    assert uni["plan"] in line and ("taken" in line)

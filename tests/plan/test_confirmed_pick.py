"""The plan a latency search keeps is timed once more, afresh, before it is trusted."""

from __future__ import annotations

from decouple.plan.latency_search import confirmed_pick, pick


class Plan:
    """A stand-in allocation: plans are told apart by identity, as the search does."""

    def __init__(self, name: str) -> None:
        self.name = name


def _retimer(true_ms: dict, calls: list):
    """A clock that gives each plan its true time (its first timing, in ``tried``, was noisy)."""

    def retime(plan, chosen):
        calls.append(plan.name)
        return true_ms[plan.name], {**chosen, "retimed": True}

    return retime


def _never_step(calls: list):
    def step_on():
        calls.append("step")
        return False

    return step_on


def test_a_plan_whose_fresh_time_holds_is_kept_and_timed_once_more():
    a, b = Plan("a"), Plan("b")
    tried = [(0.98, 1.0, a, {}), (0.90, 2.0, b, {})]
    calls = []
    missed, plan, chosen, ms, retimed = confirmed_pick(
        tried, 1.0, 0.03, _retimer({"a": 0.99, "b": 0.9}, calls), _never_step(calls)
    )
    assert not missed and plan is a and ms == 0.99 and chosen == {"retimed": True}
    assert calls == ["a"] and retimed == [{"first_ms": 0.98, "retimed_ms": 0.99}]


def test_a_plan_inside_the_target_by_luck_gives_way_to_one_that_stays_inside():
    """``a`` (least loss) measured under the target once and over it afresh: plain :func:`pick`
    keeps it; the confirmed pick drops it and keeps ``b``, timed afresh in turn."""
    a, b, c = Plan("a"), Plan("b"), Plan("c")
    tried = [(0.99, 1.0, a, {}), (0.95, 2.0, b, {}), (1.2, 0.5, c, {})]
    assert pick(list(tried), 1.0, 0.03)[1] is a
    calls = []
    missed, plan, _, ms, retimed = confirmed_pick(
        tried, 1.0, 0.03, _retimer({"a": 1.02, "b": 0.96}, calls), _never_step(calls)
    )
    assert not missed and plan is b and ms == 0.96
    assert calls == ["a", "b"] and [r["retimed_ms"] for r in retimed] == [1.02, 0.96]
    assert tried[0][0] == 1.02  # the fresh time replaced the lucky one


def test_with_nothing_left_inside_the_target_the_search_steps_on_to_a_faster_plan():
    a, d = Plan("a"), Plan("d")
    tried = [(0.99, 1.0, a, {})]
    calls = []

    def step_on():
        calls.append("step")
        tried.append((0.93, 3.0, d, {}))
        return True

    missed, plan, _, ms, _ = confirmed_pick(
        tried, 1.0, 0.03, _retimer({"a": 1.03, "d": 0.94}, calls), step_on
    )
    assert not missed and plan is d and ms == 0.94
    assert calls == ["a", "step", "d"]


def test_with_no_budget_left_to_try_the_fastest_is_kept_and_said_missed():
    a, b = Plan("a"), Plan("b")
    tried = [(0.99, 1.0, a, {}), (1.1, 2.0, b, {})]
    calls = []
    missed, plan, _, ms, _ = confirmed_pick(
        tried, 1.0, 0.03, _retimer({"a": 1.05}, calls), _never_step(calls)
    )
    assert missed and plan is a and ms == 1.05  # over the target, and still the fastest
    assert calls == ["a", "step"]


def test_the_fresh_timings_are_bounded():
    plans = [Plan(str(i)) for i in range(6)]
    tried = [(0.99, float(i), p, {}) for i, p in enumerate(plans)]
    calls = []
    confirmed_pick(
        tried, 1.0, 0.03, _retimer({p.name: 1.01 for p in plans}, calls), _never_step(calls),
        tries=3,
    )  # fmt: skip
    assert len(calls) == 3

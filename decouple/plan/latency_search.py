"""The arithmetic of a latency search: which budget to try next, and which timed plan to keep.

:func:`~decouple.plan.latency_budget.plan_latency` times whole plans; what it does with those
times needs no clock: moving the budget to where the measured plans say the target lies
(:func:`next_budget`), skipping plans already measured (:func:`new_plan`) and keeping the least
loss among the plans within the target, else the fastest (:func:`pick`), and timing the plan
kept once more before it is trusted (:func:`confirmed_pick`).
"""

from __future__ import annotations

from .allocate import Allocation, allocate


def pick(tried, target_ms: float, noise: float):
    """``(missed, plan, realizations, ms)`` of the plan to keep among those timed whole.

    Within the budget: the least loss. Else the fastest, except that plans whose times are
    within ``noise`` of the fastest count as equally fast, and the least loss among them wins:
    a difference inside the timing noise is not worth accuracy.
    """
    fits = [t for t in tried if t[0] <= target_ms]
    if fits:
        ms, _, plan, chosen = min(fits, key=lambda t: t[1])
        return False, plan, chosen, ms
    fastest = min(t[0] for t in tried)
    ms, _, plan, chosen = min(
        (t for t in tried if t[0] <= fastest * (1 + noise)), key=lambda t: t[1]
    )
    return True, plan, chosen, ms


# Fresh timings of picked plans, and plans stepped on to, at most. Each costs one whole-model
# timing side by side with the original (seconds at CIFAR size).
CONFIRM_TRIES = 3


def confirmed_pick(tried, target_ms: float, noise: float, retime, step_on, tries=CONFIRM_TRIES):
    """:func:`pick`, with the plan kept within the target timed once more, afresh.

    The plan picked is the least loss among those measured within the target, which is mostly
    the slowest of them, and often one whose timing was lucky: of several noisy times near the
    target, the ones that landed under it are the ones picked (the winner's curse). The user's
    own timing of the written model then lands a per cent or two over. So the picked plan is
    timed again (``retime(plan, realizations) -> (ms, realizations)``), and that fresh time,
    which did not pick it, replaces its first one. A plan that misses the target on it drops
    out, and the pick is made again: another plan within the target (timed afresh in turn),
    or, none left, ``step_on()`` times one more plan aimed under the target (False: no budget
    left to try). ``tried`` is updated in place; returns :func:`pick`'s tuple and the list of
    ``{"first_ms", "retimed_ms"}`` of every plan timed again.
    """
    retimed: list[dict] = []
    done: set[int] = set()
    for _ in range(tries):
        missed, plan, chosen, ms = pick(tried, target_ms, noise)
        if missed:
            if not step_on():
                break
            continue
        if id(plan) in done:  # within the target on a time that did not pick it
            return missed, plan, chosen, ms, retimed
        i = next(i for i, t in enumerate(tried) if t[2] is plan)
        fresh, chosen = retime(plan, chosen)
        retimed.append({"first_ms": ms, "retimed_ms": fresh})
        tried[i] = (fresh, tried[i][1], plan, chosen)
        done.add(id(plan))
    return (*pick(tried, target_ms, noise), retimed)


def ranks_key(plan: Allocation) -> tuple:
    return tuple(sorted(plan.methods().items()))


def new_plan(options, fixed, budget, points, seen, units=(), tries: int = 8):
    """The allocation at ``budget``, or, if it was measured already, at a budget moved halfway
    toward the nearest larger budget measured; ``(None, budget)`` if every try is known."""
    for _ in range(tries):
        plan = allocate(options, fixed, budget, "ns", units=list(units))
        if ranks_key(plan) not in seen:
            return plan, budget
        above = [b for b, _ in points if b > budget + 1]
        if not above:
            break
        budget = (budget + min(above)) // 2
    return None, budget


def next_budget(points: list[tuple[int, float]], aim_ms: float) -> int:
    """The budget (table ns) whose plan should measure ``aim_ms``, from the plans timed so far.

    The table's scale is off by an unknown factor (layers alone pay conversions a chain of
    layers shares), but budget and measured time still rise together: interpolate between the
    largest budget measured under the aim and the smallest measured over it. The fixed part of
    the model does not scale, so a plain rescale by measured/planned overshoots; it is used only
    when every plan so far landed on one side and no line can be drawn.
    """
    under = [p for p in points if p[1] <= aim_ms]
    over = [p for p in points if p[1] > aim_ms]
    if under and over:
        (b0, m0), (b1, m1) = max(under), min(over)
        if b1 > b0 and m1 > m0:
            return int(b0 + (aim_ms - m0) * (b1 - b0) / (m1 - m0))
        return (b0 + b1) // 2
    (b0, m0), (b1, m1) = sorted(points)[:2]  # all over the aim: the two cheapest plans
    if b1 > b0 and m1 > m0:
        return max(int(b0 - (m0 - aim_ms) * (b1 - b0) / (m1 - m0)), 0)
    return int(b0 * aim_ms / m0)


def unchanged_plan(options, fixed, budget, criterion) -> Allocation:
    """Every layer kept exact, because no plan measured faster than the original model."""
    choice = {n: opts[0] for n, opts in options.items()}
    reasons = dict.fromkeys(choice, "kept: no plan measured faster than the original model")
    return Allocation(choice, reasons, fixed, budget, criterion, unit="ns")

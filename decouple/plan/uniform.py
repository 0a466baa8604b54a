"""Uniform plans: every layer compressed alike, the obvious baseline the allocator must beat.

A uniform plan of one kind (``nd dw-pw``, ``nd pw-dw``, ``cp``, ``tucker``, ``svd``) gives every
layer that kind's most accurate option costing at most the same fraction ``f`` of the layer's
own cost (what TensorLy-Torch's ``rank=0.5`` or a fixed ``--rank`` does); a layer without that
kind (a 1×1 conv under ``cp``) takes its own method at the same fraction. The greedy allocator
is a heuristic for a multiple-choice knapsack and can miss such a plan where the per-layer loss
curves are not convex (CP's seldom are); :func:`best_uniform` finds the one with the lowest loss
under the budget, for :func:`~decouple.plan.allocate.allocate` to compare by the same loss.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

MAX_FRACTIONS = 256  # fractions tried per kind (quantiles of the options' own fractions)


@dataclass(frozen=True)
class UniformPlan:
    """The best uniform plan found: its kind, fraction, choice per layer, cost and loss."""

    kind: str  # "cp", "tucker", "svd", "nd dw-pw", ...
    fraction: float
    choice: dict
    cost: int
    loss: float

    @property
    def label(self) -> str:
        return f"uniform {self.kind} (every layer at <= {self.fraction:.0%} of its cost, or kept)"


def _kind(o) -> str:
    return f"nd {o.order}" if o.method == "nd" else o.method


class _Ladder:
    """One layer's options of one kind (else of its own kinds), by cost, each with the most
    accurate option at no more cost: a pick at any cap is one bisection."""

    def __init__(self, opts: list, kind: str) -> None:
        self.original = opts[0]
        factored = [o for o in opts[1:] if o.rank]
        own = sorted(
            [o for o in factored if _kind(o) == kind] or factored, key=lambda o: (o.cost, o.loss)
        )
        self.costs, self.best = [], []
        for o in own:
            if not self.best or o.loss < self.best[-1].loss:
                self.costs.append(o.cost)
                self.best.append(o)

    def pick(self, fraction: float):
        """The most accurate option costing at most ``fraction`` of the original's."""
        # (1 + 1e-12): the fraction of an option's own cost must pick that option
        i = bisect.bisect_right(self.costs, fraction * self.original.cost * (1 + 1e-12))
        return self.best[i - 1] if i else self.original


def best_uniform(options: dict[str, list], fixed: int, target: int) -> UniformPlan | None:
    """The uniform plan of lowest summed loss whose cost ``fixed + Σ cost`` is within ``target``,
    over every kind on offer; None if no uniform plan fits.

    ``options``: per layer, the original first (as :func:`~decouple.plan.options.rank_options`
    gives them), costs in FLOPs or nanoseconds.
    """
    kinds = sorted({_kind(o) for opts in options.values() for o in opts[1:] if o.rank})
    best = None
    for kind in kinds:
        fracs = sorted(
            {o.cost / opts[0].cost for opts in options.values() for o in opts[1:]
             if o.rank and _kind(o) == kind and opts[0].cost > 0}
        )  # fmt: skip
        if len(fracs) > MAX_FRACTIONS:  # evenly spread quantiles, the smallest and largest kept
            idx = np.unique(np.linspace(0, len(fracs) - 1, MAX_FRACTIONS).round().astype(int))
            fracs = [fracs[i] for i in idx]
        ladders = {n: _Ladder(opts, kind) for n, opts in options.items()}
        for f in fracs:
            choice = {n: ladder.pick(f) for n, ladder in ladders.items()}
            cost = fixed + sum(o.cost for o in choice.values())
            if cost > target:
                continue
            loss = float(sum(o.loss for o in choice.values()))
            if best is None or loss < best.loss:
                best = UniformPlan(kind, f, choice, cost, loss)
    return best

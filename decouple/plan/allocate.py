"""The greedy allocator: per-layer options in, one choice per layer out, under a budget.

Each decouplable layer has options (:mod:`decouple.plan.options`): keep the original conv, or
factor it at one of its candidate ranks, each with a cost (FLOPs, or a measured time) and a loss
(:mod:`decouple.plan.losses`). A greedy pass buys, from the cheapest choice of every layer, the
upgrade with the best loss saved per unit of cost until the budget is spent. A rank that saves
less than ``min_saving`` of a layer's cost is never offered: such a layer is better left exact.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_SAVING = 0.1  # a rank must save at least this fraction of a layer's FLOPs to be offered


@dataclass
class Option:
    """One choice for a layer: ``rank`` 0 keeps the original conv; else ``method`` (``nd``,
    ``cp``, ``tucker``, ``svd``) at ``rank``, in ``order`` (network decoupling only)."""

    rank: int
    cost: int  # FLOPs, or nanoseconds for a latency budget
    loss: float
    method: str = "nd"
    order: str = "dw-pw"

    @property
    def label(self) -> str:
        """How tables show the option: ``keep``, ``nd dw-pw T=3``, ``cp R=40``, ``tucker r=8``,
        ``svd R=64``."""
        if self.rank == 0:
            return "keep"
        if self.method == "nd":
            return f"nd {self.order} T={self.rank}"
        return f"{self.method} {'r' if self.method == 'tucker' else 'R'}={self.rank}"


@dataclass
class Allocation:
    """The chosen option per layer, why, and the cost (FLOPs or ns) it adds up to."""

    choice: dict[str, Option]
    reasons: dict[str, str]
    fixed_flops: int
    target_flops: int
    criterion: str = ""
    unit: str = "FLOPs"  # or "ns": a latency budget, costs measured per layer

    @property
    def total_flops(self) -> int:
        return self.fixed_flops + sum(o.cost for o in self.choice.values())

    def ranks(self) -> dict[str, int]:
        return {n: o.rank for n, o in self.choice.items()}

    def methods(self) -> dict[str, str]:
        """Per layer, what was chosen: ``keep`` or the option's label."""
        return {n: o.label for n, o in self.choice.items()}

    @property
    def loss(self) -> float:
        """The plan's predicted loss: the sum of its layers' losses."""
        return float(sum(o.loss for o in self.choice.values()))


def layer_options(
    losses: list[float], original: int, costs: list[int], min_saving: float, order: str = "dw-pw"
) -> list[Option]:
    """Options worth offering: the original, and every ``T`` saving at least ``min_saving``."""
    opts = [Option(0, original, 0.0)]
    for t, (loss, cost) in enumerate(zip(losses, costs, strict=True), start=1):
        if cost <= (1 - min_saving) * original:
            opts.append(Option(t, cost, max(loss, 0.0), "nd", order))
    return opts


def allocate(
    options: dict[str, list[Option]], fixed_flops: int, target_flops: int, unit: str = "FLOPs"
) -> Allocation:
    """Greedy multiple-choice knapsack: cheapest everywhere, then best loss saved per unit cost.

    Costs are FLOPs, or nanoseconds (``unit="ns"``) for a latency budget; ``fixed_flops`` is the
    cost of everything not on offer.
    """
    choice = {n: min(opts, key=lambda o: (o.cost, o.loss)) for n, opts in options.items()}
    total = fixed_flops + sum(o.cost for o in choice.values())
    while True:
        best, best_ratio = None, 0.0
        for n, opts in options.items():
            cur = choice[n]
            for o in opts:
                d_flops, d_loss = o.cost - cur.cost, cur.loss - o.loss
                if d_flops > 0 and d_loss > 0 and total + d_flops <= target_flops:
                    ratio = d_loss / d_flops
                    if ratio > best_ratio:
                        best, best_ratio = (n, o), ratio
        if best is None:
            break
        n, o = best
        total += o.cost - choice[n].cost
        choice[n] = o
    reasons = {}
    for n, o in choice.items():
        if o.rank == 0:
            saving = len(options[n]) > 1
            reasons[n] = (
                "kept: the budget allows the exact layer"
                if saving
                else ("kept: no rank saves enough FLOPs" if unit == "FLOPs" else "kept: not faster")
            )
        else:
            what = "budget" if unit == "FLOPs" else "latency budget"
            kinds = {(x.method, x.order) for x in options[n] if x.rank}
            if len(kinds) == 1:
                rank = f"T={o.rank}" if o.method == "nd" else o.label
                reasons[n] = f"{rank} by {what} (loss {o.loss:.3g})"
                continue
            # Several methods on offer: say which lost, and by how much, at no more cost.
            rivals = [
                x for x in options[n]
                if x.rank and (x.method, x.order) != (o.method, o.order) and x.cost <= o.cost
            ]  # fmt: skip
            why = f"{o.label} by {what} (loss {o.loss:.3g}"
            if rivals:
                r = min(rivals, key=lambda x: x.loss)
                why += f"; best other method at no more cost: {r.label}, loss {r.loss:.3g}"
            reasons[n] = why + ")"
    return Allocation(choice, reasons, fixed_flops, target_flops, unit=unit)

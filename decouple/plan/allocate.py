"""The greedy allocator: per-layer options in, one choice per layer out, under a budget.

Each decouplable layer has options (:mod:`decouple.plan.options`): keep the original conv, or
factor it at one of its candidate ranks, each with a cost (FLOPs, or a measured time) and a loss
(:mod:`decouple.plan.losses`). A greedy pass buys, from the cheapest choice of every layer, the
upgrade with the best loss saved per unit of cost until the budget is spent. A rank that saves
less than ``min_saving`` of a layer's cost is never offered: such a layer is better left exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .uniform import best_uniform

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
        if self.method == "prune":
            return f"prune k={self.rank}"
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
    # producer -> (chain, channels kept): chains pruned (the producer's option is "prune")
    pruned: dict = field(default_factory=dict)
    # the best uniform plan under the same budget (decouple.plan.uniform): label, loss, and
    # whether it was taken because its loss beat the per-layer allocation's
    uniform: dict = field(default_factory=dict)

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


@dataclass(frozen=True)
class _Joint:
    """One choice for a chain unit: an option for each of its two layers."""

    parts: tuple[tuple[str, Option], tuple[str, Option]]

    @property
    def cost(self) -> int:
        return sum(o.cost for _, o in self.parts)

    @property
    def loss(self) -> float:
        return sum(o.loss for _, o in self.parts)


def _joint_options(options: dict[str, list[Option]], unit) -> list[_Joint]:
    """Every pair of the producer's and consumer's options, and pruning (the consumer kept and
    refit, its cost inside the pruning option's), less the pairs another beats on both counts."""
    p, q = unit.chain.producer, unit.chain.consumer
    pairs = [_Joint(((p, a), (q, b))) for a in options[p] for b in options[q]]
    pairs += [_Joint(((p, o), (q, Option(0, 0, 0.0, "", "")))) for o in unit.options]
    pareto, best = [], float("inf")
    for j in sorted(pairs, key=lambda j: (j.cost, j.loss)):
        if j.loss < best:
            pareto.append(j)
            best = j.loss
    return pareto


def allocate(
    options: dict[str, list[Option]],
    fixed_flops: int,
    target_flops: int,
    unit: str = "FLOPs",
    units: list | None = None,
) -> Allocation:
    """Greedy multiple-choice knapsack: cheapest everywhere, then best loss saved per unit cost.

    Costs are FLOPs, or nanoseconds (``unit="ns"``) for a latency budget; ``fixed_flops`` is the
    cost of everything not on offer. ``units`` (:class:`~decouple.plan.prune_options.ChainUnit`)
    join a producer and its consumer into one choice that may also prune the chain.
    """
    units = units or []
    by_producer = {u.chain.producer: u for u in units}
    slots: dict = dict(options)
    for u in units:
        slots.pop(u.chain.consumer)
        slots[u.chain.producer] = _joint_options(options, u)
    picked = _greedy(slots, fixed_flops, target_flops)
    choice, pruned = {}, {}
    for n, o in picked.items():
        if not isinstance(o, _Joint):
            choice[n] = o
            continue
        choice.update(dict(o.parts))
        (_, po), _ = o.parts
        if po.method == "prune":
            u = by_producer[n]
            pruned[n] = (u.chain, sorted(u.order[: po.rank]))
    choice = {n: choice[n] for n in options}  # the layers' own order
    plan = _explained(options, choice, fixed_flops, target_flops, unit)
    for n, (chain, keep) in pruned.items():
        plan.reasons[chain.consumer] = (
            f"kept, refit on the {len(keep)} of {chain.width} channels {n} keeps"
        )
    plan.pruned = pruned
    return _against_uniform(plan, options, fixed_flops, target_flops, unit)


def _against_uniform(plan: Allocation, options, fixed: int, target: int, unit: str) -> Allocation:
    """``plan``, or the best uniform plan where that one's loss is lower (never worse than the
    obvious baseline, judged by the planner's own loss)."""
    uniform = best_uniform(options, fixed, target)
    if uniform is None:
        return plan
    taken = uniform.loss < plan.loss * (1 - 1e-9)
    record = {"plan": uniform.label, "loss": uniform.loss, "cost": uniform.cost, "taken": taken}
    if not taken:
        plan.uniform = record
        return plan
    out = _explained(options, uniform.choice, fixed, target, unit)  # in the layers' order
    why = f"{uniform.label}: loss {uniform.loss:.4g}, below the per-layer allocation's {plan.loss:.4g}"
    out.reasons = {n: f"{r}; {why}" for n, r in out.reasons.items()}
    out.uniform = record
    return out


def _greedy(slots: dict, fixed_flops: int, target_flops: int) -> dict:
    """The greedy pass of :func:`allocate` over any options with a ``cost`` and a ``loss``."""
    choice = {n: min(opts, key=lambda o: (o.cost, o.loss)) for n, opts in slots.items()}
    total = fixed_flops + sum(o.cost for o in choice.values())
    while True:
        best, best_ratio = None, 0.0
        for n, opts in slots.items():
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
    return choice


def _explained(options, choice, fixed_flops, target_flops, unit) -> Allocation:
    """The allocation with a reason per layer: kept, or which option won and over what."""
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

"""Plans priced by FLOPs inside a latency search: the other half of ``--target-latency``'s candidates.

The latency table prices each layer by its time alone. Inside the model those times do not add
up (a layer alone pays layout conversions that a chain of layers shares, so options that are
fast alone can be favoured for time the model does not get back), and the plan the table thinks
best at a given speed need not be the most accurate one that runs at that speed. :class:`FlopsPricing`
allocates over the same options (those the table found faster), priced by their FLOPs, and hands
the plan back in the table's units; the latency search times such plans whole beside its own and
keeps the least loss among those within the target, whichever pricing found it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .allocate import Allocation, Option, allocate


@dataclass
class FlopsPricing:
    """The table's options (those that run faster) priced again by their FLOPs: a plan allocated
    under a FLOPs budget, handed back in the table's ns so it is judged as the others are."""

    flops_options: dict[str, list[Option]]  # every layer's options, priced in FLOPs
    flops_units: list  # ChainUnit, widths priced in FLOPs
    fixed: int  # FLOPs outside the options (the mids of chains included, as in the FLOPs budget)
    options: dict[str, list[Option]]  # the table's options, priced in ns
    units: list  # ChainUnit, widths priced in ns
    fixed_ns: int  # the model's time outside the options

    def __post_init__(self) -> None:
        # per layer label -> FLOPs, per producer width -> FLOPs; then the ns options re-priced once
        self._layer = {n: {o.label: o.cost for o in opts} for n, opts in self.flops_options.items()}
        self._width = {u.chain.producer: {o.rank: o.cost for o in u.options}
                       for u in self.flops_units}  # fmt: skip
        self._fopts = {n: [replace(o, cost=self._layer[n][o.label]) for o in opts]
                       for n, opts in self.options.items()}  # fmt: skip
        self._funits = [
            replace(u, options=[replace(o, cost=self._width[u.chain.producer][o.rank])
                                for o in u.options])
            for u in self.units
        ]  # fmt: skip
        # and the way back: per layer label -> ns option, per producer width -> ns option
        self._ns_layer = {n: {o.label: o for o in opts} for n, opts in self.options.items()}
        self._ns_width = {u.chain.producer: {o.rank: o for o in u.options} for u in self.units}

    def flops_of(self, plan: Allocation) -> int:
        """The FLOPs of ``plan`` (either unit) for one image."""
        consumers = {chain.consumer for chain, _ in plan.pruned.values()}  # in the producer's cost
        return self.fixed + sum(
            self._width[n][o.rank] if o.method == "prune"
            else 0 if n in consumers else self._layer[n][o.label]
            for n, o in plan.choice.items()
        )  # fmt: skip

    def plan(self, budget: int) -> Allocation:
        """The allocation under ``budget`` FLOPs, in ns."""
        a = allocate(self._fopts, self.fixed, budget, "FLOPs", units=self._funits)
        consumers = {chain.consumer for chain, _ in a.pruned.values()}
        choice = {
            n: self._ns_width[n][o.rank] if o.method == "prune"
            else (o if n in consumers else self._ns_layer[n][o.label])
            for n, o in a.choice.items()
        }  # fmt: skip
        reasons = {
            n: r.replace("no rank saves enough FLOPs", "not faster")  # the table's reason
            if choice[n].rank == 0
            else f"{r}; a plan allocated by FLOPs, kept on its measured time"
            for n, r in a.reasons.items()
        }  # fmt: skip
        total = self.fixed_ns + sum(o.cost for o in choice.values())
        return Allocation(choice, reasons, self.fixed_ns, total, unit="ns", pruned=a.pruned,
                          uniform=a.uniform)  # fmt: skip

    def budget_for(self, budget_ns: int) -> int:
        """The largest FLOPs budget whose plan the table prices within ``budget_ns``: where a
        FLOPs plan should measure what the table's plans of that budget measured (bisection)."""
        lo = self.fixed
        hi = self.fixed + sum(opts[0].cost for opts in self._fopts.values())
        if self.plan(lo).total_flops > budget_ns:
            return lo
        while hi - lo > max(1, hi // 1000):
            mid = (lo + hi) // 2
            if self.plan(mid).total_flops <= budget_ns:
                lo = mid
            else:
                hi = mid
        return lo

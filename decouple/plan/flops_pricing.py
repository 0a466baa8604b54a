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

    flops_options: dict[str, list[Option]]
    flops_units: list  # ChainUnit, widths priced in FLOPs
    fixed: int  # FLOPs outside the options (the mids of chains included, as in the FLOPs budget)

    def _layer(self, name: str, o: Option) -> int:
        return next(x.cost for x in self.flops_options[name] if x.label == o.label)

    def _width(self, producer: str, rank: int) -> int:
        unit = next(u for u in self.flops_units if u.chain.producer == producer)
        return next(x.cost for x in unit.options if x.rank == rank)

    def _cost(self, plan: Allocation, name: str, o: Option) -> int:
        if o.method == "prune":
            return self._width(name, o.rank)
        consumers = {chain.consumer for chain, _ in plan.pruned.values()}
        return 0 if name in consumers else self._layer(name, o)  # in its producer's cost

    def flops_of(self, plan: Allocation) -> int:
        """The FLOPs of ``plan`` (either unit) for one image."""
        return self.fixed + sum(self._cost(plan, n, o) for n, o in plan.choice.items())

    def plan(self, options, units, fixed_ns: int, budget: int) -> Allocation:
        """The allocation under ``budget`` FLOPs over ``options`` and ``units`` (priced in ns),
        in ns."""
        fopts = {n: [replace(o, cost=self._layer(n, o)) for o in opts]
                 for n, opts in options.items()}  # fmt: skip
        funits = [
            replace(u, options=[replace(o, cost=self._width(u.chain.producer, o.rank))
                                for o in u.options])
            for u in units
        ]  # fmt: skip
        a = allocate(fopts, self.fixed, budget, "FLOPs", units=funits)
        ns = {n: {o.label: o for o in opts} for n, opts in options.items()}
        widths = {u.chain.producer: {o.rank: o for o in u.options} for u in units}
        consumers = {chain.consumer for chain, _ in a.pruned.values()}
        choice = {
            n: widths[n][o.rank] if o.method == "prune" else (o if n in consumers else ns[n][o.label])
            for n, o in a.choice.items()
        }  # fmt: skip
        reasons = {
            n: r.replace("no rank saves enough FLOPs", "not faster")  # the table's reason
            if choice[n].rank == 0
            else f"{r}; a plan allocated by FLOPs, kept on its measured time"
            for n, r in a.reasons.items()
        }  # fmt: skip
        total = fixed_ns + sum(o.cost for o in choice.values())
        return Allocation(choice, reasons, fixed_ns, total, unit="ns", pruned=a.pruned,
                          uniform=a.uniform)  # fmt: skip

    def budget_for(self, options, units, fixed_ns: int, budget_ns: int) -> int:
        """The largest FLOPs budget whose plan the table prices within ``budget_ns``: where a
        FLOPs plan should measure what the table's plans of that budget measured (bisection)."""
        lo, hi = self.fixed, self.fixed + sum(self._layer(n, o[0]) for n, o in options.items())
        if self.plan(options, units, fixed_ns, lo).total_flops > budget_ns:
            return lo
        while hi - lo > max(1, hi // 1000):
            mid = (lo + hi) // 2
            if self.plan(options, units, fixed_ns, mid).total_flops <= budget_ns:
                lo = mid
            else:
                hi = mid
        return lo

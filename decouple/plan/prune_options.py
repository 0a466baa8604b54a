"""Channel pruning in the planner: which chains are on offer, what each width costs and loses.

A chain (:mod:`decouple.surgery.chains`) spans two planned layers, its producer and consumer, so
it is allocated as one unit: every pair of the two layers' own options (both factored, one, or
neither), plus pruning to each candidate width with the consumer refit. Chains that share a
layer cannot both be units; the ones with the most FLOPs win (:func:`disjoint_chains`). Pruning is
priced on data only: the loss is the consumer's held-out output error after the refit on its
kept inputs (:func:`~decouple.calibrate.prune.pruned_losses`), so it is offered only with
calibration images and a refit to come. A FLOPs budget prices each width by its FLOPs; a latency
budget by the time of the pruned layers in the target runtime (:func:`timed_units`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ..calibrate.moments import Moments
from ..calibrate.prune import elimination_order, pruned_losses
from ..nn.flops import conv_flops
from ..runtime.realize import time_candidates
from ..surgery.chains import Chain, pruned_modules
from .allocate import Option

MAX_WIDTHS = 48  # candidate widths priced per chain (each a solve of up to the chain's width)
# widths timed per chain under a latency budget (the rest interpolated), besides the full one
PRUNE_PROBES = 4


@dataclass
class ChainUnit:
    """A chain as the allocator sees it: the pruning options (cost counts producer, mids and
    consumer, less the mids' full cost, which stays in the fixed FLOPs) and the channel order."""

    chain: Chain
    options: list[Option]
    order: list[int] = field(default_factory=list)
    flops: int = 0  # producer, mids and consumer at full width


def chain_flops(model, chain: Chain, shapes: dict) -> tuple[int, int]:
    """FLOPs for one image of the chain's producer + consumer, and of its mids."""
    ends = sum(conv_flops(model.get_submodule(n), shapes[n][1])
               for n in (chain.producer, chain.consumer))  # fmt: skip
    mids = sum(
        conv_flops(model.get_submodule(n), shapes[n][1])
        for n in chain.mids
        if n in shapes and hasattr(model.get_submodule(n), "kernel_size")
    )
    return ends, mids


def _advantage(unit: ChainUnit, options: dict[str, list[Option]]) -> float:
    """How many times lower pruning's loss is than the best pair of the layers' own options, at
    half the chain's FLOPs (the same footing: neither cost counts the mids)."""
    mids = unit.flops - sum(options[n][0].cost for n in (unit.chain.producer, unit.chain.consumer))
    half = unit.flops // 2 - mids
    pruned = min((o.loss for o in unit.options if o.cost <= half), default=float("inf"))
    pair = min(
        (a.loss + b.loss for a in options[unit.chain.producer]
         for b in options[unit.chain.consumer] if a.cost + b.cost <= half),
        default=float("inf"),
    )  # fmt: skip
    if pruned == float("inf"):
        return 0.0
    return pair / pruned if pruned > 0 else float("inf")


def select_units(units: list[ChainUnit], options: dict[str, list[Option]]) -> list[ChainUnit]:
    """Units that share no layer (a layer is one unit's only), those where pruning helps most
    first; a chain where it never beats the layers' own options is left out."""
    advantage = {id(u): _advantage(u, options) for u in units}
    taken: set[str] = set()
    out = []
    for u in sorted(units, key=lambda u: -advantage[id(u)]):
        layers = {u.chain.producer, u.chain.consumer, *u.chain.mids}
        if advantage[id(u)] > 1 and not layers & taken:
            out.append(u)
            taken |= layers
    return sorted(out, key=units.index)


def candidate_widths(width: int, max_fraction: float, multiple: int = 1) -> list[int]:
    """Widths ``k`` with ``k ≤ max_fraction · width``, multiples of ``multiple``: all when few,
    else an even grid."""
    top = int(max_fraction * width) // multiple * multiple
    if top < 1:
        return []
    step = multiple * max(1, -(-(top // multiple) // MAX_WIDTHS))
    return sorted({*range(step, top + 1, step), top})


def prune_unit(
    chain: Chain,
    ends_flops: int,
    mids_flops: int,
    moments: tuple[Moments, Moments],
    weight: float,
    min_saving: float,
    ridge: float,
    multiple: int = 1,
) -> ChainUnit:
    """The chain's pruning options (widths in multiples of ``multiple``), from its consumer's
    fit and held-out moments."""
    fit, val = moments
    full = ends_flops + mids_flops
    widths = candidate_widths(chain.width, 1 - min_saving, multiple)
    if not widths:
        return ChainUnit(chain, [], [], full)
    order = elimination_order(fit, ridge)
    losses = pruned_losses(fit, val, order, widths, ridge)
    options = [
        Option(k, full * k // chain.width - mids_flops, max(loss, 0.0) * weight, "prune", "")
        for k, loss in zip(widths, losses, strict=True)
    ]
    return ChainUnit(chain, options, order, full)


def timed_units(
    model, units: list[ChainUnit], inputs, lat, min_saving: float, timer=time_candidates
) -> list[ChainUnit]:
    """``units`` with each pruned width re-priced in ns, as the FLOPs budget prices it: the
    chain's producer, mids and consumer at that width, less the mids' time at full width (which
    stays in the model's fixed time). :data:`PRUNE_PROBES` widths spread over those on offer are
    timed (by ``timer``, :func:`~decouple.runtime.realize.time_candidates`' signature), the rest
    interpolated; a width that does not save ``min_saving`` of the chain's own time is dropped,
    as a rank is."""
    out = []
    for u in units:
        widths = sorted(o.rank for o in u.options)
        if not widths:
            continue
        at = np.linspace(0, len(widths) - 1, min(PRUNE_PROBES, len(widths))).round().astype(int)
        probes = sorted({widths[i] for i in at} | {u.chain.width})
        ends, mids = zip(
            *(_chain_ms(model, u.chain, k, inputs, lat, timer) for k in probes), strict=True
        )
        chain_ns = np.interp(widths, probes, np.add(ends, mids)) * 1e6  # the last probe: full width
        full_ns, mids_ns = (ends[-1] + mids[-1]) * 1e6, mids[-1] * 1e6
        options = [
            replace(o, cost=int(t - mids_ns))
            for o, t in zip(sorted(u.options, key=lambda o: o.rank), chain_ns, strict=True)
            if t <= (1 - min_saving) * full_ns
        ]
        if options:
            out.append(replace(u, options=options))
    return out


def _chain_ms(model, chain, kept: int, inputs, lat, timer) -> tuple[float, float]:
    """Times (ms) of the chain's ends (producer and consumer) and of its mids, pruned to
    ``kept`` channels, each on its own input in the model (narrowed to ``kept`` channels after
    the producer)."""
    ends = mids = 0.0
    for name, m in pruned_modules(model, chain, kept).items():
        x = inputs[name] if name == chain.producer else inputs[name][:, :kept]
        ms = timer({name: m}, x, *lat)[name]
        if name in chain.mids:
            mids += ms
        else:
            ends += ms
    return ends, mids

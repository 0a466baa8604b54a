"""Rank allocation under a global FLOPs budget, for every method.

Each decouplable layer has options: keep the original conv, or factor it at one of its candidate
ranks (network decoupling: every ``T = 1 … full``; CP and Tucker: a grid of ranks, see
:func:`decouple.methods.candidate_ranks`). Every option has a cost (its FLOPs, from the closed
forms, which match ``FlopCounterMode``) and a loss, by one of two criteria:

* ``energy`` (data-free): the fraction of the kernel's squared norm not reproduced,
  ``‖W − Ŵ‖² / ‖W‖²`` (for network decoupling, ``1 − energy(T)`` of the singular values);
* ``data``: the layer's squared relative output error on held-out calibration images, after the
  closed-form refit of its last factor (what calibration will do), with the original network's
  inputs.

A greedy pass then buys, from the cheapest choice of every layer, the upgrade with the best loss
saved per FLOP until the budget is spent. A ``T`` that saves less than ``min_saving`` of a
layer's FLOPs is never offered: such a layer is better left exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .calibrate import Factors, holdout_mask, refit_factored, refit_last
from .decomposition import decouple_weight
from .methods import (
    FactorCache,
    FactorOptions,
    candidate_ranks,
    conv_flops,
    factored_flops,
)
from .moments import Moments

CRITERIA = ("energy", "data")
MIN_SAVING = 0.1  # a rank must save at least this fraction of a layer's FLOPs to be offered


def decoupled_flops(conv: nn.Conv2d, order: str, rank: int, in_hw, out_hw) -> int:
    """FLOPs of ``conv`` decoupled (network decoupling) at ``rank`` for one image."""
    return factored_flops(conv, "nd", order, rank, in_hw, out_hw)


@torch.no_grad()
def probe_shapes(model: nn.Module, names: list[str], input_shape) -> dict[str, tuple]:
    """Spatial size of each named conv's input and output, from one forward pass."""
    shapes = {}

    def record(name, inp, out) -> None:  # a forward hook that returns a value replaces the output
        shapes.setdefault(name, (tuple(inp[0].shape[2:]), tuple(out.shape[2:])))

    hooks = [
        model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: record(n, i, o))
        for n in names
    ]
    try:
        p = next(model.parameters())
        model(torch.zeros((1, *input_shape), dtype=p.dtype, device=p.device))
    finally:
        for h in hooks:
            h.remove()
    return shapes


@torch.no_grad()
def collect_moments(
    model: nn.Module,
    names: list[str],
    images: torch.Tensor,
    holdout: float = 0.125,
    batch_size: int = 64,
) -> dict[str, tuple[Moments, Moments]]:
    """Fit and held-out moments of every named conv, on ``model``'s own inputs and outputs."""
    held = holdout_mask(len(images), holdout)
    moments = {
        n: (Moments.zeros(model.get_submodule(n)), Moments.zeros(model.get_submodule(n)))
        for n in names
    }
    current = {}

    def hook(mod, inp, out, name):
        fit, val = moments[name]
        mask = current["held"]
        if (~mask).any():
            fit.add(mod, inp[0][~mask], out[~mask])
        if mask.any():
            val.add(mod, inp[0][mask], out[mask])

    hooks = [
        model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: hook(m, i, o, n))
        for n in names
    ]
    try:
        for i in range(0, len(images), batch_size):
            current["held"] = held[i : i + batch_size]
            model(images[i : i + batch_size])
    finally:
        for h in hooks:
            h.remove()
    if not held.any():  # nothing held out: judge on the fit itself
        moments = {n: (f, f) for n, (f, _) in moments.items()}
    return moments


def energy_losses(conv: nn.Conv2d, order: str) -> list[float]:
    """``1 − energy(T)`` for ``T = 1 … full``: the squared relative kernel error."""
    full = decouple_weight(conv.weight, None, order, conv.groups)
    return [float(1 - e) for e in full.layer_energy()]


def data_losses(
    conv: nn.Conv2d, order: str, moments: tuple[Moments, Moments], ridge: float = 1e-4
) -> list[float]:
    """Squared relative output error (held out) at ``T = 1 … full``, after a last-factor refit."""
    fit, val = moments
    full = decouple_weight(conv.weight, None, order, conv.groups)
    losses = []
    for t in range(1, full.max_rank + 1):
        fac = refit_last(Factors.from_decoupling(full.truncated(t), conv.bias), fit, ridge)
        losses.append(val.relative_error(fac.weight(), fac.bias) ** 2)
    return losses


def factored_options(
    conv: nn.Conv2d,
    method: str,
    in_hw,
    out_hw,
    min_saving: float,
    moments: tuple[Moments, Moments] | None = None,
    ridge: float = 1e-4,
    cache: FactorCache | None = None,
    options: FactorOptions | None = None,
) -> list[Option]:
    """Options of a CP or Tucker layer: the original conv and every candidate rank, with the
    kernel error (``moments`` None) or the held-out output error after the last-1×1 refit."""
    cache = cache if cache is not None else FactorCache()
    options = options or FactorOptions()
    original = conv_flops(conv, out_hw)
    opts = [Option(0, original, 0.0)]
    bias = None if conv.bias is None else conv.bias.detach().double().cpu()
    for rank, flops in candidate_ranks(
        conv, method, "", in_hw, out_hw, (1 - min_saving) * original
    ):
        done = cache.factor(conv, method, rank, None, "dw-pw", options)
        if moments is None:
            loss = done.rel_error**2
        else:
            fit, val = moments
            _, b, kernel = refit_factored(done.layer.factors(), bias, fit, ridge)
            loss = val.relative_error(kernel, b) ** 2
        opts.append(Option(rank, flops, float(loss)))
    return opts


@dataclass
class Option:
    """One choice for a layer: ``rank`` 0 keeps the original conv."""

    rank: int
    cost: int  # FLOPs, or nanoseconds for a latency budget
    loss: float


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


def layer_options(
    losses: list[float], original: int, costs: list[int], min_saving: float
) -> list[Option]:
    """Options worth offering: the original, and every ``T`` saving at least ``min_saving``."""
    opts = [Option(0, original, 0.0)]
    for t, (loss, cost) in enumerate(zip(losses, costs, strict=True), start=1):
        if cost <= (1 - min_saving) * original:
            opts.append(Option(t, cost, max(loss, 0.0)))
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
                "kept: the budget allows the exact conv"
                if saving
                else ("kept: no T saves enough FLOPs" if unit == "FLOPs" else "kept: not faster")
            )
        else:
            what = "budget" if unit == "FLOPs" else "latency budget"
            reasons[n] = f"T={o.rank} by {what} (loss {o.loss:.3g})"
    return Allocation(choice, reasons, fixed_flops, target_flops, unit=unit)

"""Every decouplable layer's options: keep it, or each candidate rank of its method, with cost and loss.

Network decoupling offers every ``T = 1 … full``; CP, Tucker and svd a grid of ranks
(:func:`decouple.surgery.methods.candidate_ranks`). A 1×1 conv or linear layer is priced in the
one method that applies to it, ``svd``, whatever the method of the k×k convs. Costs are FLOPs from the closed forms, which
match ``FlopCounterMode``. :func:`rank_options` is what both budgets start from: the FLOPs budget
(:mod:`decouple.plan.flops_budget`) allocates over it directly, the latency budget
(:mod:`decouple.plan.latency_budget`) re-prices it with measured times.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import torch
from torch import nn

from ..calibrate.moments import Moments
from ..calibrate.reduced_rank import lowrank_losses
from ..calibrate.refit import refit_factored
from ..factor.nd import max_rank
from ..nn.flops import conv_flops, count_flops, factored_flops
from ..nn.geometry import geometry_of, kernel_of, layer_kind
from ..nn.progress import progress_bar
from ..nn.stopwatch import announce_group, stage
from ..surgery.chains import Chain, find_chains
from ..surgery.config import DecoupleConfig
from ..surgery.methods import FactorCache, FactorOptions, candidate_ranks
from ..surgery.rewrite import decouplable_convs
from .allocate import MIN_SAVING, Option, layer_options
from .losses import (
    CRITERIA,
    collect_moments,
    data_losses,
    energy_losses,
    output_sensitivity,
    probe_shapes,
)
from .prune_options import ChainUnit, chain_flops, prune_unit, select_units

# What ``method="auto"`` prices for every layer: both orders of network decoupling, CP, Tucker-2.
AUTO_KINDS = (("nd", "dw-pw"), ("nd", "pw-dw"), ("cp", ""), ("tucker", ""))


def decoupled_flops(conv: nn.Conv2d, order: str, rank: int, in_hw, out_hw) -> int:
    """FLOPs of ``conv`` decoupled (network decoupling) at ``rank`` for one image."""
    return factored_flops(conv, "nd", order, rank, in_hw, out_hw)


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
    multiple: int = 1,
) -> list[Option]:
    """Options of a CP or Tucker layer: the original conv and every candidate rank (multiples of
    ``multiple``), with the kernel error (``moments`` None) or the held-out output error after
    the last-1×1 refit."""
    cache = cache if cache is not None else FactorCache()
    options = options or FactorOptions()
    original = conv_flops(conv, out_hw)
    opts = [Option(0, original, 0.0)]
    bias = None if conv.bias is None else conv.bias.detach().double().cpu()
    ranks = candidate_ranks(conv, method, "", in_hw, out_hw, (1 - min_saving) * original, multiple)
    cache.prefetch(conv, method, [r for r, _ in ranks], options)
    for rank, flops in ranks:
        done = cache.factor(conv, method, rank, None, "dw-pw", options)
        if moments is None:
            loss = done.rel_error**2
        else:
            fit, val = moments
            _, b, kernel = refit_factored(done.layer.factors(), bias, fit, ridge)
            loss = val.relative_error(kernel, b) ** 2
        opts.append(Option(rank, flops, float(loss), method, ""))
    return opts


def nd_options(
    conv: nn.Conv2d,
    order: str,
    in_hw,
    out_hw,
    min_saving: float,
    moments: tuple[Moments, Moments] | None = None,
    ridge: float = 1e-4,
) -> list[Option]:
    """Options of a network-decoupled layer: the original conv and every ``T`` worth offering."""
    original = conv_flops(conv, out_hw)
    full = max_rank(tuple(conv.weight.shape), order, conv.groups)
    costs = [decoupled_flops(conv, order, t, in_hw, out_hw) for t in range(1, full + 1)]
    losses = (
        energy_losses(conv, order) if moments is None else data_losses(conv, order, moments, ridge)
    )
    return layer_options(losses, original, costs, min_saving, order)


def svd_options(
    layer: nn.Module,
    in_hw,
    out_hw,
    min_saving: float,
    moments: tuple[Moments, Moments] | None = None,
    ridge: float = 1e-4,
    cache: FactorCache | None = None,
    multiple: int = 1,
) -> list[Option]:
    """Options of a low-rank (svd) layer: the original and every candidate rank (multiples of
    ``multiple``), priced from one
    SVD (kernel energy; kept in ``cache`` for the factoring that follows) or one
    eigendecomposition (held-out output error of the reduced-rank refit calibration will do,
    :func:`~decouple.calibrate.reduced_rank.lowrank_losses`)."""
    original = conv_flops(layer, out_hw)
    opts = [Option(0, original, 0.0)]
    ranks = candidate_ranks(layer, "svd", "", in_hw, out_hw, (1 - min_saving) * original, multiple)
    if not ranks:
        return opts
    kernel, groups = kernel_of(layer), geometry_of(layer).groups
    if moments is None:
        kept = (cache if cache is not None else FactorCache()).full_svd(layer).layer_energy()
        losses = [float(1 - kept[r - 1]) for r, _ in ranks]
    else:
        bias = None if layer.bias is None else layer.bias.detach().double().cpu()
        losses = lowrank_losses(kernel, bias, groups, [r for r, _ in ranks], *moments, ridge)
    opts += [
        Option(r, f, max(loss, 0.0), "svd", "") for (r, f), loss in zip(ranks, losses, strict=True)
    ]
    return opts


def layer_kinds(method: str, order: str, layer: nn.Module | None = None):
    """The (method, order) pairs a layer is priced in: all of :data:`AUTO_KINDS` for ``auto``;
    only ``svd`` for a 1×1 conv or linear layer (nothing else applies to them)."""
    if method == "svd" or (layer is not None and layer_kind(layer) != "kxk"):
        return (("svd", ""),)
    return AUTO_KINDS if method == "auto" else ((method, order if method == "nd" else ""),)


def method_and_order(config: DecoupleConfig, name: str, layer=None) -> tuple[str, str]:
    """The method and order layer ``name`` gets (its override's, else the config's; ``svd`` for
    a 1×1 conv or linear ``layer``)."""
    spec = config.spec_for(name)
    method = (spec.method if spec and spec.method else None) or config.method
    order = (spec.order if spec and spec.order else None) or config.order
    if layer is not None and layer_kind(layer) != "kxk":
        return "svd", ""
    return method, order


def rank_options(
    model: nn.Module,
    config: DecoupleConfig,
    input_shape: tuple[int, ...],
    criterion: str = "energy",
    calib_images: torch.Tensor | Iterable | None = None,
    min_saving: float = MIN_SAVING,
    ridge: float = 1e-4,
    cache: FactorCache | None = None,
    progress: bool = False,
    prune: bool = False,
) -> tuple[dict[str, list[Option]], int, int, list[ChainUnit]]:
    """Every decouplable layer's options priced in FLOPs, with the model's and those layers'
    FLOPs, and the chains that may be pruned (:mod:`decouple.plan.prune_options`).

    Each layer is priced with its own method (``config.method`` or its override); ``cache`` keeps
    the CP and Tucker factorizations for the decoupling that follows. ``progress`` shows a bar
    over the layers (CP-ALS at every candidate rank can take minutes). ``prune`` offers channel
    pruning where ``auto`` prices on data (a refit must follow: the caller's promise).
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}; got {criterion!r}")
    if criterion != "energy" and calib_images is None:
        raise ValueError(f"the {criterion} criterion needs calibration images")
    names = decouplable_convs(model, config)
    p = next(model.parameters())
    with stage("counting FLOPs"):
        example = torch.zeros((1, *input_shape), dtype=p.dtype, device=p.device)
        total, _ = count_flops(model, example)
        chains = _prunable(model, config, names) if prune and criterion != "energy" else []
        mids = [m for c in chains for m in c.mids]
        shapes = probe_shapes(model, names + mids, input_shape)
    names = [n for n in names if n in shapes]  # never called (an aux head in eval mode): kept
    flops = {c: chain_flops(model, c, shapes) for c in chains if c.producer in shapes
             and c.consumer in shapes}  # fmt: skip
    consumers = {c.consumer: c for c in flops}  # a layer consumes from one producer at most
    units = []
    moments, weights = {}, {}
    if criterion == "output":
        with stage("sensitivity"):
            weights = output_sensitivity(model, names, calib_images)
    # Moments for a few layers at a time, priced and dropped: all of ResNet-50's hold 2.4 GB.
    chunks = iter(moment_chunks(model, names) if criterion != "energy" else [])
    chunk: list[str] = []
    options, layers_flops = {}, 0
    for name in progress_bar(names, desc="pricing ranks", enabled=progress, unit="layer"):
        if criterion != "energy" and name not in chunk:
            moments = {}  # the last chunk's go before the next chunk's come
            chunk = next(chunks)
            with stage("layer moments"):
                moments = collect_moments(model, chunk, calib_images)
        conv = model.get_submodule(name)
        method, order = method_and_order(config, name)
        in_hw, out_hw = shapes[name]
        original = conv_flops(conv, out_hw)
        layers_flops += original
        opts = [Option(0, original, 0.0, "", "")]
        for m, o in layer_kinds(method, order, conv):
            with stage(f"pricing {m}", announce=False):
                opts += _priced(m, o, conv, in_hw, out_hw, min_saving, moments.get(name), ridge,
                                cache, config)[1:]  # fmt: skip
        w = weights.get(name, 1.0)  # the layer's measured effect on the network's output
        options[name] = [replace(o, loss=o.loss * w) for o in opts]
        c = consumers.get(name)
        if c is not None and name in moments:
            with stage("pricing prune", announce=False):
                units.append(
                    prune_unit(
                        c, *flops[c], moments[name], w, min_saving, ridge, config.rank_multiple
                    )
                )
    announce_group("pricing")  # one line for the per-method stages, entered layer by layer
    return options, total, layers_flops, select_units(units, options)


def _prunable(model: nn.Module, config: DecoupleConfig, names: list[str]) -> list[Chain]:
    """Chains between planned layers under ``auto``, none of whose layers has an override, and
    whose consumer does not end a residual branch: there, on the MobileNetV2-style network of
    the shared assets, the plans that pruned lost more top-1 than those that did not, over
    three calibration samples (``experiments/mbv2_accuracy.py``), though their priced loss was
    lower: the per-layer loss does not see how a pruned branch's error meets the skip path's."""
    if config.method != "auto":
        return []
    return [
        c for c in find_chains(model, names)
        if not c.joins_sum and not set(c.mids) & set(names)
        and not any(config.spec_for(n) for n in (c.producer, c.consumer, *c.mids))
    ]  # fmt: skip


# The planner's moments held at once (768 MiB; one pass over the images for each chunk)
MOMENT_BYTES = 3 << 28


def moment_chunks(
    model: nn.Module, names: list[str], budget: int = MOMENT_BYTES
) -> list[list[str]]:
    """``names`` in order, cut into runs whose fit and held-out moments take at most ``budget``
    bytes (a layer larger than that alone)."""
    chunks: list[list[str]] = [[]]
    used = 0
    for name in names:
        layer = model.get_submodule(name)
        size = 2 * Moments.zeros_bytes(layer)
        if chunks[-1] and used + size > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(name)
        used += size
    return [c for c in chunks if c]


def _priced(m, o, conv, in_hw, out_hw, min_saving, moments, ridge, cache, config) -> list[Option]:
    """One layer's options in method ``m`` (order ``o``), the original first."""
    multiple = config.rank_multiple
    if m == "svd":
        return svd_options(conv, in_hw, out_hw, min_saving, moments, ridge, cache, multiple)
    if m == "nd":
        return nd_options(conv, o, in_hw, out_hw, min_saving, moments, ridge)
    return factored_options(conv, m, in_hw, out_hw, min_saving, moments, ridge, cache,
                            config.factor_options(), multiple)  # fmt: skip


def allocated_config(config: DecoupleConfig, choice: dict[str, Option | int]) -> DecoupleConfig:
    """``config`` with the allocated per-layer options (or bare ranks, in the config's method) as
    overrides (rank 0: skip); its ``"skip"`` overrides are kept, its global rank or energy
    dropped, and ``auto`` resolved to each layer's method."""
    skips = {k: s for k, s in config.overrides if s.skip}
    chosen = {}
    for n, o in choice.items():
        if isinstance(o, Option):
            rank, method, order = o.rank, o.method, o.order or config.order
        else:
            (method, order), rank = method_and_order(config, n), o
            order = order or config.order
        # A pruned chain's layers stay plain layers here: pruning is its own surgery.
        chosen[n] = (
            "skip" if rank == 0 or method == "prune"
            else {"rank": rank, "method": method, "order": order}
        )  # fmt: skip
    method = "nd" if config.method == "auto" else config.method
    return replace(config, rank=None, energy=None, method=method, overrides={**skips, **chosen})

"""Model surgery: replace every regular k×k ``nn.Conv2d`` of a model by its factored layer.

``decouple_(model, config)`` is the one in-place verb (after torchao's ``quantize_``). It plans
first (:mod:`decouple.surgery.sites`: 1×1 convs, depthwise convs, convs with their own forward,
stems (at most 4 input channels, unless ``include_stem`` or an override names them) and
already-factored layers are left alone; a model with factored layers and no conv left to decouple
is refused as already decoupled; per-layer overrides apply), checks the whole plan, and only then changes the model, inside a
:func:`~decouple.nn.transaction.transaction`: a failure halfway restores the model exactly. It
returns one record per conv met. The layer is a ``DecoupledConv2d`` (network decoupling, the
default), a ``CPConv2d`` or a ``TuckerConv2d``, as ``config.method`` or a per-layer override says.
A recipe (:mod:`decouple.surgery.recipe`) replays the same change on a fresh architecture.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..nn.geometry import geometry_of, is_linear
from ..nn.guards import check_module, type_error
from ..nn.transaction import transaction
from .bn_fold import fold_batchnorm_
from .config import DecoupleConfig, LayerSpec
from .methods import FactorCache, factor_conv, layer_method, recipe_entry
from .sites import (
    DECOUPLE,
    FACTORED,
    SHARED,
    Site,
    candidates,
    check_sites,
    conv_sites,
    why_not_decouplable,
)

__all__ = [
    "LayerRecord",
    "decouplable_convs",
    "decouple_",
    "decouple_with_fold_info",
    "why_not_decouplable",
]


@dataclass
class LayerRecord:
    """What happened to one convolution.

    ``action`` is ``"decoupled"`` or ``"kept"`` (``"pruned"`` for a chain's producer after
    :func:`decouple.compress_`); ``reason`` says why (or how ``T`` was chosen).
    ``kind`` is ``conv`` or ``linear`` (a linear layer reads as a 1×1 conv). ``method`` is ``nd``,
    ``cp``, ``tucker`` or ``svd``; ``rank`` the number of terms (Tucker: the larger of its two
    ranks; ``rank_text`` shows both). ``rel_error`` is the relative Frobenius error of
    the kernel, ``energy`` the fraction of its squared norm reproduced. ``converged`` and
    ``iterations`` report CP-ALS. FLOPs are filled in by :func:`decouple.report.build_report`.
    """

    name: str
    action: str
    reason: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    groups: int
    order: str | None = None
    rank: int | None = None
    max_rank: int | None = None
    energy: float | None = None
    rel_error: float | None = None
    params_before: int = 0
    params_after: int = 0
    bn_folded: str | None = None
    fused: dict | None = None  # 1×1 pairs fused into this conv, in order (surgery.linear_fuse)
    flops_before: int | None = None
    flops_after: int | None = None
    method: str | None = None
    rank_text: str | None = None
    converged: bool | None = None
    iterations: int | None = None
    structure: dict | None = None  # what a recipe needs to rebuild the layer
    realization: str | None = None  # set when realizations were timed (decouple.runtime.realize)
    latency_before_ms: float | None = None  # the layer alone, on its real input
    latency_after_ms: float | None = None
    kind: str = "conv"

    def to_dict(self) -> dict:
        return asdict(self)


def _n_params(module: nn.Module) -> int:
    return sum(
        p.numel()
        for p in module.parameters()
        if not isinstance(p, nn.parameter.UninitializedParameter)
    )


def _base_record(name: str, conv: nn.Module, action: str, reason: str) -> LayerRecord:
    g = geometry_of(conv)
    return LayerRecord(
        name=name,
        action=action,
        reason=reason,
        in_channels=g.in_channels,
        out_channels=g.out_channels,
        kernel_size=tuple(g.kernel_size),
        stride=tuple(g.stride),
        groups=g.groups,
        params_before=_n_params(conv),
        params_after=_n_params(conv),
        kind="linear" if is_linear(conv) else "conv",
    )


def fused_record(name: str, conv: nn.Module, into: str) -> LayerRecord:
    """The record of a 1×1 conv fused into ``into`` (:mod:`decouple.surgery.linear_fuse`): gone,
    its weights now part of that conv's."""
    rec = _base_record(name, conv, "kept", f"fused exactly into {into!r} (a linear 1x1 pair)")
    rec.params_after = 0
    return rec


def _decouple_conv(
    name: str, conv: nn.Conv2d, spec: LayerSpec, config: DecoupleConfig, cache: FactorCache | None
) -> tuple[nn.Module, LayerRecord]:
    if not torch.isfinite(conv.weight).all():  # checked before; BN folding can still make it so
        raise ValueError(f"layer {name!r} has NaN or Inf weights")
    args = (conv, spec.method, spec.rank, spec.energy, spec.order, config.factor_options())
    done = cache.factor(*args) if cache is not None else factor_conv(*args)
    if spec.method == "svd" and _n_params(done.layer) >= _n_params(conv):
        # Both layers run at the original's output positions: no fewer weights, no fewer FLOPs.
        why = f"kept: svd rank {done.rank} saves nothing ({_n_params(done.layer):,} params)"
        return conv, _base_record(name, conv, "kept", why)
    layer = done.layer
    layer.train(conv.training)
    rec = _base_record(name, conv, "decoupled", done.how)
    rec.method, rec.rank, rec.rank_text = spec.method, done.rank, done.rank_text
    rec.order = spec.order if spec.method == "nd" else None
    rec.max_rank = done.max_rank
    rec.energy, rec.rel_error = done.energy, done.rel_error
    rec.converged, rec.iterations = done.converged, done.iterations
    rec.params_after = _n_params(layer)
    rec.structure = recipe_entry(layer)
    return layer, rec


def decouple_(
    model: nn.Module,
    config: DecoupleConfig,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> list[LayerRecord]:
    """Decouple the convolutions of ``model`` in place, all or nothing.

    Parameters
    ----------
    model : nn.Module
        Changed in place; put it in eval mode first if ``config.fold_bn`` is set (the default).
    config : DecoupleConfig
        Rank rule, order, BN folding and per-layer overrides.
    filter_fn : callable, optional
        ``filter_fn(module, name) -> bool``; convs for which it returns False are kept.

    Returns
    -------
    list of LayerRecord
        One per ``nn.Conv2d`` or factored layer met, in definition order. Folded BNs are
        named on their conv's record (``bn_folded``); :func:`decouple_with_fold_info` also says
        why folding could not run on a model ``torch.fx`` cannot trace. An ``nn.Conv2d``
        subclass with its own ``forward`` is kept (``"kept: custom forward (MyConv)"``).

    Raises
    ------
    TypeError
        ``model`` is not an eager ``nn.Module`` (e.g. TorchScript), or ``config`` is not a
        :class:`DecoupleConfig`.
    ValueError
        The model has no ``nn.Conv2d``, is already decoupled (factored layers and no conv
        left to decouple), holds NaN or Inf weights in a conv to decouple, is on
        the meta device, or has BatchNorms to fold in training mode; or a layer's method cannot
        run (``auto``). Checked before anything changes; on any failure the model is restored.
    """
    return decouple_with_fold_info(model, config, filter_fn)[0]


def decouple_with_fold_info(
    model: nn.Module,
    config: DecoupleConfig,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    cache: FactorCache | None = None,
) -> tuple[list[LayerRecord], str | None]:
    """:func:`decouple_`, also returning why BN folding could not run (``None`` if it ran or was off).

    ``cache`` (a :class:`~decouple.surgery.methods.FactorCache`) reuses factorizations computed before.
    """
    check_module(model, "decouple_")
    if not isinstance(config, DecoupleConfig):
        raise type_error("config", "a DecoupleConfig", config)
    if filter_fn is not None and not callable(filter_fn):
        raise type_error("filter_fn", "a callable (module, name) -> bool", filter_fn)
    sites = conv_sites(model, config, filter_fn)
    check_sites(model, sites)
    with transaction(model, "decouple_"):
        folded, fold_error = {}, None
        if config.fold_bn:
            result = fold_batchnorm_(model)
            folded, fold_error = result.folded, result.error
        records = _rewrite(sites, config, cache, folded)
    return records, fold_error


def _rewrite(
    sites: list[Site], config: DecoupleConfig, cache: FactorCache | None, folded: dict[str, str]
) -> list[LayerRecord]:
    """Carry out the plan of :func:`conv_sites`; one record per site but shared ones."""
    records: list[LayerRecord] = []
    done: dict[int, nn.Module] = {}  # a module shared under two names is replaced once
    for s in sites:
        if s.action == FACTORED:
            rec = _base_record(s.name, s.module, "kept", s.reason)
            rec.method, rec.rank = layer_method(s.module), s.module.rank
            rec.order = getattr(s.module, "order", None)
            records.append(rec)
            continue
        if s.action == SHARED:
            setattr(s.parent, s.attr, done[id(s.module)])
            continue
        if s.action == DECOUPLE:
            new, rec = _decouple_conv(s.name, s.module, s.spec, config, cache)
        else:
            new, rec = s.module, _base_record(s.name, s.module, "kept", s.reason)
        rec.bn_folded = folded.get(s.name)
        records.append(rec)
        done[id(s.module)] = new
        if new is not s.module:
            setattr(s.parent, s.attr, new)
    return records


def decouplable_convs(model: nn.Module, config: DecoupleConfig) -> list[str]:
    """Names of the convs that ``decouple_`` may touch under ``config`` (ignoring its ranks)."""
    return [s.name for s in candidates(conv_sites(model, config))]

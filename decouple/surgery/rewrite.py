"""Model surgery: replace every regular k×k ``nn.Conv2d`` of a model by its factored layer.

``decouple_(model, config)`` is the one in-place verb (after torchao's ``quantize_``): it walks
``named_children``, leaves 1×1 convs, depthwise convs and already-factored layers alone (so running
it twice changes nothing), applies per-layer overrides, and returns one record per conv it met.
The layer is a ``DecoupledConv2d`` (network decoupling, the default), a ``CPConv2d`` or a
``TuckerConv2d``, as ``config.method`` or a per-layer override says. A recipe
(:mod:`decouple.surgery.recipe`) replays the same change on a fresh architecture.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .bn_fold import fold_batchnorm_
from .config import DecoupleConfig
from .methods import (
    FACTORED_LAYERS,
    FactorCache,
    factor_conv,
    is_factored,
    layer_method,
    recipe_entry,
)


@dataclass
class LayerRecord:
    """What happened to one convolution.

    ``action`` is ``"decoupled"`` or ``"kept"``; ``reason`` says why (or how ``T`` was chosen).
    ``method`` is ``nd``, ``cp`` or ``tucker``; ``rank`` the number of terms (Tucker: the larger
    of its two ranks; ``rank_text`` shows both). ``rel_error`` is the relative Frobenius error of
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

    def to_dict(self) -> dict:
        return asdict(self)


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _base_record(name: str, conv: nn.Module, action: str, reason: str) -> LayerRecord:
    return LayerRecord(
        name=name,
        action=action,
        reason=reason,
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=tuple(conv.kernel_size),
        stride=tuple(conv.stride),
        groups=conv.groups,
        params_before=_n_params(conv),
        params_after=_n_params(conv),
    )


def why_not_decouplable(conv: nn.Conv2d) -> str | None:
    """Reason a conv is left as it is, or ``None`` if network decoupling applies to it."""
    if isinstance(conv.weight, nn.parameter.UninitializedParameter):
        return "lazy conv not initialised yet"
    kh, kw = conv.kernel_size
    if kh * kw == 1:
        return "1x1 conv"
    if conv.groups > 1 and conv.groups == conv.in_channels:
        return "depthwise conv"
    return None


def _decouple_conv(
    name: str, conv: nn.Conv2d, config: DecoupleConfig, cache: FactorCache | None
) -> tuple[nn.Module, LayerRecord]:
    reason = why_not_decouplable(conv)
    if reason is not None:
        return conv, _base_record(name, conv, "kept", reason)
    spec = config.resolve(name)
    if spec.skip:
        why = "skipped by override" if config.spec_for(name) else "no rank or energy for this layer"
        return conv, _base_record(name, conv, "kept", why)
    if not torch.isfinite(conv.weight).all():
        raise ValueError(f"layer {name!r} has NaN or Inf weights")
    args = (conv, spec.method, spec.rank, spec.energy, spec.order, config.factor_options())
    done = cache.factor(*args) if cache is not None else factor_conv(*args)
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
    """Decouple the convolutions of ``model`` in place.

    Parameters
    ----------
    model : nn.Module
        Changed in place; put it in eval mode first if ``config.fold_bn`` is set.
    config : DecoupleConfig
        Rank rule, order, BN folding and per-layer overrides.
    filter_fn : callable, optional
        ``filter_fn(module, name) -> bool``; convs for which it returns False are kept.

    Returns
    -------
    list of LayerRecord
        One per ``nn.Conv2d`` or factored layer met, in definition order. Folded BNs are
        named on their conv's record (``bn_folded``); :func:`decouple_with_fold_info` also says
        why folding could not run on a model ``torch.fx`` cannot trace.
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
    folded, fold_error = {}, None
    if config.fold_bn:
        result = fold_batchnorm_(model)
        folded, fold_error = result.folded, result.error
    records: list[LayerRecord] = []
    done: dict[int, nn.Module] = {}  # a module shared under two names is replaced once

    def walk(parent: nn.Module, prefix: str) -> None:
        # _modules rather than named_children(): the latter hides a module's second occurrence.
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            name = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, FACTORED_LAYERS):
                rec = _base_record(name, child, "kept", "already decoupled")
                rec.method, rec.rank = layer_method(child), child.rank
                rec.order = getattr(child, "order", None)
                records.append(rec)
            elif isinstance(child, nn.Conv2d):
                if id(child) in done:
                    setattr(parent, child_name, done[id(child)])
                    continue
                if filter_fn is not None and not filter_fn(child, name):
                    new, rec = child, _base_record(name, child, "kept", "excluded by filter_fn")
                else:
                    new, rec = _decouple_conv(name, child, config, cache)
                rec.bn_folded = folded.get(name)
                records.append(rec)
                done[id(child)] = new
                if new is not child:
                    setattr(parent, child_name, new)
            else:
                walk(child, name)

    walk(model, "")
    return records, fold_error


def decouplable_convs(model: nn.Module, config: DecoupleConfig) -> list[str]:
    """Names of the convs that ``decouple_`` may touch under ``config`` (ignoring its ranks)."""
    names, inside = [], []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue  # the convs inside a factored layer are its parts, not candidates
        if is_factored(m):
            inside.append(name)
            continue
        spec = config.spec_for(name)
        if type(m) is nn.Conv2d and why_not_decouplable(m) is None and not (spec and spec.skip):
            names.append(name)
    return names

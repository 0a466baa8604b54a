"""Model surgery: replace every regular k×k ``nn.Conv2d`` of a model by a ``DecoupledConv2d``.

``decouple_(model, config)`` is the one in-place verb (after torchao's ``quantize_``): it walks
``named_children``, leaves 1×1 convs, depthwise convs and already-decoupled layers alone (so running
it twice changes nothing), applies per-layer overrides, and returns one record per conv it met.
A *recipe* (plain JSON) replays the same structural change on a fresh architecture so that a saved
``state_dict`` of the decoupled model loads into it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .bn_fold import apply_fold_structure_, fold_batchnorm_
from .config import DecoupleConfig
from .decomposition import decouple_weight, rank_for_energy
from .layers import DecoupledConv2d

RECIPE_FORMAT = "decouple-recipe"
RECIPE_VERSION = 1


@dataclass
class LayerRecord:
    """What happened to one convolution.

    ``action`` is ``"decoupled"`` or ``"kept"``; ``reason`` says why (or how ``T`` was chosen).
    ``rel_error`` is the relative Frobenius error of the kernel, ``energy`` the fraction of its
    squared norm kept. FLOPs are filled in by :func:`decouple.report.build_report`.
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
    name: str, conv: nn.Conv2d, config: DecoupleConfig
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
    full = decouple_weight(conv.weight, None, spec.order, conv.groups)
    if spec.energy is not None:
        t = rank_for_energy(full.singular_values, spec.energy)
        how = f"energy {spec.energy:g} -> T={t}"
    else:
        t = min(spec.rank, full.max_rank)
        how = f"rank {spec.rank}" + (f" clipped to full rank {t}" if spec.rank > t else "")
    dec = full.truncated(t)
    layer = DecoupledConv2d.from_decoupling(conv, dec)
    layer.train(conv.training)
    rec = _base_record(name, conv, "decoupled", how)
    rec.order, rec.rank, rec.max_rank = spec.order, t, full.max_rank
    rec.energy = float(full.layer_energy()[t - 1])
    rec.rel_error = dec.relative_error()
    rec.params_after = _n_params(layer)
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
        One per ``nn.Conv2d`` or ``DecoupledConv2d`` met, in definition order. Folded BNs are
        named on their conv's record (``bn_folded``); :func:`decouple_with_fold_info` also says
        why folding could not run on a model ``torch.fx`` cannot trace.
    """
    return decouple_with_fold_info(model, config, filter_fn)[0]


def decouple_with_fold_info(
    model: nn.Module,
    config: DecoupleConfig,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> tuple[list[LayerRecord], str | None]:
    """:func:`decouple_`, also returning why BN folding could not run (``None`` if it ran or was off)."""
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
            if isinstance(child, DecoupledConv2d):
                rec = _base_record(name, child, "kept", "already decoupled")
                rec.order, rec.rank = child.order, child.rank
                records.append(rec)
            elif isinstance(child, nn.Conv2d):
                if id(child) in done:
                    setattr(parent, child_name, done[id(child)])
                    continue
                if filter_fn is not None and not filter_fn(child, name):
                    new, rec = child, _base_record(name, child, "kept", "excluded by filter_fn")
                else:
                    new, rec = _decouple_conv(name, child, config)
                rec.bn_folded = folded.get(name)
                records.append(rec)
                done[id(child)] = new
                if new is not child:
                    setattr(parent, child_name, new)
            else:
                walk(child, name)

    walk(model, "")
    return records, fold_error


def make_recipe(records: list[LayerRecord], config: DecoupleConfig | None = None) -> dict:
    """A JSON-ready description of the structural change that :func:`apply_recipe_` replays."""
    return {
        "format": RECIPE_FORMAT,
        "version": RECIPE_VERSION,
        "config": config.to_dict() if config is not None else None,
        "folded_bn": {r.name: r.bn_folded for r in records if r.bn_folded},
        "layers": {
            r.name: {"rank": r.rank, "order": r.order} for r in records if r.action == "decoupled"
        },
    }


def apply_recipe_(model: nn.Module, recipe: dict) -> nn.Module:
    """Give a freshly built ``model`` the structure described by ``recipe``, in place.

    Folded BNs become ``nn.Identity`` (their convs gain a bias) and each listed conv becomes an
    empty ``DecoupledConv2d`` of the recorded rank and order. Load the decoupled ``state_dict``
    afterwards. Returns ``model``.
    """
    if not isinstance(recipe, dict) or recipe.get("format") != RECIPE_FORMAT:
        raise ValueError("not a decouple recipe (missing format: 'decouple-recipe')")
    if recipe.get("version") != RECIPE_VERSION:
        raise ValueError(
            f"unsupported recipe version {recipe.get('version')!r}; this is {RECIPE_VERSION}"
        )
    apply_fold_structure_(model, recipe.get("folded_bn") or {})
    for name, spec in recipe["layers"].items():
        conv = model.get_submodule(name)
        if isinstance(conv, DecoupledConv2d):
            continue
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"recipe layer {name!r} is a {type(conv).__name__}, not a Conv2d")
        layer = DecoupledConv2d.empty_like(conv, spec["rank"], spec["order"])
        model.set_submodule(name, layer)
    return model

"""Where a model's convolutions are and what ``decouple_`` will do with each, decided up front.

:func:`conv_sites` walks the module tree once, without changing it, and returns one
:class:`Site` per convolution or factored layer met; :func:`check_sites` then refuses what cannot
be done (no conv at all, NaN weights, a method that needs a budget) before anything changes.
What counts as a conv is :func:`decouple.nn.discover.is_plain_conv2d`, here and everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..nn.discover import conv_census, custom_forward_reason
from ..nn.geometry import layer_kind
from .config import DecoupleConfig, LayerSpec
from .methods import METHODS, is_factored

NO_RULE = "no rank or energy for this layer"
STEM = "kept: stem"  # the start of a kept stem's reason
DECOUPLE, KEPT, FACTORED, SHARED = "decouple", "kept", "factored", "shared"


@dataclass(frozen=True, eq=False)
class Site:
    """One place in the module tree that holds a conv (``parent.<attr>``) and its plan.

    ``action`` is ``decouple`` (with the resolved ``spec``), ``kept`` (with a ``reason``),
    ``factored`` (already decoupled) or ``shared`` (a conv met before under another name).
    A ``decouple`` site whose settings contradict each other carries the ``problem``.
    """

    parent: nn.Module
    attr: str
    name: str
    module: nn.Module
    action: str
    reason: str | None = None
    spec: LayerSpec | None = None
    problem: str | None = None  # why its settings cannot run (raised by check_sites)


def why_not_decouplable(conv: nn.Module) -> str | None:
    """Reason a conv or linear layer is left as it is whatever the method, or ``None``.

    A 1×1 conv or a linear layer is decouplable: the low-rank method (``svd``) applies to it,
    the k×k methods do not (:func:`kind_reason`).
    """
    custom = custom_forward_reason(conv)
    if custom is not None:
        return custom
    if isinstance(conv.weight, nn.parameter.UninitializedParameter):
        kind = "linear layer" if isinstance(conv, nn.Linear) else "conv"
        return f"lazy {kind} not initialised yet"
    if isinstance(conv, nn.Conv2d) and conv.groups > 1 and conv.groups == conv.in_channels:
        return "depthwise conv"
    return None


def kind_reason(kind: str) -> str:
    """Why a 1×1 conv or linear layer is kept under a k×k method's global rule."""
    what = "1x1 conv" if kind == "1x1" else "linear layer"
    return f"{what} (low-rank it with --method svd, an override or a budget)"


def stem_reason(in_channels: int) -> str:
    """Why a stem is kept: ``"kept: stem (3 input channels; --include-stem to decouple it)"``."""
    channels = "channel" if in_channels == 1 else "channels"
    return f"{STEM} ({in_channels} input {channels}; --include-stem to decouple it)"


def _plan_conv(parent, attr, name, conv, config, filter_fn) -> Site:
    if filter_fn is not None and not filter_fn(conv, name):
        return Site(parent, attr, name, conv, KEPT, "excluded by filter_fn")
    reason = why_not_decouplable(conv)
    if reason is not None:
        return Site(parent, attr, name, conv, KEPT, reason)
    own = config.spec_for(name)
    if own is not None and own.skip:
        return Site(parent, attr, name, conv, KEPT, "skipped by override")
    kind = layer_kind(conv)
    # before NO_RULE: budgets skip stems too
    if kind != "linear" and config.keeps_stem(name, conv.in_channels):
        return Site(parent, attr, name, conv, KEPT, stem_reason(conv.in_channels))
    try:
        spec = config.resolve(name)
    except ValueError as e:  # e.g. the config's method 'auto' with this layer's own rank
        return Site(parent, attr, name, conv, DECOUPLE, problem=f"layer {name!r}: {e}")
    if spec.skip:
        return Site(parent, attr, name, conv, KEPT, NO_RULE)
    if kind != "kxk" and spec.method != "svd":
        # Only the low-rank method applies to a 1x1 conv or linear layer: an override naming the
        # layer with a rank or energy (and no other method) means it; a k×k method's global
        # rule does not (a T of 2 terms per channel says nothing about a channel rank).
        if own is None or own.method not in (None, "svd") or not config.names_layer(name):
            return Site(parent, attr, name, conv, KEPT, kind_reason(kind))
        spec = replace(spec, method="svd")
    return Site(parent, attr, name, conv, DECOUPLE, spec=spec)


def conv_sites(
    model: nn.Module,
    config: DecoupleConfig,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> list[Site]:
    """Every ``nn.Conv2d``, ``nn.Linear`` and factored layer of ``model`` in definition order,
    with its plan.

    Walks ``_modules`` rather than ``named_children()`` (which hides a module's second
    occurrence), and never enters a conv or a factored layer: the convs inside a factored layer
    are its parts, not candidates.
    """
    sites: list[Site] = []
    seen: set[int] = set()

    def walk(parent: nn.Module, prefix: str) -> None:
        for attr, child in list(parent._modules.items()):
            if child is None:
                continue
            name = f"{prefix}.{attr}" if prefix else attr
            if is_factored(child):
                sites.append(Site(parent, attr, name, child, FACTORED, "already decoupled"))
            elif isinstance(child, nn.MultiheadAttention):
                continue  # it reads its out_proj's weight directly, never calls it
            elif not isinstance(child, (nn.Conv2d, nn.Linear)):
                walk(child, name)
            elif id(child) in seen:
                sites.append(Site(parent, attr, name, child, SHARED))
            else:
                seen.add(id(child))
                sites.append(_plan_conv(parent, attr, name, child, config, filter_fn))

    walk(model, "")
    return sites


def candidates(sites: list[Site]) -> list[Site]:
    """The convs a rank (from the config or a budget) would decouple."""
    return [s for s in sites if s.action == DECOUPLE or s.reason == NO_RULE]


def check_sites(model: nn.Module, sites: list[Site], specs: bool = True) -> None:
    """Refuse, before any change, a plan that would fail halfway.

    Raises
    ------
    ValueError
        No ``nn.Conv2d`` (nor factored layer) at all, factored layers and no conv left to
        decouple (the model is already decoupled), a conv to decouple with NaN or Inf
        weights, or (``specs``) a layer whose resolved method cannot run here: ``auto`` (a budget
        chooses it; see :func:`decouple.pipeline.compress_`) or CP with an energy.
    """
    if not sites:
        raise ValueError(
            f"nothing to decouple: no nn.Conv2d or nn.Linear in the model (found {conv_census(model)})"
        )
    factored = [s for s in sites if s.action == FACTORED]
    if factored and not candidates(sites):
        raise ValueError(
            f"the model is already decoupled ({len(factored)} factored layers, no Conv2d left to "
            "decouple); decouple the original model"
        )
    for s in candidates(sites):
        if not torch.isfinite(s.module.weight.detach()).all():
            raise ValueError(f"layer {s.name!r} has NaN or Inf weights")
        if not specs:
            continue
        if s.problem is not None:
            raise ValueError(s.problem)
        if s.spec is None:  # no rank or energy for it: kept
            continue
        if s.spec.method not in METHODS:
            raise ValueError(
                f"layer {s.name!r}: method {s.spec.method!r} chooses each layer's method under a "
                "budget; decouple_ needs nd, cp or tucker (for a budget use compress_ with "
                "target_flops or target_latency)"
            )
        if s.spec.method == "cp" and s.spec.energy is not None:
            raise ValueError(
                f"layer {s.name!r}: CP takes a rank, not an energy (ALS has no closed-form "
                "energy rule)"
            )

"""Fold BatchNorm into the convolution that feeds it, before decoupling.

Folding first makes the decoupling approximate the kernel the network actually applies (BN's
per-channel scale included) and removes the BN at inference. A pair is folded only when the graph
proves it safe: the conv's output goes to that BN and nowhere else, and each module is called once.
The graph comes from ``torch.fx``; a model it cannot trace is left unfolded, with the reason.
Folding bakes in the running statistics, which only eval mode applies: a BN to fold that is in
training mode is refused (``ValueError``) rather than folded into a different function.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from ..nn.discover import is_plain_conv2d
from ..nn.guards import check_module
from ..nn.transaction import transaction


@dataclass
class FoldResult:
    """Outcome of :func:`fold_batchnorm_`: ``folded`` maps conv name to BN name."""

    folded: dict[str, str] = field(default_factory=dict)
    error: str | None = None


class _Tracer(fx.Tracer):
    """Plain convs stay leaves, wherever their class is defined (fx would trace through a
    subclass defined outside ``torch.nn`` and lose the module call)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_plain_conv2d(m) or super().is_leaf_module(m, qualname)


class FoldedBatchNorm(nn.Identity):
    """What a folded BatchNorm becomes: the identity, remembering the conv it went into, so a
    folded model alone says what :func:`apply_fold_structure_` must replay (see
    :func:`decouple.surgery.recipe.recipe_of_model`)."""

    def __init__(self, into: str) -> None:
        super().__init__()
        self.into = into

    def extra_repr(self) -> str:
        return f"folded into {self.into!r}"


def folded_pairs(model: nn.Module) -> dict[str, str]:
    """``{conv: bn}`` of every BatchNorm of ``model`` folded by :func:`fold_batchnorm_`."""
    return {m.into: n for n, m in model.named_modules() if isinstance(m, FoldedBatchNorm)}


def find_conv_bn_pairs(model: nn.Module) -> dict[str, str]:
    """Names of ``(conv, bn)`` pairs that are safe to fold, found on the ``torch.fx`` graph.

    Raises whatever ``torch.fx.symbolic_trace`` raises for an untraceable model.
    """
    graph = _Tracer().trace(model)
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node) or src.op != "call_module":
            continue
        conv, bn = modules.get(src.target), modules[node.target]
        if (
            is_plain_conv2d(conv)
            and bn.running_mean is not None  # BN without running stats has nothing to fold
            and len(src.users) == 1
            and calls[src.target] == 1
            and calls[node.target] == 1
            and conv.out_channels == bn.num_features
        ):
            pairs[src.target] = node.target
    return pairs


@torch.no_grad()
def fold_conv_bn_(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold ``bn``'s inference transform into ``conv``'s weight and bias, in place."""
    weight, bias = fuse_conv_bn_weights(
        conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
    )
    conv.weight = weight
    conv.bias = bias


def fold_batchnorm_(model: nn.Module) -> FoldResult:
    """Fold every safe conv→BN pair of ``model`` in place; each folded BN becomes the identity
    (a :class:`FoldedBatchNorm` naming its conv).

    Uses the BN running statistics, so the folded model matches the original in eval mode.

    Raises
    ------
    TypeError
        ``model`` is not an eager ``nn.Module``.
    ValueError
        The model is on the meta device, or a BN to fold is in training mode (call
        ``model.eval()`` first). Nothing is changed then, nor when folding fails halfway.
    """
    check_module(model, "fold_batchnorm_")
    try:
        pairs = find_conv_bn_pairs(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure just means "cannot prove safety"
        return FoldResult(
            error=f"not traceable by torch.fx ({type(e).__name__}: {e})".splitlines()[0]
        )
    training = [bn for bn in pairs.values() if model.get_submodule(bn).training]
    if training:
        more = f" (and {len(training) - 1} more)" if len(training) > 1 else ""
        raise ValueError(
            f"BatchNorm {training[0]!r}{more} is in training mode: folding uses its running "
            "statistics, which only eval mode applies; call model.eval() first"
        )
    with transaction(model, "fold_batchnorm_"):
        for conv_name, bn_name in pairs.items():
            fold_conv_bn_(model.get_submodule(conv_name), model.get_submodule(bn_name))
            model.set_submodule(bn_name, FoldedBatchNorm(conv_name))
    return FoldResult(folded=pairs)


def apply_fold_structure_(model: nn.Module, pairs: dict[str, str]) -> None:
    """Give a fresh model the structure of a folded one (for loading its ``state_dict``).

    Each BN in ``pairs`` becomes ``nn.Identity`` and its conv gains a bias; no values are computed.
    """
    for conv_name, bn_name in pairs.items():
        conv = model.get_submodule(conv_name)
        if conv.bias is None:
            zeros = conv.weight.new_zeros(conv.out_channels)
            conv.bias = nn.Parameter(zeros, requires_grad=conv.weight.requires_grad)
        model.set_submodule(bn_name, FoldedBatchNorm(conv_name))

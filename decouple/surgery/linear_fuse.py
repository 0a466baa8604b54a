"""Fuse two 1×1 convs with nothing nonlinear between them into one, where that is cheaper.

A "linear bottleneck" (MobileNetV2's projection, no activation after it) that feeds a 1×1 conv
directly is two matrix products in a row: x → B·(A·x + a) + b. When the middle width M exceeds
what the product needs, ``C·N < M·(C + N)`` (C in, N out), the single conv ``B·A`` computes the
same function with fewer FLOPs, exactly. Once BatchNorm is folded such pairs sit side by side:
in the shared MobileNetV2-style CIFAR net the last block's projection (96→112) and the head conv
(112→448) become one 96→448 conv, 29 % fewer FLOPs for the pair, and the planner then works on
the conv the network really computes (its rank is at most 96, not 112).

A pair is fused only when the ``torch.fx`` graph proves it exact: A's output goes to B and nowhere
else (through identities only: a folded BatchNorm), both are plain ungrouped 1×1 convs at stride
1 without padding, each called once, and no code reads their weights. A becomes a
:class:`FusedConv` (the identity, naming B), B the product, so a fused model alone says what
:func:`apply_fuse_structure_` must replay on a fresh one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Container

import torch
from torch import nn

from ..nn.discover import is_plain_conv2d
from .bn_fold import _Tracer


class FusedConv(nn.Identity):
    """What the first conv of a fused pair becomes: the identity, naming the conv it went into."""

    def __init__(self, into: str, step: int = 0) -> None:
        super().__init__()
        self.into = into
        self.step = step  # the order of fusion, which a replay must follow (A→B before B→C)

    def extra_repr(self) -> str:
        return f"fused into {self.into!r}"


def fused_pairs(model: nn.Module) -> dict[str, str]:
    """``{first: second}`` of every pair :func:`fuse_linear_pairs_` fused, in the order fused."""
    marks = [(m.step, n, m.into) for n, m in model.named_modules() if isinstance(m, FusedConv)]
    return {a: b for _, a, b in sorted(marks)}


def _pointwise(m: nn.Module) -> bool:
    return (
        is_plain_conv2d(m)
        and m.kernel_size == (1, 1)
        and m.stride == (1, 1)
        and m.padding in ((0, 0), "valid")
        and m.groups == 1
    )


def _cheaper(a: nn.Conv2d, b: nn.Conv2d) -> bool:
    c, mid, n = a.in_channels, a.out_channels, b.out_channels
    return c * n < mid * (c + n)


def find_linear_pairs(model: nn.Module, exclude: Container[str] = ()) -> dict[str, str]:
    """``{first: second}`` of the 1×1 conv pairs that fuse exactly into a cheaper conv.

    Parameters
    ----------
    model : nn.Module
    exclude : container of str
        Names never fused (layers the user asked to keep as they are).

    Raises whatever ``torch.fx`` raises for a model it cannot trace.
    """
    graph = _Tracer().trace(model)
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    read = {str(n.target).rsplit(".", 1)[0] for n in graph.nodes if n.op == "get_attr"}
    pairs: dict[str, str] = {}
    for node in graph.nodes:
        a = modules.get(node.target) if node.op == "call_module" else None
        if a is None or not _pointwise(a) or node.target in exclude or node.target in read:
            continue
        cur = node
        while len(cur.users) == 1:  # through identities (folded BNs) to the one consumer
            nxt = next(iter(cur.users))
            m = modules.get(nxt.target) if nxt.op == "call_module" else None
            if m is None or nxt.args[:1] != (cur,) or len(nxt.args) + len(nxt.kwargs) != 1:
                break
            if isinstance(m, nn.Identity):
                cur = nxt
                continue
            if (
                _pointwise(m)
                and nxt.target not in exclude
                and nxt.target not in read
                and calls[node.target] == calls[nxt.target] == 1
                and m.in_channels == a.out_channels
                and m.weight.dtype == a.weight.dtype
                and _cheaper(a, m)
            ):
                pairs[node.target] = nxt.target
            break
    return pairs


@torch.no_grad()
def _product(a: nn.Conv2d, b: nn.Conv2d) -> nn.Conv2d:
    """The conv computing ``b(a(x))``: weight B·A, bias B·a + b, B's dtype and device."""
    fused = nn.Conv2d(a.in_channels, b.out_channels, 1, bias=True).to(b.weight)
    wa, wb = a.weight.flatten(1).double(), b.weight.flatten(1).double()
    fused.weight.copy_((wb @ wa).view_as(fused.weight))
    bias = wb @ a.bias.double() if a.bias is not None else wb.new_zeros(b.out_channels)
    fused.bias.copy_(bias + (b.bias.double() if b.bias is not None else 0))
    fused.weight.requires_grad_(b.weight.requires_grad)
    fused.bias.requires_grad_(b.weight.requires_grad)
    return fused


def fuse_linear_pairs_(model: nn.Module, exclude: Container[str] = ()) -> dict[str, str]:
    """Fuse every pair of :func:`find_linear_pairs` in place, repeatedly (A→B→C becomes one conv
    where each step is cheaper); returns ``{first: second}`` in the order fused. A model
    ``torch.fx`` cannot trace is left as it is (``{}``)."""
    done: dict[str, str] = {}
    step = len(fused_pairs(model))
    while True:
        try:
            pairs = find_linear_pairs(model, exclude)
        except Exception:  # noqa: BLE001 - untraceable: exactness cannot be proved, nothing fused
            return done
        if not pairs:
            return done
        for a_name, b_name in pairs.items():
            a, b = model.get_submodule(a_name), model.get_submodule(b_name)
            if not (_pointwise(a) and _pointwise(b) and _cheaper(a, b)):
                continue  # an earlier fusion of this round changed it; the next round decides
            model.set_submodule(b_name, _product(a, b))
            model.set_submodule(a_name, FusedConv(b_name, step + len(done)))
            done[a_name] = b_name


def apply_fuse_structure_(model: nn.Module, pairs: dict[str, str]) -> None:
    """Give a fresh model the structure of a fused one (for loading its ``state_dict``): each
    second conv becomes an empty conv from the first one's input, with a bias; the first the
    identity. ``pairs`` in the order fused. No values are computed; the model may be on the meta
    device."""
    for step, (a_name, b_name) in enumerate(pairs.items()):
        a, b = model.get_submodule(a_name), model.get_submodule(b_name)
        fused = nn.Conv2d(
            a.in_channels, b.out_channels, 1, bias=True, device=b.weight.device,
            dtype=b.weight.dtype,
        )  # fmt: skip
        model.set_submodule(b_name, fused)
        model.set_submodule(a_name, FusedConv(b_name, step))

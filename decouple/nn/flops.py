"""FLOPs: counted by ``FlopCounterMode`` on any model, and the closed forms of each factored layer
(which match it, so budgets can price a rank without building the layer).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..factor.tucker import tucker_ranks
from .geometry import geometry_of


def count_flops(model: nn.Module, example: torch.Tensor) -> tuple[int, dict[str, int]]:
    """FLOPs of ``model(example)``: the total and a map from module name to its FLOPs."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example)
    root = type(model).__name__ + "."
    per_module = {
        key[len(root) :]: int(sum(ops.values()))
        for key, ops in counter.get_flop_counts().items()
        if key.startswith(root)
    }
    return int(counter.get_total_flops()), per_module


def conv_flops(conv: nn.Module, out_hw: tuple[int, int]) -> int:
    """FLOPs of ``conv`` for one image (2 per multiply-add, as ``FlopCounterMode`` counts); a
    linear layer is a 1×1 conv over its positions (:func:`~decouple.nn.geometry.positions`)."""
    conv = geometry_of(conv)
    kh, kw = conv.kernel_size
    return (
        2 * out_hw[0] * out_hw[1] * conv.out_channels * (conv.in_channels // conv.groups) * kh * kw
    )


def factored_flops(conv: nn.Conv2d, method: str, order: str, rank, in_hw, out_hw) -> int:
    """FLOPs for one image of ``conv`` factored by ``method`` at ``rank`` (closed forms).

    * nd dw-pw: ``2·H'W'·(C·T·k + N·C·T/g)``; nd pw-dw: ``2·(HW·N·T·C/g + H'W'·N·T·k)``
    * cp: ``2·(HW·C·R + H'·W·g·R·kh + H'W'·g·R·kw + H'W'·N·R)``
    * tucker: ``2·(HW·C·R_in + H'W'·g·R_out·R_in·k + H'W'·N·R_out)``
    * svd: ``2·H'W'·R·(C·k + N)`` (``R`` per group; a linear layer: ``H'W'`` its positions)
    """
    conv = geometry_of(conv)
    c, n, g = conv.in_channels, conv.out_channels, conv.groups
    kh, kw = conv.kernel_size
    hw_in, hw_out = in_hw[0] * in_hw[1], out_hw[0] * out_hw[1]
    if method == "nd":
        if order == "dw-pw":
            return 2 * hw_out * c * rank * kh * kw + 2 * hw_out * n * (c * rank // g)
        return 2 * hw_in * n * rank * (c // g) + 2 * hw_out * n * rank * kh * kw
    if method == "svd":
        return 2 * hw_out * rank * (c * kh * kw + n)
    if method == "cp":
        vertical = out_hw[0] * in_hw[1]  # the kh×1 conv strides rows only
        return 2 * rank * (hw_in * c + vertical * g * kh + hw_out * g * kw + hw_out * n)
    r_out, r_in = tucker_ranks((n, c // g, kh, kw), g, rank)
    return 2 * (hw_in * c * r_in + hw_out * g * r_out * r_in * kh * kw + hw_out * n * r_out)

"""The geometry every factored layer copies from the conv it replaces, in one place.

``DecoupledConv2d``, ``CPConv2d`` and ``TuckerConv2d`` all keep the original conv's channels,
kernel size, stride, padding, dilation, groups and padding_mode (the report, the moments of
calibration and the recipes read them), are rebuilt empty from a conv, and show them in their repr.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.utils import _pair


def conv_geometry(conv: nn.Conv2d) -> dict:
    """Keyword arguments that rebuild ``conv``'s geometry, bias, device and dtype."""
    w = conv.weight
    return dict(
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=w.device,
        dtype=w.dtype,
    )


class ConvGeometry(nn.Module):
    """Base of the factored layers: the original conv's geometry as attributes."""

    def _set_geometry(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride,
        padding,
        dilation,
        groups,
        padding_mode,
    ) -> None:
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in={in_channels} and out={out_channels}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _pair(kernel_size)
        self.stride, self.dilation = _pair(stride), _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.padding_mode = padding_mode

    def _follow_requires_grad(self, conv: nn.Conv2d) -> None:
        """Give the new parameters ``conv``'s ``requires_grad``: a frozen conv stays frozen."""
        bias = self.bias
        for p in self.parameters():
            p.requires_grad_((conv.bias if p is bias else conv.weight).requires_grad)

    def _geometry_repr(self) -> str:
        s = f", stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding!r}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s


@dataclass(frozen=True)
class LinearGeometry:
    """An ``nn.Linear`` read as a 1×1 conv over its input's positions (every axis but the last).

    FLOPs, the report and calibration's moments read a layer's ``in_channels``,
    ``kernel_size``, ``groups``, … ; a linear layer has them as this view.
    """

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    padding_mode: str = "zeros"
    is_linear: bool = True


def is_linear(module) -> bool:
    """Whether ``module`` works on the last axis (``nn.Linear``, ``LowRankLinear``, the view)."""
    return isinstance(module, nn.Linear) or getattr(module, "is_linear", False)


def geometry_of(module: nn.Module):
    """The conv geometry of a layer: a conv (or factored conv) itself; a linear layer's view."""
    if isinstance(module, nn.Linear):
        return LinearGeometry(module.in_features, module.out_features)
    return module


def kernel_of(module: nn.Module) -> torch.Tensor:
    """A layer's weight as a conv kernel ``(N, C/g, kh, kw)``: a linear's ``(N, C)`` as ``1×1``."""
    w = module.weight
    return w[:, :, None, None] if isinstance(module, nn.Linear) else w


def positions(x: torch.Tensor, module) -> tuple[int, int]:
    """Positions per sample a layer reads in ``x``: a conv's ``(H, W)``; for a linear layer the
    product of every axis between the batch and the features, as ``(P, 1)``."""
    if is_linear(module):
        p = 1
        for d in x.shape[1:-1]:
            p *= int(d)
        return (p, 1)
    return tuple(x.shape[2:])


def layer_kind(module: nn.Module) -> str:
    """``"linear"``, ``"1x1"`` (a pointwise conv) or ``"kxk"``: which methods apply to it."""
    if is_linear(module):
        return "linear"
    kh, kw = module.kernel_size
    return "1x1" if kh * kw == 1 else "kxk"

"""The geometry every factored layer copies from the conv it replaces, in one place.

``DecoupledConv2d``, ``CPConv2d`` and ``TuckerConv2d`` all keep the original conv's channels,
kernel size, stride, padding, dilation, groups and padding_mode (the report, the moments of
calibration and the recipes read them), are rebuilt empty from a conv, and show them in their repr.
"""

from __future__ import annotations

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

"""Low-rank layers: a conv or linear layer as two thinner ones (truncated SVD, method ``svd``).

* ``LowRankConv2d``: conv ``C → g·R`` with the original kernel, stride, padding and groups
  (``pointwise_in``; a 1×1 conv for a 1×1 layer), then 1×1 ``g·R → N`` (``pointwise_out``, with
  the bias).
* ``LowRankLinear``: ``nn.Linear`` ``C → R`` (``pointwise_in``), then ``R → N``
  (``pointwise_out``, with the bias), on inputs of any shape ``(..., C)``.

Both keep the contract of the other factored layers: built from factors or empty from the layer
they replace (so a saved ``state_dict`` loads), ``head`` is everything before ``pointwise_out``
(calibration's features), and ``factors()`` reads the weights back as
:class:`~decouple.factor.lowrank.LowRankFactors`. The parts carry the names of CP's and Tucker's
outer 1×1 convs, so a ``state_dict`` marks them the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from ..factor.lowrank import LowRankFactors, lowrank_max_rank, lowrank_weight
from .factorized import FactorizedConv2d


def _check_rank(rank) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"low-rank rank must be an integer >= 1; got {rank!r}")
    return rank


class LowRankConv2d(FactorizedConv2d):
    """A convolution as ``rank`` channels per group between two plain convs.

    Parameters
    ----------
    in_channels, out_channels, kernel_size
        As the original conv.
    rank : int
        Channels per group between the two convs, ``R``.
    stride, padding, dilation, groups, bias, padding_mode
        As in ``nn.Conv2d``; the first conv carries the spatial ones and the groups, the second
        the groups and the bias.
    """

    method = "svd"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        rank: int,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self._set_geometry(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode
        )
        self.rank = _check_rank(rank)
        g, kw_ = groups, dict(device=device, dtype=dtype)
        self.pointwise_in = nn.Conv2d(
            in_channels, g * rank, self.kernel_size, stride=self.stride, padding=self.padding,
            dilation=self.dilation, groups=g, bias=False, padding_mode=padding_mode, **kw_,
        )  # fmt: skip
        self.pointwise_out = nn.Conv2d(g * rank, out_channels, 1, groups=g, bias=bias, **kw_)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_in(x)

    @staticmethod
    def _rank_of(factors: LowRankFactors) -> int:
        return factors.rank

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int | None = None) -> LowRankConv2d:
        """The truncated SVD of ``conv`` at ``rank`` (``None``: full rank, exact)."""
        return cls.from_factors(conv, lowrank_weight(conv.weight, rank, conv.groups))

    def load_factors(self, f: LowRankFactors) -> None:
        _load(self, f)

    def factors(self) -> LowRankFactors:
        """The layer's current weights as factors (``singular_values``: recomputed)."""
        return _factors(self, (self.out_channels, self.in_channels // self.groups,
                               *self.kernel_size), self.groups)  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"method='svd', rank={self.rank}" + self._geometry_repr()
        )


@torch.no_grad()
def _load(layer: nn.Module, f: LowRankFactors) -> None:
    """Copy ``f`` into either low-rank layer: ``inp`` to the first part, ``out`` to the second."""
    if f.rank != layer.rank:
        raise ValueError(f"factors have rank {f.rank}; layer wants {layer.rank}")
    layer.pointwise_in.weight.copy_(f.inp.reshape(layer.pointwise_in.weight.shape))
    layer.pointwise_out.weight.copy_(f.out.reshape(layer.pointwise_out.weight.shape))


def _factors(layer: nn.Module, shape: tuple[int, ...], groups: int) -> LowRankFactors:
    inp = layer.pointwise_in.weight.detach().double().cpu().reshape(groups, layer.rank, -1)
    out = layer.pointwise_out.weight.detach().double().cpu().reshape(groups, -1, layer.rank)
    s = torch.linalg.svdvals(torch.einsum("gnr,grf->gnf", out, inp))
    return LowRankFactors(shape, groups, out, inp, s)


class LowRankLinear(nn.Module):
    """An ``nn.Linear`` as ``rank`` features between two plain linear layers.

    Exposes the geometry of a 1×1 conv (``in_channels``, ``kernel_size`` (1, 1), ``groups`` 1,
    …) so that reports, FLOPs and calibration read it as they read a conv.
    """

    method = "svd"
    kernel_size, stride, padding, dilation = (1, 1), (1, 1), (0, 0), (1, 1)
    groups, padding_mode, is_linear = 1, "zeros", True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank = _check_rank(rank)
        kw_ = dict(device=device, dtype=dtype)
        self.pointwise_in = nn.Linear(in_features, rank, bias=False, **kw_)
        self.pointwise_out = nn.Linear(rank, out_features, bias=bias, **kw_)

    @property
    def in_channels(self) -> int:
        return self.in_features

    @property
    def out_channels(self) -> int:
        return self.out_features

    @property
    def bias(self) -> torch.Tensor | None:
        return self.pointwise_out.bias

    @classmethod
    def empty_like(cls, linear: nn.Linear, rank: int) -> LowRankLinear:
        """An uninitialised layer shaped for ``linear``, with its bias, device, dtype and
        ``requires_grad``."""
        w = linear.weight
        layer = cls(
            linear.in_features, linear.out_features, rank, linear.bias is not None,
            device=w.device, dtype=w.dtype,
        )  # fmt: skip
        for p in layer.parameters():
            p.requires_grad_((linear.bias if p is layer.bias else w).requires_grad)
        return layer

    @classmethod
    def from_factors(cls, linear: nn.Linear, factors: LowRankFactors) -> LowRankLinear:
        """The layer holding ``factors`` (computed for ``linear``), with ``linear``'s bias."""
        if factors.weight_shape != (linear.out_features, linear.in_features, 1, 1):
            raise ValueError("the svd factors were computed for a different layer")
        layer = cls.empty_like(linear, factors.rank)
        layer.load_factors(factors)
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int | None = None) -> LowRankLinear:
        """The truncated SVD of ``linear`` at ``rank`` (``None``: full rank, exact)."""
        return cls.from_factors(linear, lowrank_weight(linear.weight, rank))

    def load_factors(self, f: LowRankFactors) -> None:
        _load(self, f)

    def factors(self) -> LowRankFactors:
        return _factors(self, (self.out_features, self.in_features, 1, 1), 1)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_in(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_out(self.pointwise_in(x))

    def reconstructed_weight(self) -> torch.Tensor:
        """The equivalent ``(N, C)`` weight in the layer's dtype."""
        w = self.factors().reconstruct().reshape(self.out_features, self.in_features)
        return w.to(self.pointwise_out.weight.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, method='svd', rank={self.rank}"


def lowrank_full_rank(layer: nn.Module) -> int:
    """The rank at which the layer ``layer`` replaces (a conv or linear) is exact."""
    if isinstance(layer, nn.Linear):
        return lowrank_max_rank((layer.out_features, layer.in_features))
    return lowrank_max_rank(tuple(layer.weight.shape), layer.groups)

"""``DecoupledConv2d``: all ``T`` depthwise-separable terms of a decoupled conv in two plain convs.

* dw-pw: ``Conv2d(C, C·T, k, groups=C)`` → ``Conv2d(C·T, N, 1, groups=g)``
* pw-dw: ``Conv2d(C, N·T, 1, groups=g)`` → ``Conv2d(N·T, N, k, groups=N)``

The k×k conv carries the original stride, padding, dilation and padding_mode; the second conv
carries the bias. Padding commutes with the 1×1 channel mixing (every padding mode is a per-channel
linear map), so both orders are exact at full rank.

The same parameters can run in several *realizations* (``layer.realization``), which compute the
same function but hit different kernels, so which is fastest depends on the runtime, device and
shape (:mod:`decouple.runtime.realize` times them):

* ``grouped``: the two convs above (a depthwise conv with channel multiplier ``T``);
* ``split``: ``T`` depthwise convs with multiplier 1 (the kernels runtimes optimise best), their
  outputs interleaved back into the grouped layout, then the 1×1 (pw-dw: 1×1, then ``T``
  depthwise convs summed);
* ``repeat`` (dw-pw only): the input's channels repeated ``T`` times, then one depthwise conv
  with multiplier 1 over ``C·T`` channels, then the 1×1;
* ``tile`` (dw-pw only): the input concatenated ``T`` times (term-major channel order, a plain
  copy), one depthwise conv with multiplier 1, and the 1×1 with its columns permuted to match;
* ``sum``: ``T`` chains of a multiplier-1 depthwise conv and a 1×1 conv (pw-dw: 1×1, then
  depthwise), added. No concatenation, slicing or interleaving at all.

``tile`` and ``sum`` use only multiplier-1 depthwise convs, 1×1 convs, ``Concat`` and ``Add``:
runtimes that convert convs to a blocked layout (ONNX Runtime's NCHWc, oneDNN) keep the whole
layer in it, where a channel multiplier or an interleave falls back to plain NCHW and back.
Their permuted or sliced weights are derived from the layer's own parameters; in eager inference
they are cached (keyed on the parameters' versions, so an in-place update is seen), and while
tracing, exporting or under autograd they are derived afresh so exporters constant-fold them and
gradients flow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..factor.nd import Decoupling, check_order, decouple_weight
from .geometry import ConvGeometry, conv_geometry

REALIZATIONS = {
    "dw-pw": ("grouped", "split", "repeat", "tile", "sum"),
    "pw-dw": ("grouped", "split", "sum"),
}


def check_realization(order: str, realization: str) -> str:
    """``realization`` if layers of ``order`` have it, else ``ValueError`` naming those that exist."""
    allowed = REALIZATIONS[check_order(order)]
    if realization not in allowed:
        raise ValueError(
            f"realization must be one of {', '.join(allowed)} for {order}; got {realization!r}"
        )
    return realization


class DecoupledConv2d(ConvGeometry):
    """A k×k convolution rewritten as ``rank`` depthwise-separable terms.

    Built empty from shapes (so a saved ``state_dict`` loads into it) or from an existing conv
    with :meth:`from_conv`. Submodules are always named ``depthwise`` and ``pointwise``; ``order``
    says which runs first.

    Parameters
    ----------
    in_channels, out_channels : int
        ``C`` and ``N`` of the original convolution.
    kernel_size : int or tuple
        ``(kh, kw)`` of the original convolution.
    rank : int
        Number of terms ``T``.
    order : {"dw-pw", "pw-dw"}
    stride, padding, dilation, groups, bias, padding_mode
        As in ``nn.Conv2d``; copied verbatim from the original conv.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        rank: int,
        order: str = "dw-pw",
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
        check_order(order)
        if rank < 1:
            raise ValueError(f"rank must be >= 1; got {rank}")
        self._set_geometry(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode
        )
        self.rank, self.order = int(rank), order
        self.realization = "grouped"
        c, n, t, kw = in_channels, out_channels, self.rank, dict(device=device, dtype=dtype)
        spatial = dict(
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            padding_mode=padding_mode,
        )
        if order == "dw-pw":
            self.depthwise = nn.Conv2d(c, c * t, groups=c, bias=False, **spatial, **kw)
            self.pointwise = nn.Conv2d(c * t, n, 1, groups=groups, bias=bias, **kw)
        else:
            self.pointwise = nn.Conv2d(c, n * t, 1, groups=groups, bias=False, **kw)
            self.depthwise = nn.Conv2d(n * t, n, groups=n, bias=bias, **spatial, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.realization == "grouped":
            if self.order == "dw-pw":
                return self.pointwise(self.depthwise(x))
            return self.depthwise(self.pointwise(x))
        return getattr(self, "_" + self.realization)(x)

    def set_realization(self, realization: str) -> DecoupledConv2d:
        """Run as ``realization`` from now on (same parameters, same function). Returns self."""
        self.realization = check_realization(self.order, realization)
        return self

    def _depthwise(self, x, weight, groups, bias=None):
        """The k×k conv with this layer's geometry, on any weight (padding_mode honoured)."""
        dw = self.depthwise
        if dw.padding_mode != "zeros":
            x = F.pad(x, dw._reversed_padding_repeated_twice, mode=dw.padding_mode)
            padding = 0
        else:
            padding = dw.padding
        return F.conv2d(x, weight, bias, dw.stride, padding, dw.dilation, groups)

    def _pointwise(self, x, weight, bias=None):
        return F.conv2d(x, weight, bias, groups=self.groups)

    def _split(self, x):
        return self._split_dwpw(x) if self.order == "dw-pw" else self._split_pwdw(x)

    def _split_dwpw(self, x):
        c, t = self.in_channels, self.rank
        w = self.depthwise.weight.view(c, t, 1, *self.kernel_size)
        terms = [self._depthwise(x, w[:, i], c) for i in range(t)]
        # Stacking on dim 2 restores the grouped layout (channel c·T + t) the 1×1 expects.
        return self.pointwise(torch.stack(terms, 2).flatten(1, 2))

    def _split_pwdw(self, x):
        n, t = self.out_channels, self.rank
        y = self.pointwise(x)
        y = y.view(y.shape[0], n, t, *y.shape[2:])
        w = self.depthwise.weight.view(n, t, 1, *self.kernel_size)
        out = self._depthwise(y[:, :, 0], w[:, 0], n, self.depthwise.bias)
        for i in range(1, t):
            out = out + self._depthwise(y[:, :, i], w[:, i], n)
        return out

    def _repeat(self, x):
        c, t = self.in_channels, self.rank
        z = self._depthwise(x.repeat_interleave(t, 1), self.depthwise.weight, c * t)
        return self.pointwise(z)

    def _tile(self, x):
        c, t, g = self.in_channels, self.rank, self.groups
        dw, pw = self._derived("tile", self._tile_weights)
        if g == 1:
            x = torch.cat([x] * t, 1)
        else:  # term-major within each group, so every group's channels stay contiguous
            b, _, h, w = x.shape
            x = x.view(b, g, 1, c // g, h, w).expand(b, g, t, c // g, h, w).reshape(b, c * t, h, w)
        return self._pointwise(self._depthwise(x, dw, c * t), pw, self.pointwise.bias)

    def _tile_weights(self):
        """Both weights reordered from channel-major (c·T + t) to term-major within each group."""
        c, n, t, g, k = (
            self.in_channels,
            self.out_channels,
            self.rank,
            self.groups,
            self.kernel_size,
        )
        dw = self.depthwise.weight.view(g, c // g, t, 1, *k).transpose(1, 2).reshape(c * t, 1, *k)
        pw = self.pointwise.weight.view(n, c // g, t).transpose(1, 2).reshape(n, t * c // g, 1, 1)
        return dw.contiguous(), pw.contiguous()

    def _sum(self, x):
        terms = self._derived("sum", self._sum_weights)
        out = None
        for i, (dw, pw) in enumerate(terms):
            if self.order == "dw-pw":
                bias = self.pointwise.bias if i == 0 else None
                y = self._pointwise(self._depthwise(x, dw, self.in_channels), pw, bias)
            else:
                bias = self.depthwise.bias if i == 0 else None
                y = self._depthwise(self._pointwise(x, pw), dw, self.out_channels, bias)
            out = y if out is None else out + y
        return out

    def _sum_weights(self):
        """Per term t: its multiplier-1 depthwise weight and its 1×1 weight."""
        c, n, t, g, k = (
            self.in_channels,
            self.out_channels,
            self.rank,
            self.groups,
            self.kernel_size,
        )
        if self.order == "dw-pw":
            dw = self.depthwise.weight.view(c, t, 1, *k)
            pw = self.pointwise.weight.view(n, c // g, t, 1, 1)
            return [(dw[:, i].contiguous(), pw[:, :, i].contiguous()) for i in range(t)]
        pw = self.pointwise.weight.view(n, t, c // g, 1, 1)
        dw = self.depthwise.weight.view(n, t, 1, *k)
        return [(dw[:, i].contiguous(), pw[:, i].contiguous()) for i in range(t)]

    def _derived(self, realization: str, make):
        """``make()``, cached across eager inference calls.

        The cache is used only where it is safe: no autograd (gradients must reach the
        parameters), no tracing or exporting (exporters must see the derivation to fold it into
        constants), plain tensors (not an exporter's fake ones, nor inference tensors, which keep no
        version counter). Its key holds the parameters'
        identities and version counters, so swapping or editing them in place invalidates it.
        """
        params = (self.depthwise.weight, self.pointwise.weight)
        if (
            torch.is_grad_enabled()
            or torch.jit.is_tracing()
            or torch.jit.is_scripting()
            or torch.compiler.is_compiling()
            or torch.compiler.is_exporting()
            or any(type(p) not in (torch.Tensor, nn.Parameter) or p.is_inference() for p in params)
        ):
            return make()
        key = (realization, *((p.data_ptr(), p._version, p.device, p.dtype) for p in params))
        cached = self.__dict__.get("_derived_cache")
        if cached is None or cached[0] != key:
            cached = (key, make())
            self.__dict__["_derived_cache"] = cached
        return cached[1]

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_derived_cache", None)  # derived from the parameters: never saved
        return state

    @property
    def bias(self) -> torch.Tensor | None:
        return (self.pointwise if self.order == "dw-pw" else self.depthwise).bias

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int | None = None, order: str = "dw-pw"):
        """Decouple ``conv`` into ``rank`` terms (``None``: full rank, which is exact)."""
        dec = decouple_weight(conv.weight, rank, order, conv.groups)
        return cls.from_decoupling(conv, dec)

    @classmethod
    def empty_like(cls, conv: nn.Conv2d, rank: int, order: str) -> DecoupledConv2d:
        """An uninitialised layer with ``conv``'s geometry, bias, device, dtype and
        ``requires_grad``."""
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            rank,
            order,
            **conv_geometry(conv),
        )
        layer._follow_requires_grad(conv)
        return layer

    @classmethod
    def from_decoupling(cls, conv: nn.Conv2d, dec: Decoupling) -> DecoupledConv2d:
        """Build the layer for ``conv`` from factors computed by :func:`decouple_weight`."""
        if tuple(conv.weight.shape) != dec.weight_shape or conv.groups != dec.groups:
            raise ValueError("the decoupling was computed for a different convolution")
        layer = cls.empty_like(conv, dec.rank, dec.order)
        layer.load_factors(dec)
        if conv.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(conv.bias)
        return layer

    @torch.no_grad()
    def load_factors(self, dec: Decoupling) -> None:
        """Copy the factors of ``dec`` into the two convs (cast to this layer's dtype)."""
        g, (kh, kw), t = self.groups, self.kernel_size, self.rank
        c, n = self.in_channels, self.out_channels
        if dec.rank != t or dec.order != self.order:
            raise ValueError(
                f"factors have rank {dec.rank} ({dec.order}); layer wants {t} ({self.order})"
            )
        if self.order == "dw-pw":
            dw = dec.depthwise.reshape(c * t, 1, kh, kw)
            # (C, T, N/g) -> (g, N/g, C/g·T): pointwise group j mixes the terms of group j's inputs.
            pw = dec.pointwise.reshape(g, c // g, t, n // g).permute(0, 3, 1, 2)
            pw = pw.reshape(n, (c // g) * t, 1, 1)
        else:
            pw = dec.pointwise.reshape(n * t, c // g, 1, 1)
            dw = dec.depthwise.reshape(n, t, kh, kw)
        self.depthwise.weight.copy_(dw)
        self.pointwise.weight.copy_(pw)

    def factors(self) -> Decoupling:
        """The layer's current weights as a :class:`Decoupling` (e.g. after a refit)."""
        g, (kh, kw), t = self.groups, self.kernel_size, self.rank
        c, n = self.in_channels, self.out_channels
        dw = self.depthwise.weight.detach().double()
        pw = self.pointwise.weight.detach().double()
        if self.order == "dw-pw":
            depthwise = dw.reshape(c, t, kh, kw)
            pointwise = pw.reshape(g, n // g, c // g, t).permute(0, 2, 3, 1).reshape(c, t, n // g)
        else:
            depthwise = dw.reshape(n, t, kh, kw)
            pointwise = pw.reshape(n, t, c // g)
        shape = (n, c // g, kh, kw)
        empty = torch.empty(depthwise.shape[0], 0, dtype=torch.float64)
        return Decoupling(self.order, shape, g, depthwise, pointwise, empty)

    def reconstructed_weight(self) -> torch.Tensor:
        """The equivalent k×k kernel ``(N, C/g, kh, kw)`` in the layer's dtype."""
        return self.factors().reconstruct().to(self.depthwise.weight.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"rank={self.rank}, order={self.order!r}"
            + (f", realization={self.realization!r}" if self.realization != "grouped" else "")
            + self._geometry_repr()
        )

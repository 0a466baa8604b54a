"""CP and Tucker-2 convolution layers: chains of plain ``nn.Conv2d`` ending in a 1×1 conv.

* ``CPConv2d``: 1×1 ``C → g·R`` → depthwise ``kh×1`` → depthwise ``1×kw`` → 1×1 ``g·R → N``
  (or, realization ``square``, the two depthwise convs as one ``kh×kw`` depthwise conv whose
  kernels are their outer products: three ops and one pass less over the ``R``-channel tensor)
* ``TuckerConv2d``: 1×1 ``C → g·R_in`` → ``kh×kw`` core ``g·R_in → g·R_out`` → 1×1 ``g·R_out → N``

They keep the contract of :class:`~decouple.nn.decoupled.DecoupledConv2d`: built ``from_conv`` or
empty from a conv's geometry (so a saved ``state_dict`` loads), every ``nn.Conv2d`` option
honoured. The spatial convs carry the stride, padding, dilation and padding_mode (CP splits them
into their vertical and horizontal halves: every padding mode pads each axis independently);
the last 1×1 conv carries the bias, and is what calibration refits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..factor.cp import CP_MAX_ITER, CP_TOL, CPFactors, cp_weight
from ..factor.tucker import TuckerFactors, tucker2_weight, tucker_ranks
from .geometry import ConvGeometry, conv_geometry


class FactorizedConv2d(ConvGeometry):
    """Common geometry and helpers of the CP and Tucker layers (not used on its own)."""

    method = ""

    @classmethod
    def empty_like(cls, conv: nn.Conv2d, rank, **form):
        """An uninitialised layer with ``conv``'s geometry, bias, device, dtype and
        ``requires_grad``; ``form``: the layer's own options (a CP layer's ``spatial``)."""
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, rank, **conv_geometry(conv),
            **form,
        )  # fmt: skip
        layer._follow_requires_grad(conv)
        return layer

    @classmethod
    def from_factors(cls, conv: nn.Conv2d, factors):
        """The layer holding ``factors`` (computed for ``conv``), with ``conv``'s bias."""
        if tuple(conv.weight.shape) != factors.weight_shape or conv.groups != factors.groups:
            raise ValueError(f"the {cls.method} factors were computed for a different convolution")
        layer = cls.empty_like(conv, cls._rank_of(factors), **cls._form_of(factors))
        layer.load_factors(factors)
        layer._copy_bias(conv)
        return layer

    @staticmethod
    def _form_of(factors) -> dict:
        """The layer options ``factors`` need beyond their rank (see :meth:`empty_like`)."""
        return {}

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before ``pointwise_out`` (a linear map of ``x``; calibration's features)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_out(self.head(x))

    @property
    def bias(self) -> torch.Tensor | None:
        return self.pointwise_out.bias

    def _copy_bias(self, conv: nn.Conv2d) -> None:
        if conv.bias is not None:
            with torch.no_grad():
                self.bias.copy_(conv.bias)

    def reconstructed_weight(self) -> torch.Tensor:
        """The equivalent k×k kernel ``(N, C/g, kh, kw)`` in the layer's dtype."""
        return self.factors().reconstruct().to(self.pointwise_out.weight.dtype)


def _axis_padding(padding, axis: int):
    """The padding of one axis of a 2-D conv for a 1-D (kh×1 or 1×kw) conv."""
    if isinstance(padding, str):  # 'same' / 'valid' resolve per axis by themselves
        return padding
    return (padding[0], 0) if axis == 0 else (0, padding[1])


CP_REALIZATIONS = ("separable", "square")
"""How a CP layer can run (same weights, same function): its two depthwise convs one after the
other (``separable``, four ops), or as one ``kh×kw`` depthwise conv (``square``, three ops), whose
kernel is made from theirs in the forward pass (an export folds it into a constant)."""


CP_SPATIAL = ("separable", "full")
"""A CP layer's kernels: each term's ``kh×kw`` filter the outer product of a ``kh×1`` and a
``1×kw`` one (:func:`~decouple.factor.cp.cp_weight`), or any 2-D filter
(:func:`~decouple.factor.cp.cp_full_weight`; runs only as ``square``)."""


class CPConv2d(FactorizedConv2d):
    """A k×k convolution as ``rank`` CP terms per group, in four plain convs (or three: see
    :data:`CP_REALIZATIONS` and :meth:`set_realization`).

    Parameters
    ----------
    in_channels, out_channels, kernel_size
        As the original conv.
    rank : int
        CP terms per group, ``R``.
    stride, padding, dilation, groups, bias, padding_mode
        As in ``nn.Conv2d``; copied verbatim from the original conv.
    spatial : {"separable", "full"}
        See :data:`CP_SPATIAL`. A full-kernel layer holds one ``kh×kw`` depthwise conv in
        ``vertical`` (``horizontal`` is None) and runs only as ``square``.
    """

    method = "cp"

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
        spatial: str = "separable",
    ) -> None:
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"CP rank must be an integer >= 1; got {rank!r}")
        if spatial not in CP_SPATIAL:
            raise ValueError(f"spatial must be one of {', '.join(CP_SPATIAL)}; got {spatial!r}")
        self._set_geometry(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode
        )
        self.rank = rank
        g, r, (kh, kw) = groups, rank, self.kernel_size
        (sh, sw), (dh, dw) = self.stride, self.dilation
        kw_ = dict(device=device, dtype=dtype)
        self.pointwise_in = nn.Conv2d(in_channels, g * r, 1, groups=g, bias=False, **kw_)
        self.spatial = spatial
        if spatial == "full":  # one kh×kw depthwise conv: the three-op graph is the only one
            self.vertical = nn.Conv2d(
                g * r, g * r, (kh, kw), stride=self.stride, padding=self.padding,
                dilation=self.dilation, groups=g * r, bias=False, padding_mode=padding_mode, **kw_,
            )  # fmt: skip
            self.horizontal = None
            self.pointwise_out = nn.Conv2d(g * r, out_channels, 1, groups=g, bias=bias, **kw_)
            self.realization = "square"
            return
        self.vertical = nn.Conv2d(
            g * r, g * r, (kh, 1), stride=(sh, 1), padding=_axis_padding(self.padding, 0),
            dilation=(dh, 1), groups=g * r, bias=False, padding_mode=padding_mode, **kw_,
        )  # fmt: skip
        self.horizontal = nn.Conv2d(
            g * r, g * r, (1, kw), stride=(1, sw), padding=_axis_padding(self.padding, 1),
            dilation=(1, dw), groups=g * r, bias=False, padding_mode=padding_mode, **kw_,
        )  # fmt: skip
        self.pointwise_out = nn.Conv2d(g * r, out_channels, 1, groups=g, bias=bias, **kw_)
        self.realization = "separable"

    def set_realization(self, realization: str) -> CPConv2d:
        """Run as ``realization`` (one of :data:`CP_REALIZATIONS`) from now on. Returns self."""
        if realization not in CP_REALIZATIONS:
            raise ValueError(
                f"realization must be one of {', '.join(CP_REALIZATIONS)} for cp; got {realization!r}"
            )
        if self.spatial == "full" and realization != "square":
            raise ValueError("a full-kernel CP layer runs only as 'square' (its kernels are 2-D)")
        self.realization = realization
        return self

    def head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pointwise_in(x)
        if self.spatial == "full":
            return self.vertical(x)
        if self.realization == "square":
            return self._square(x)
        return self.horizontal(self.vertical(x))

    def _square(self, x: torch.Tensor) -> torch.Tensor:
        """Both depthwise convs as one: a ``kh×1`` then a ``1×kw`` filter is their outer product.
        Each axis is padded as its own conv pads it (every padding mode pads axes independently,
        and so do strides and dilations), so this is exact, not an approximation."""
        v, h = self.vertical, self.horizontal
        kernel = v.weight * h.weight  # (gR, 1, kh, 1) * (gR, 1, 1, kw)
        # Explicit pads ('same' and 'valid' resolved), left, right, top, bottom: what exporters take.
        left, right = h._reversed_padding_repeated_twice[:2]
        top, bottom = v._reversed_padding_repeated_twice[2:]
        padding = (top, left)
        if self.padding_mode != "zeros" or (left, top) != (right, bottom):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x, padding = F.pad(x, [left, right, top, bottom], mode=mode), (0, 0)
        return F.conv2d(x, kernel, None, self.stride, padding, self.dilation, v.groups)

    @torch.no_grad()
    def make_full_(self) -> CPConv2d:
        """Become a full-kernel layer of the same rank, in place (its spatial kernels the outer
        products they were, so the function is unchanged); a no-op if it is one. Returns self."""
        if self.spatial == "full":
            return self
        v, h = self.vertical, self.horizontal
        full = nn.Conv2d(
            v.in_channels, v.out_channels, self.kernel_size, stride=self.stride,
            padding=self.padding, dilation=self.dilation, groups=v.groups, bias=False,
            padding_mode=self.padding_mode, device=v.weight.device, dtype=v.weight.dtype,
        )  # fmt: skip
        full.weight.copy_(v.weight * h.weight)
        full.weight.requires_grad_(v.weight.requires_grad)
        self.vertical = full
        del self.horizontal  # a submodule no more: as a full-kernel layer is built
        self.horizontal = None
        self.spatial, self.realization = "full", "square"
        return self

    @staticmethod
    def _rank_of(factors: CPFactors) -> int:
        return factors.rank

    @staticmethod
    def _form_of(factors: CPFactors) -> dict:
        return {"spatial": factors.spatial}

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        rank: int,
        n_iter_max: int = CP_MAX_ITER,
        tol: float = CP_TOL,
        seed: int = 0,
    ) -> CPConv2d:
        """CP-decompose ``conv`` at ``rank`` (see :func:`decouple.factor.cp.cp_weight`)."""
        return cls.from_factors(
            conv, cp_weight(conv.weight, rank, conv.groups, n_iter_max, tol, seed)
        )

    @torch.no_grad()
    def load_factors(self, f: CPFactors) -> None:
        g, r, (kh, kw) = self.groups, self.rank, self.kernel_size
        n, c = self.out_channels, self.in_channels
        if f.rank != r:
            raise ValueError(f"factors have rank {f.rank}; layer wants {r}")
        if f.spatial != self.spatial:
            raise ValueError(f"factors are {f.spatial}; the layer's kernels are {self.spatial}")
        self.pointwise_in.weight.copy_(f.inp.transpose(1, 2).reshape(g * r, c // g, 1, 1))
        if self.spatial == "full":
            k = f.vertical * f.horizontal  # (g, kh·kw, R)
            self.vertical.weight.copy_(k.transpose(1, 2).reshape(g * r, 1, kh, kw))
        else:
            self.vertical.weight.copy_(f.vertical.transpose(1, 2).reshape(g * r, 1, kh, 1))
            self.horizontal.weight.copy_(f.horizontal.transpose(1, 2).reshape(g * r, 1, 1, kw))
        self.pointwise_out.weight.copy_(f.out.reshape(n, r, 1, 1))

    def factors(self) -> CPFactors:
        """The layer's current weights as :class:`~decouple.factor.cp.CPFactors`."""
        g, r, (kh, kw) = self.groups, self.rank, self.kernel_size
        n, c = self.out_channels, self.in_channels

        def w(conv):
            return conv.weight.detach().double().cpu()

        if self.spatial == "full":
            return CPFactors(
                (n, c // g, kh, kw),
                g,
                out=w(self.pointwise_out).reshape(g, n // g, r),
                inp=w(self.pointwise_in).reshape(g, r, c // g).transpose(1, 2),
                vertical=w(self.vertical).reshape(g, r, kh * kw).transpose(1, 2),
                horizontal=torch.ones(g, 1, r, dtype=torch.float64),
                iterations=[],
                converged=True,
            )
        return CPFactors(
            (n, c // g, kh, kw),
            g,
            out=w(self.pointwise_out).reshape(g, n // g, r),
            inp=w(self.pointwise_in).reshape(g, r, c // g).transpose(1, 2),
            vertical=w(self.vertical).reshape(g, r, kh).transpose(1, 2),
            horizontal=w(self.horizontal).reshape(g, r, kw).transpose(1, 2),
            iterations=[],
            converged=True,
        )

    def extra_repr(self) -> str:
        real = "" if self.realization == "separable" else f", realization={self.realization!r}"
        real += ", spatial='full'" if self.spatial == "full" else ""
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"method='cp', rank={self.rank}" + real + self._geometry_repr()
        )


class TuckerConv2d(FactorizedConv2d):
    """A k×k convolution as a Tucker-2 bottleneck per group, in three plain convs.

    Parameters
    ----------
    in_channels, out_channels, kernel_size
        As the original conv.
    ranks : (int, int)
        ``(R_out, R_in)`` per group: the core conv maps ``g·R_in`` to ``g·R_out`` channels.
    stride, padding, dilation, groups, bias, padding_mode
        As in ``nn.Conv2d``; the core conv carries the spatial ones.
    """

    method = "tucker"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        ranks,
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
        r_out, r_in = (ranks, ranks) if isinstance(ranks, int) else tuple(ranks)
        if min(r_out, r_in) < 1:
            raise ValueError(f"Tucker ranks must be >= 1; got {ranks!r}")
        self.ranks = (int(r_out), int(r_in))
        g, kw_ = groups, dict(device=device, dtype=dtype)
        self.pointwise_in = nn.Conv2d(in_channels, g * r_in, 1, groups=g, bias=False, **kw_)
        self.core = nn.Conv2d(
            g * r_in, g * r_out, self.kernel_size, stride=self.stride, padding=self.padding,
            dilation=self.dilation, groups=g, bias=False, padding_mode=padding_mode, **kw_,
        )  # fmt: skip
        self.pointwise_out = nn.Conv2d(g * r_out, out_channels, 1, groups=g, bias=bias, **kw_)

    @property
    def rank(self) -> int:
        """The larger of the two ranks (for tables that show one number)."""
        return max(self.ranks)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.core(self.pointwise_in(x))

    @classmethod
    def empty_like(cls, conv: nn.Conv2d, ranks) -> TuckerConv2d:
        """An uninitialised layer with ``conv``'s geometry; ``ranks`` clipped to full."""
        return super().empty_like(conv, tucker_ranks(tuple(conv.weight.shape), conv.groups, ranks))

    @staticmethod
    def _rank_of(factors: TuckerFactors) -> tuple[int, int]:
        return factors.ranks

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, ranks=None, seed: int = 0) -> TuckerConv2d:
        """Tucker-2 of ``conv`` at ``ranks`` (``None``: full ranks, which is exact)."""
        if ranks is None:
            ranks = (conv.out_channels, conv.in_channels)
        return cls.from_factors(conv, tucker2_weight(conv.weight, ranks, conv.groups, seed))

    @torch.no_grad()
    def load_factors(self, f: TuckerFactors) -> None:
        g, (r_out, r_in) = self.groups, self.ranks
        n, c = self.out_channels, self.in_channels
        if f.ranks != self.ranks:
            raise ValueError(f"factors have ranks {f.ranks}; layer wants {self.ranks}")
        self.pointwise_in.weight.copy_(f.inp.transpose(1, 2).reshape(g * r_in, c // g, 1, 1))
        self.core.weight.copy_(f.core.reshape(g * r_out, r_in, *self.kernel_size))
        self.pointwise_out.weight.copy_(f.out.reshape(n, r_out, 1, 1))

    def factors(self) -> TuckerFactors:
        """The layer's current weights as :class:`~decouple.factor.tucker.TuckerFactors`."""
        g, (r_out, r_in), (kh, kw) = self.groups, self.ranks, self.kernel_size
        n, c = self.out_channels, self.in_channels

        def w(conv):
            return conv.weight.detach().double().cpu()

        return TuckerFactors(
            (n, c // g, kh, kw),
            g,
            core=w(self.core).reshape(g, r_out, r_in, kh, kw),
            out=w(self.pointwise_out).reshape(g, n // g, r_out),
            inp=w(self.pointwise_in).reshape(g, r_in, c // g).transpose(1, 2),
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"method='tucker', ranks={self.ranks}" + self._geometry_repr()
        )

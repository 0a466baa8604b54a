"""Second moments of a convolution's input patches and outputs, for closed-form least squares.

A conv is a linear map on k×k input patches. With ``p`` a patch (flattened ``(C/g, kh, kw)``,
then a constant 1 for the bias) and ``y`` the wanted output at that pixel, the squared error of
any kernel ``w`` over a set of images is ``wᵀ XX w − 2 wᵀ XY + YY``, where ``XX = Σ p pᵀ``,
``XY = Σ p yᵀ`` and ``YY = Σ y²``. So a few matrices summarise the images: every refit and every
per-rank error estimate reads them instead of the activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..nn import shards
from ..nn.geometry import geometry_of, is_linear

POSITIONS = 1024  # output pixels per image the moments read at most
# Samples (output pixels over all images) a layer's moments read: SAMPLES_PER_FEATURE per
# feature of its patches, at least MIN_SAMPLES. Their cost grows as samples × features², so as
# features³; on the CIFAR nets with
# the floor off, 16 per feature kept the top-1 of reading every pixel
# (experiments/default_path_cost.py).
SAMPLES_PER_FEATURE = 16
MIN_SAMPLES = 1 << 15

_PAD_MODES = {
    "zeros": "constant",
    "reflect": "reflect",
    "replicate": "replicate",
    "circular": "circular",
}


def explicit_padding(conv: nn.Module) -> tuple[int, int, int, int]:
    """``(left, right, top, bottom)`` padding of ``conv``, resolving ``'same'`` and ``'valid'``."""
    (kh, kw), (dh, dw) = conv.kernel_size, conv.dilation
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":  # PyTorch puts the odd pixel of an even total on the right/bottom
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


def patches(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """All receptive-field patches of ``conv`` over ``x``: shape ``(B·H'·W', C·kh·kw)``.

    Works for ``nn.Conv2d`` and ``DecoupledConv2d`` alike (both carry the original geometry);
    columns are ordered like a flattened kernel ``(C, kh, kw)``.
    """
    pad = explicit_padding(conv)
    if any(pad):
        x = F.pad(x, pad, mode=_PAD_MODES[conv.padding_mode])
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def features_of(conv: nn.Module) -> int:
    """Features of one group's patch, ``(C/g)·kh·kw`` (a linear layer's: its inputs)."""
    g = geometry_of(conv)
    return g.in_channels // g.groups * g.kernel_size[0] * g.kernel_size[1]


def positions_for(conv: nn.Module, images: int | None) -> int:
    """Output pixels per image to read from ``images`` images: enough for
    ``max(MIN_SAMPLES, SAMPLES_PER_FEATURE·(F+1))`` samples in all, at most :data:`POSITIONS`
    (and at least one); :data:`POSITIONS` when the number of images is not known."""
    if not images:
        return POSITIONS
    wanted = max(MIN_SAMPLES, SAMPLES_PER_FEATURE * (features_of(conv) + 1))
    return max(1, min(POSITIONS, -(-wanted // images)))


def _pixels(image: int, hw: int, keep: int) -> torch.Tensor:
    """The ``keep`` of ``hw`` output pixels image number ``image`` contributes (seeded)."""
    gen = torch.Generator().manual_seed(image * 1_000_003 + hw)
    return torch.randperm(hw, generator=gen)[:keep].sort().values


def patches_at(x: torch.Tensor, conv: nn.Module, b, i, j) -> torch.Tensor:
    """The patches of :func:`patches` at output pixels ``(i, j)`` of images ``b`` only:
    ``(len(b), C·kh·kw)``. A strided view gathers them, so the unread pixels cost nothing (an
    unfold of every pixel costs more than the products of a few)."""
    pad = explicit_padding(conv)
    if any(pad):
        x = F.pad(x, pad, mode=_PAD_MODES[conv.padding_mode])
    (kh, kw), (dh, dw), (sh, sw) = conv.kernel_size, conv.dilation, conv.stride
    view = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
    return view[b, :, i, j].reshape(len(b), -1)  # (n, C, kh, kw), flattened like a kernel


@dataclass
class Moments:
    """Per conv group ``j``: ``xx[j]`` ``(F+1, F+1)``, ``xy[j]`` ``(F+1, N/g)``; ``yy`` ``(N,)``.

    ``F = (C/g)·kh·kw``; the last row/column is the constant 1 that carries the bias.
    """

    xx: torch.Tensor
    xy: torch.Tensor
    yy: torch.Tensor
    count: int = 0

    @classmethod
    def zeros(cls, conv: nn.Module) -> Moments:
        conv = geometry_of(conv)
        g = conv.groups
        f = conv.in_channels // g * conv.kernel_size[0] * conv.kernel_size[1]
        n = conv.out_channels
        z = dict(dtype=torch.float64)
        return cls(
            torch.zeros(g, f + 1, f + 1, **z),
            torch.zeros(g, f + 1, n // g, **z),
            torch.zeros(n, **z),
        )

    @staticmethod
    def zeros_bytes(conv: nn.Module) -> int:
        """Bytes :meth:`zeros` takes for ``conv`` (float64 ``xx``, ``xy``, ``yy``)."""
        g = geometry_of(conv)
        f = g.in_channels // g.groups * g.kernel_size[0] * g.kernel_size[1]
        return 8 * (g.groups * (f + 1) ** 2 + (f + 1) * g.out_channels + g.out_channels)

    @torch.no_grad()
    def add(
        self,
        conv: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        chunk: int = 8192,
        max_elements: int = 1 << 25,
        positions: int | None = POSITIONS,
        index: int | torch.Tensor = 0,
        rows: torch.Tensor | None = None,
    ) -> None:
        """Accumulate the patches of ``x`` under ``conv``'s geometry against targets ``y``.

        Images go through in groups whose unfolded patches hold at most ``max_elements`` numbers
        (at least one image), and the products in chunks of at most ``chunk`` patches and 16 M
        numbers, so a batch of 224×224 images never sits in memory unfolded. Each chunk's
        products are float32 for float32 activations (twice as fast as float64 on a CPU, and as
        accurate as the activations they read: checked against float64 in the tests), summed
        into float64. Where
        an output has more than ``positions`` pixels, each image contributes that many, drawn at
        random per image and seeded by its index in the set (``index``: the batch's first image's,
        or every image's as a tensor),
        so the moments do not depend on how the images are batched or sharded. ``rows``: the
        images of ``x`` to read (default all; gathered where they are, never copied out whole).
        A linear layer's inputs ``(..., C)`` are read as a 1×1 conv's, one position per row.
        """
        if is_linear(conv):
            conv = geometry_of(conv)
            x = x.reshape(-1, conv.in_channels, 1, 1)
            y = y.reshape(-1, conv.out_channels, 1, 1)
        hw = y.shape[2] * y.shape[3]
        keep = positions if positions is not None and hw > positions else None
        width = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        step = max(1, max_elements // max(1, min(hw, keep or hw) * width))
        chunk = min(chunk, max(256, (1 << 24) // (width + 1)))  # a 4,609-wide patch: 3,640 rows
        index = index if isinstance(index, torch.Tensor) else torch.arange(len(x)) + index
        rows = torch.arange(len(x)) if rows is None else rows.to("cpu")
        for i in range(0, len(rows), step):
            sel = rows[i : i + step]
            self._add(conv, x, y, chunk, keep, index[sel], sel)

    def _add(self, conv, x, y, chunk: int, keep: int | None, index, sel: torch.Tensor) -> None:
        """The products of images ``sel`` of ``x`` and ``y`` (numbered ``index`` in the set)."""
        g, n = conv.groups, conv.out_channels
        if keep is None:
            whole = len(sel) == len(x) and bool((sel == torch.arange(len(x))).all())
            x, y = (x, y) if whole else (x[sel.to(x.device)], y[sel.to(y.device)])
            p = patches(x, conv)
            t = y.permute(0, 2, 3, 1).reshape(-1, n)
        else:  # the same pixels of patches and targets, different in each image
            hw, w_out = y.shape[2] * y.shape[3], y.shape[3]
            pix = torch.cat([_pixels(int(i), hw, keep) for i in index]).to(x.device)
            b = sel.to(x.device).repeat_interleave(keep)
            p = patches_at(x, conv, b, pix // w_out, pix % w_out)
            t = y.permute(0, 2, 3, 1)[b, pix // w_out, pix % w_out]
        if p.shape[0] != t.shape[0]:
            raise ValueError(
                f"{p.shape[0]} patches but {t.shape[0]} target pixels: geometry mismatch"
            )
        f = p.shape[1] // g
        # float32 products of float32 activations (float64 ones stay float64), float64 sums
        dtype = torch.promote_types(torch.promote_types(p.dtype, t.dtype), torch.float32)
        for i in range(0, p.shape[0], chunk):
            pc = p[i : i + chunk].to(dtype)
            tc = t[i : i + chunk].to(dtype)
            ones = torch.ones(pc.shape[0], 1, dtype=dtype, device=pc.device)
            for j in range(g):
                pj = torch.cat([pc[:, j * f : (j + 1) * f], ones], dim=1)
                self.xx[j] += (pj.T @ pj).cpu().double()
                self.xy[j] += (pj.T @ tc[:, j * (n // g) : (j + 1) * (n // g)]).cpu().double()
            self.yy += tc.double().square().sum(0).cpu()
        self.count += p.shape[0]

    def all_sum_(self) -> Moments:
        """Add up every process's moments, in place (:mod:`decouple.nn.shards`); returns self."""
        if shards.world()[1] > 1:
            count = torch.tensor([float(self.count)], dtype=torch.float64)
            shards.all_sum_(self.xx, self.xy, self.yy, count)
            self.count = int(count.item())
        return self

    def error(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Summed squared error per output channel of kernel ``weight`` ``(N, C/g, kh, kw)``."""
        g = self.xx.shape[0]
        n = weight.shape[0]
        # the moments live on the CPU (float64), wherever the model runs
        w = weight.detach().double().cpu().reshape(g, n // g, -1)
        b = torch.zeros(n, dtype=torch.float64) if bias is None else bias.detach().double().cpu()
        w = torch.cat([w, b.reshape(g, n // g, 1)], dim=2)  # (g, N/g, F+1)
        quad = torch.einsum("gnf,gfe,gne->gn", w, self.xx, w)
        cross = torch.einsum("gnf,gfn->gn", w, self.xy)
        return (quad - 2 * cross).reshape(n) + self.yy

    def relative_error(self, weight: torch.Tensor, bias: torch.Tensor | None) -> float:
        """``‖y − ŷ‖ / ‖y‖`` over all accumulated pixels and channels."""
        total = float(self.yy.sum())
        err = float(self.error(weight, bias).sum().clamp_min(0))
        return (err / total) ** 0.5 if total > 0 else err**0.5

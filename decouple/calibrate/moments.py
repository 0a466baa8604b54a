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

from ..nn.geometry import geometry_of, is_linear

POSITIONS = 1024  # output pixels per image the moments read: all of a 32×32 layer

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

    @torch.no_grad()
    def add(
        self,
        conv: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        chunk: int = 8192,
        max_elements: int = 1 << 25,
        positions: int | None = POSITIONS,
    ) -> None:
        """Accumulate the patches of ``x`` under ``conv``'s geometry against targets ``y``.

        Images go through in groups whose unfolded patches hold at most ``max_elements`` numbers
        (at least one image), and the float64 products in chunks of at most ``chunk`` patches
        and 16 M numbers, so a batch of 224×224 images never sits in memory unfolded. Where an output
        has more than ``positions`` pixels, only that many are used, the same in every image
        (chosen at random once per output size): a 224×224 layer has 50,176 per image, far more
        than its moments need, at a cost of ``(C·k²)²`` each. A linear layer's inputs
        ``(..., C)`` are read as a 1×1 conv's, one position per row.
        """
        if is_linear(conv):
            conv = geometry_of(conv)
            x = x.reshape(-1, conv.in_channels, 1, 1)
            y = y.reshape(-1, conv.out_channels, 1, 1)
        hw = y.shape[2] * y.shape[3]
        keep = None
        if positions is not None and hw > positions:
            gen = torch.Generator().manual_seed(hw)
            keep = torch.randperm(hw, generator=gen)[:positions].sort().values.to(x.device)
        width = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        step = max(1, max_elements // max(1, hw * width))
        chunk = min(chunk, max(256, (1 << 24) // (width + 1)))  # a 4,609-wide patch: 3,640 rows
        for i in range(0, len(x), step):
            self._add(conv, x[i : i + step], y[i : i + step], chunk, keep)

    def _add(self, conv, x: torch.Tensor, y: torch.Tensor, chunk: int, keep) -> None:
        g, n = conv.groups, conv.out_channels
        p = patches(x, conv)
        t = y.permute(0, 2, 3, 1).reshape(-1, n)
        if p.shape[0] != t.shape[0]:
            raise ValueError(
                f"{p.shape[0]} patches but {t.shape[0]} target pixels: geometry mismatch"
            )
        if keep is not None:
            p = p.reshape(len(x), -1, p.shape[1])[:, keep].reshape(-1, p.shape[-1])
            t = t.reshape(len(x), -1, n)[:, keep].reshape(-1, n)
        f = p.shape[1] // g
        for i in range(0, p.shape[0], chunk):  # float64 sums, bounded memory
            pc = p[i : i + chunk].double()
            tc = t[i : i + chunk].double()
            ones = torch.ones(pc.shape[0], 1, dtype=torch.float64)
            for j in range(g):
                pj = torch.cat([pc[:, j * f : (j + 1) * f], ones], dim=1)
                self.xx[j].addmm_(pj.T, pj)  # in place: no (C·k²)² temporary per chunk
                self.xy[j].addmm_(pj.T, tc[:, j * (n // g) : (j + 1) * (n // g)])
            self.yy += tc.square().sum(0)
        self.count += p.shape[0]

    def error(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Summed squared error per output channel of kernel ``weight`` ``(N, C/g, kh, kw)``."""
        g = self.xx.shape[0]
        n = weight.shape[0]
        w = weight.detach().double().reshape(g, n // g, -1)
        b = torch.zeros(n, dtype=torch.float64) if bias is None else bias.detach().double()
        w = torch.cat([w, b.reshape(g, n // g, 1)], dim=2)  # (g, N/g, F+1)
        quad = torch.einsum("gnf,gfe,gne->gn", w, self.xx, w)
        cross = torch.einsum("gnf,gfn->gn", w, self.xy)
        return (quad - 2 * cross).reshape(n) + self.yy

    def relative_error(self, weight: torch.Tensor, bias: torch.Tensor | None) -> float:
        """``‖y − ŷ‖ / ‖y‖`` over all accumulated pixels and channels."""
        total = float(self.yy.sum())
        err = float(self.error(weight, bias).sum().clamp_min(0))
        return (err / total) ** 0.5 if total > 0 else err**0.5

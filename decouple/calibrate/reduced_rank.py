"""Reduced-rank regression from second moments: the data-aware refit of low-rank (``svd``) layers.

A low-rank layer computes ``y = B·A·x + b`` with ``A`` ``(R, F)`` and ``B`` ``(N, R)``. Given the
inputs ``x`` it will see and the outputs ``y`` it should give, the best rank-``R`` map in least
squares has a closed form (reduced-rank regression; for a layer fit to its own outputs it is
Zhang et al. 2015's "channel decomposition"): solve the full least squares ``W = argmin ‖y − W x‖``,
then project its fitted outputs on their top ``R`` principal directions ``U_R``:
``B = U_R``, ``A = U_Rᵀ W``. The bias is left free, so inputs and outputs are centred first.

This beats refitting the second factor with the first kept from the kernel's SVD (which ignores
how the inputs are distributed), and one eigendecomposition prices every rank: the held-out error
at each ``R`` is a cumulative sum (:func:`lowrank_losses`). Everything reads the moments of
:mod:`decouple.calibrate.moments`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn.geometry import geometry_of
from .moments import Moments
from .refit import _ridge_solve, _split

# The moments of a layer reading F features hold (F+1)² float64 numbers per group: a linear layer
# of 25,088 inputs (VGG-16's first classifier layer) would need 5 GB. Past this size (2^26
# elements, 512 MB; F up to 8,191) the layer is neither priced on data nor refit.
MAX_MOMENT_ELEMENTS = 1 << 26


RIDGE_STEPS = 4  # ridges tried: ridge, 10·ridge, 100·ridge, 1000·ridge


def ridges(ridge: float) -> list[float]:
    """The ridge strengths a low-rank refit tries, keeping the one best on held-out images: a
    layer reading a 1×1 map sees one sample per image, as few as it has weights per output."""
    return [ridge * 10**k for k in range(RIDGE_STEPS)]


def moments_fit(layer: nn.Module) -> bool:
    """Whether ``layer``'s moments (``g·(F+1)²`` numbers, ``F = C/g·kh·kw``) are small enough to
    collect (see :data:`MAX_MOMENT_ELEMENTS`)."""
    g = geometry_of(layer)
    features = g.in_channels // g.groups * g.kernel_size[0] * g.kernel_size[1]
    return g.groups * (features + 1) ** 2 <= MAX_MOMENT_ELEMENTS


def _regression(m: Moments, j: int, w0: torch.Tensor, centre: bool, ridge: float):
    """Full least squares of group ``j``'s targets on its inputs: ``(W (F, N/g), x mean, y mean)``
    (means zero when not ``centre``d), the ridge pulling towards ``w0`` ``(F, N/g)``."""
    xx, xb, cnt, xy, yb = _split(m, j)
    if centre and cnt > 0:
        mx, my = xb / cnt, yb / cnt
        xx = xx - cnt * torch.outer(mx, mx)
        xy = xy - cnt * torch.outer(mx, my)
    else:
        mx, my = torch.zeros_like(xb), torch.zeros_like(yb)
    return _ridge_solve(xx.clone(), xy, w0, ridge), xx, mx, my


# The top singular vectors of a widening layer's root come from the F×F Gram matrix while the
# smallest one kept is this far above the largest (squared): their error grows as the ratio.
GRAM_MIN_RATIO = 1e-8


def _principal(w: torch.Tensor, cov: torch.Tensor, top: int | None = None) -> torch.Tensor:
    """Eigenvectors ``(N, K)`` of the fitted outputs' covariance ``Wᵀ·cov·W`` with ``W`` ``(F, N)``,
    ``K = min(F, N)`` (its rank at most; the first ``top`` only, if given), largest first, signs
    fixed (largest entry of each positive) so results repeat."""
    f, n = w.shape
    if f < n:  # a widening layer (ResNet-50's 512 → 2048): an F-sized problem, not an N-sized one
        lam, q = torch.linalg.eigh((cov + cov.T) / 2)
        root = (q * lam.clamp_min(0).sqrt()).T @ w  # rootᵀ·root = Wᵀ·cov·W
        u = None
        if top is not None:  # rootᵀ's top left singular vectors from the F×F Gram: 5× faster
            s2, left = torch.linalg.eigh(root @ root.T)
            s2, left = s2.flip(0)[:top], left.flip(-1)[:, :top]
            if s2[-1] > GRAM_MIN_RATIO * s2[0] > 0:
                u = (root.T @ left) / s2.sqrt()
        if u is None:
            u = torch.linalg.svd(root, full_matrices=False).Vh.T
    else:
        fitted = w.T @ cov @ w
        u = torch.linalg.eigh((fitted + fitted.T) / 2)[1].flip(-1)[:, : min(f, n)]
    u = u if top is None else u[:, :top]
    idx = u.abs().argmax(0, keepdim=True)
    signs = torch.gather(u, 0, idx).sign()
    return u * torch.where(signs == 0, torch.ones_like(signs), signs)


def refit_lowrank(f, bias: torch.Tensor | None, m: Moments, ridge: float = 1e-4, anchor=None):
    """Both factors of a low-rank layer (and its bias) by reduced-rank regression.

    Parameters
    ----------
    f : LowRankFactors
        The layer's current factors: their rank, and the ridge's anchor unless ``anchor``.
    bias : torch.Tensor or None
        ``(N,)``; None: the layer has no bias, and none is fit.
    m : Moments
        Patch moments of the layer's inputs against the outputs it should give.
    anchor : torch.Tensor, optional
        The kernel the ridge pulls the full least squares towards: the original layer's (what
        :func:`lowrank_losses` prices with), else the factors' own.

    Returns
    -------
    out ``(g, N/g, R)``, inp ``(g, R, F)``, bias ``(N,)`` or None, and the kernel they make.
    """
    g, ng, r = f.out.shape
    if anchor is None:
        w_now = torch.einsum("gnr,grf->gfn", f.out, f.inp)
    else:
        w_now = anchor.detach().double().cpu().reshape(g, ng, -1).transpose(1, 2)
    outs, inps, biases = [], [], []
    for j in range(g):
        w, cov, mx, my = _regression(m, j, w_now[j], bias is not None, ridge)
        u = _principal(w, cov, r)  # (N/g, R)
        inp = u.T @ w.T  # (R, F)
        outs.append(u)
        inps.append(inp)
        if bias is not None:
            biases.append(my - u @ (inp @ mx))
    out, inp = torch.stack(outs), torch.stack(inps)
    kernel = torch.einsum("gnr,grf->gnf", out, inp).reshape(f.weight_shape)
    return out, inp, (torch.cat(biases) if bias is not None else None), kernel


def lowrank_losses(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    groups: int,
    ranks: list[int],
    fit: Moments,
    val: Moments,
    ridge: float = 1e-4,
) -> list[float]:
    """Held-out squared relative output error of the reduced-rank refit at every rank in
    ``ranks``, from one eigendecomposition per group.

    With ``P_R = U_R U_Rᵀ`` and the fit's map written on augmented inputs ``[x; 1]`` as
    ``P_R·A + B`` (``A = [W, −W·x̄]``, ``B = [0, ȳ]``), every term of the held-out error
    ``Σ‖y − ŷ‖²`` is a trace against ``P_R``, i.e. a sum of the first ``R`` diagonal entries of a
    matrix in the ``U`` basis: cumulative sums give every rank at once. Each rank's error is the
    best over :func:`ridges`, as the refit chooses.
    """
    per_ridge = [_losses_at(weight, bias, groups, ranks, fit, val, lam) for lam in ridges(ridge)]
    return [min(col) for col in zip(*per_ridge, strict=True)]


def _losses_at(weight, bias, groups, ranks, fit, val, ridge):
    """:func:`lowrank_losses` at one ridge strength."""
    w_all = weight.detach().double().cpu()
    n = w_all.shape[0]
    ng = n // groups
    w0 = w_all.reshape(groups, ng, -1).transpose(1, 2)  # (g, F, N/g)
    centre = bias is not None
    total = float(val.yy.sum())
    # error at R = 1 … min(F, N/g), summed over groups (no rank past that changes the fit)
    err = torch.zeros(min(ng, w0.shape[1]), dtype=torch.float64)
    const = 0.0
    for j in range(groups):
        w, cov, mx, my = _regression(fit, j, w0[j], centre, ridge)
        u = _principal(w, cov)
        a = torch.cat([w.T, -(w.T @ mx)[:, None]], 1)  # (N/g, F+1)
        b = torch.zeros_like(a)
        b[:, -1] = my
        xx, xy = val.xx[j], val.xy[j]
        axx = a @ xx
        d_quad = ((u.T @ (axx @ a.T)) * u.T).sum(1)  # diag of Uᵀ A XX Aᵀ U
        d_mix = ((u.T @ (axx @ b.T)) * u.T).sum(1)  # diag of Uᵀ A XX Bᵀ U
        d_cross = ((u.T @ (a @ xy)) * u.T).sum(1)  # diag of Uᵀ A XY U
        err += torch.cumsum(d_quad + 2 * d_mix - 2 * d_cross, 0)
        const += float((b @ xx * b).sum() - 2 * (b * xy.T).sum())
    per_rank = (err + const + total).clamp_min(0)
    scale = total if total > 0 else 1.0
    top = len(per_rank)
    return [float(per_rank[min(r, top) - 1]) / scale for r in ranks]

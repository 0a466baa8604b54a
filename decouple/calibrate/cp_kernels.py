"""Full kernels for a CP layer that runs as one depthwise ``kh×kw`` conv, chosen on held-out images.

A CP layer's ``square`` realization (1×1, one ``kh×kw`` depthwise conv, 1×1) already runs each
term's spatial filter as a whole 2-D kernel; only the factors make it an outer product of a
``kh×1`` and a ``1×kw`` one. Where a latency plan runs the layer that way, any 2-D filter costs
the same time, and the CP of the kernel read as an ``N × C × (kh·kw)`` tensor
(:func:`~decouple.factor.cp_full.cp_full_weight`) fits the original at least as closely at the same
rank. So calibration prices it beside the usual refit: both refit their last 1×1 conv (and bias)
on the calibration images, the full kernels also once more after their ``kh×kw`` kernels are
refit in turn (:func:`refit_kernels`, ``alternating``), and the one with the lower output error
on the held-out images is kept, as ``auto`` chooses every refit (the separable factors stay
where they measure better).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ..factor.cp import CPFactors
from ..factor.cp_full import cp_full_weight
from ..nn.factorized import CPConv2d
from .moments import Moments
from .refit import MAX_SYSTEM, _ridge_solve, _split, refit_factored

FULL = "full kernel"  # the calibration mode that gives a CP layer full kernels
FULL_ALTERNATING = "full kernel (alternating)"  # and then refits the kernels and the 1×1 again


def takes_full_kernels(layer: nn.Module, mode: str) -> bool:
    """Whether calibration prices full kernels for ``layer``: a separable CP layer that runs as
    ``square`` (one depthwise ``kh×kw`` conv, both sides > 1), under ``auto``."""
    return (
        mode == "auto"
        and isinstance(layer, CPConv2d)
        and layer.spatial == "separable"
        and layer.realization == "square"
        and min(layer.kernel_size) > 1
    )


@torch.no_grad()
def refit_cp_kernels(
    layer: CPConv2d, original: torch.Tensor, m_fit: Moments, m_val: Moments, ridge: float
) -> tuple[str, dict[str, float]]:
    """Refit ``layer`` (in place) as separable or full-kernel CP, whichever measures better.

    Parameters
    ----------
    layer : CPConv2d
        Separable, running as ``square``; may be turned into a full-kernel layer of its rank.
    original : torch.Tensor
        The kernel it replaced ``(N, C/g, kh, kw)`` (after BN folding): what the full kernels fit.
    m_fit, m_val : Moments
        Patch moments of the layer's inputs against the original layer's outputs: fit, held out.

    Returns
    -------
    (str, dict of str to float)
        The mode kept (``"data-free"``, ``"last"``, :data:`FULL` or :data:`FULL_ALTERNATING`)
        and each one's held-out relative output error.
    """
    factors = layer.factors()
    bias = None if layer.bias is None else layer.bias.detach().double().cpu()
    err = {"data-free": m_val.relative_error(factors.reconstruct(), bias)}
    fitted = {}
    full = cp_full_weight(original.detach(), layer.rank, layer.groups)
    tried = [("last", factors)] + ([(FULL, full)] if full.rank == layer.rank else [])
    for mode, f in tried:  # a full rank is clipped lower only where N, C/g < kh·kw: not tried
        out, new_bias, kernel = refit_factored(f, bias, m_fit, ridge)
        err[mode] = m_val.relative_error(kernel, new_bias)
        fitted[mode] = (replace(f, out=out), new_bias)
    if FULL in fitted and (layer.rank * full.vertical.shape[1]) ** 2 <= MAX_SYSTEM:
        f, b = fitted[FULL]
        f = refit_kernels(f, b, m_fit, ridge)
        out, new_bias, kernel = refit_factored(f, b, m_fit, ridge)
        err[FULL_ALTERNATING] = m_val.relative_error(kernel, new_bias)
        fitted[FULL_ALTERNATING] = (replace(f, out=out), new_bias)
    best = min(err, key=err.get)
    if best != "data-free":
        f, new_bias = fitted[best]
        if best in (FULL, FULL_ALTERNATING):
            layer.make_full_()
        layer.load_factors(f)
        if new_bias is not None:
            layer.bias.copy_(new_bias.to(layer.bias.device, layer.bias.dtype))
    return best, err


def refit_kernels(f: CPFactors, bias: torch.Tensor | None, m: Moments, ridge: float) -> CPFactors:
    """Full-kernel factors ``f`` with every term's ``kh×kw`` kernel refit by ridge least squares,
    both 1×1 convs (and the bias) fixed.

    The output is linear in the kernels: ``ŷ_n = Σ_{r,p} out[n,r] · kernel[p,r] · z_r(p)``,
    ``z_r(p)`` the first 1×1 conv's channel ``r`` at tap ``p`` of the patch. So the normal
    equations come from the patch moments: ``(outᵀout)[r,r'] · E[z_r(p) z_r'(p')]``, each
    ``E[z z]`` block ``inp`` applied to the patch moments on both sides.
    """
    g, k, r = f.groups, f.vertical.shape[1], f.rank
    vertical = f.vertical.clone()
    eye, ng = torch.eye(k, dtype=torch.float64), f.out.shape[1]
    for j in range(g):
        xx, xb, _, xy, _ = _split(m, j)
        u = f.out[j]  # (N/g, R)
        to_z = torch.einsum("cr,pq->rpcq", f.inp[j], eye).reshape(r * k, -1)  # patch → z_r(p)
        uu = (u.T @ u).repeat_interleave(k, 0).repeat_interleave(k, 1)
        a = (to_z @ xx @ to_z.T) * uu
        zy = to_z @ xy  # Σ z_r(p) y_n
        if bias is not None:
            zy = zy - (to_z @ xb)[:, None] * bias[j * ng : (j + 1) * ng][None, :]
        rhs = (zy * u.T.repeat_interleave(k, 0)).sum(1, keepdim=True)
        start = vertical[j].T.reshape(-1, 1)  # (R·k, 1), term-major
        vertical[j] = _ridge_solve(a, rhs, start, ridge).reshape(r, k).T
    return replace(f, vertical=vertical)

"""Full-kernel CP: each term's spatial filter any ``kh×kw`` kernel, not an outer product.

Separable CP (:func:`~decouple.factor.cp.cp_weight`, Lebedev et al. 2015) reads a kernel as a
four-way tensor, so each term's filter is a ``kh×1`` times a ``1×kw`` one. Read as a three-way
``N × C/g × (kh·kw)`` tensor instead, the same ALS gives terms with whole 2-D filters: a strictly
larger family at the same rank, which runs as three convs (the CP layer's ``square`` graph).

Nothing here knows about ``nn.Module``.
"""

from __future__ import annotations

import torch

from .cp import CP_MAX_ITER, CP_TOL, CPFactors, cp_weight


def cp_full_weight(
    weight: torch.Tensor,
    rank: int,
    groups: int = 1,
    n_iter_max: int = CP_MAX_ITER,
    tol: float = CP_TOL,
    seed: int = 0,
) -> CPFactors:
    """Rank-``rank`` CP of every group's kernel read as a three-way ``N × C/g × (kh·kw)`` tensor.

    Each term keeps a whole ``kh×kw`` kernel instead of the outer product of a ``kh×1`` and a
    ``1×kw`` one, so a term's spatial filter is any 2-D filter, not only a separable one:

        W[n, c, i, j] ≈ Σ_r  out[n, r] · inp[c, r] · kernel[i, j, r]

    The separable CP of :func:`cp_weight` is the special case ``kernel = vertical ⊗
    horizontal``, so at the same rank this fits at least as well where ALS finds its optimum.
    It runs as three plain convs: 1×1 ``C → R``, one depthwise ``kh×kw``, 1×1 ``R → N`` (a CP
    layer's ``square`` realization, at ``kh·kw`` rather than ``kh + kw`` multiply-adds per term
    and pixel for the depthwise step: what a latency plan pays anyway when it runs CP as three
    ops). Computed by the same ALS engine on the reshaped kernel.

    Returns
    -------
    CPFactors
        ``spatial == "full"``: ``vertical`` ``(g, kh·kw, R)`` holds the flattened kernels (unit
        columns) and ``horizontal`` ``(g, 1, R)`` is ones.
    """
    n, cg, kh, kw = weight.shape
    f = cp_weight(weight.reshape(n, cg, kh * kw, 1), rank, groups, n_iter_max, tol, seed)
    f.vertical = f.vertical * f.horizontal  # a one-entry mode: a scalar per term (±1 here)
    f.horizontal = torch.ones_like(f.horizontal)
    f.weight_shape = (n, cg, kh, kw)
    return f

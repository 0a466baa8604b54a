"""CP (canonical polyadic) decomposition of a conv kernel, as pure tensor math (Lebedev et al. 2015).

The kernel ``W`` ``(N, C/g, kh, kw)`` of every conv group is approximated by ``R`` rank-one terms
(tensorly's ``parafac``, CP-ALS from an SVD start)::

    W[n, c, i, j] ≈ Σ_r  out[n, r] · inp[c, r] · vertical[i, r] · horizontal[j, r]

which runs as four plain convs: 1×1 ``C → R``, depthwise ``kh×1``, depthwise ``1×kw``,
1×1 ``R → N`` (see :class:`decouple.nn.factorized.CPConv2d`). A MobileNet-style block is the special
case where one factor is the identity, so CP is the most compact of the three methods, but ALS is
iterative and need not converge: every result says whether it did.

Nothing here knows about ``nn.Module``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .tensorly_compat import run_parafac

CP_MAX_ITER = 100
CP_TOL = 1e-6


def cp_max_rank(weight_shape: tuple[int, ...], groups: int = 1) -> int:
    """Largest CP rank worth asking for: every group's kernel is a sum of this many rank-one terms
    (the product of all its dimensions but the largest), so more terms cannot help."""
    n, cg, kh, kw = weight_shape
    dims = (n // groups, cg, kh, kw)
    return int(np.prod(dims) // max(dims))


@dataclass
class CPFactors:
    """CP factors of a grouped conv kernel, one set per group (float64).

    Attributes
    ----------
    weight_shape : tuple
        ``(N, C/g, kh, kw)`` of the kernel.
    groups : int
    out : torch.Tensor
        ``(g, N/g, R)``; carries the scale of every term.
    inp : torch.Tensor
        ``(g, C/g, R)``, unit columns.
    vertical, horizontal : torch.Tensor
        ``(g, kh, R)`` and ``(g, kw, R)``, unit columns.
    iterations : list of int
        ALS iterations run, per group.
    converged : bool
        Whether ALS stopped on its tolerance in every group (rather than on ``n_iter_max``).
    """

    weight_shape: tuple[int, ...]
    groups: int
    out: torch.Tensor
    inp: torch.Tensor
    vertical: torch.Tensor
    horizontal: torch.Tensor
    iterations: list[int]
    converged: bool

    @property
    def rank(self) -> int:
        return int(self.out.shape[-1])

    def reconstruct(self) -> torch.Tensor:
        """The kernel the factors represent, ``(N, C/g, kh, kw)`` in float64."""
        w = torch.einsum(
            "gnr,gcr,gir,gjr->gncij", self.out, self.inp, self.vertical, self.horizontal
        )
        return w.reshape(self.weight_shape)

    def head_matrix(self) -> torch.Tensor:
        """``(g, R, C/g·kh·kw)``: what the convs before the last 1×1 compute from a patch."""
        g, _, cg, kh, kw = (self.groups, *self.weight_shape)
        m = torch.einsum("gcr,gir,gjr->grcij", self.inp, self.vertical, self.horizontal)
        return m.reshape(g, self.rank, cg * kh * kw)

    def relative_error(self, weight: torch.Tensor) -> float:
        """``‖W − Ŵ‖_F / ‖W‖_F`` against the original kernel."""
        w = weight.detach().double().cpu()
        denom = float(w.norm())
        diff = float((w - self.reconstruct()).norm())
        return diff / denom if denom > 0 else diff


def _normalise(out, inp, vertical, horizontal):
    """Unit ``inp``/``vertical``/``horizontal`` columns with a positive largest entry; terms sorted
    by scale. CP is unique only up to such scalings and permutations: fixing them makes results
    repeat, and keeps the magnitudes of the three inner convs near 1 (good for float32)."""
    for f in (inp, vertical, horizontal):
        norms = f.norm(dim=0)
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        idx = f.abs().argmax(dim=0)
        signs = f[idx, torch.arange(f.shape[1])].sign()
        signs = torch.where(signs == 0, torch.ones_like(signs), signs)
        f /= safe * signs
        out *= safe * signs
    order = torch.argsort(out.norm(dim=0), descending=True, stable=True)
    return out[:, order], inp[:, order], vertical[:, order], horizontal[:, order]


def cp_weight(
    weight: torch.Tensor,
    rank: int,
    groups: int = 1,
    n_iter_max: int = CP_MAX_ITER,
    tol: float = CP_TOL,
    seed: int = 0,
) -> CPFactors:
    """Rank-``rank`` CP decomposition of every group of a conv kernel.

    Parameters
    ----------
    weight : torch.Tensor
        ``(N, C/g, kh, kw)``; computed in float64 on the CPU.
    rank : int
        Terms per group, ``R >= 1``; clipped to :func:`cp_max_rank`.
    groups : int
        The conv's ``groups``; each group is decomposed on its own.
    n_iter_max, tol : int, float
        ALS stops after ``n_iter_max`` sweeps or when the relative reconstruction error changes
        by less than ``tol``.
    seed : int
        Passed to tensorly (the SVD start is deterministic; the seed covers any random fill-in).

    Returns
    -------
    CPFactors
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"CP rank must be an integer >= 1; got {rank!r}")
    w = weight.detach().double().cpu()
    n, cg, kh, kw = w.shape
    ng = n // groups
    rank = min(rank, cp_max_rank(tuple(w.shape), groups))
    parts = {k: [] for k in ("out", "inp", "vertical", "horizontal")}
    iterations, converged = [], True
    for j in range(groups):
        block = w[j * ng : (j + 1) * ng]
        if float(block.norm()) == 0.0:  # ALS from an SVD start divides by zero on a zero kernel
            zeros = [torch.zeros(d, rank, dtype=torch.float64) for d in (ng, cg, kh, kw)]
            factors, its, ok = zeros, 0, True
        else:
            weights, arrays, errors = run_parafac(block.numpy(), rank, n_iter_max, tol, seed)
            factors = [torch.from_numpy(np.array(a, dtype=np.float64)) for a in arrays]
            factors[0] = factors[0] * torch.from_numpy(np.array(weights, dtype=np.float64))
            its = len(errors)
            ok = len(errors) >= 2 and abs(errors[-2] - errors[-1]) < tol
        out, inp, vert, hor = _normalise(*factors)
        for key, f in zip(parts, (out, inp, vert, hor), strict=True):
            parts[key].append(f)
        iterations.append(its)
        converged = converged and ok
    stacked = {k: torch.stack(v) for k, v in parts.items()}
    return CPFactors(tuple(w.shape), groups, **stacked, iterations=iterations, converged=converged)

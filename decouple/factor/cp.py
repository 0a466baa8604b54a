"""CP (canonical polyadic) decomposition of a conv kernel, as pure tensor math (Lebedev et al. 2015).

The kernel ``W`` ``(N, C/g, kh, kw)`` of every conv group is approximated by ``R`` rank-one terms
(tensorly's ``parafac``, CP-ALS from an SVD start)::

    W[n, c, i, j] ≈ Σ_r  out[n, r] · inp[c, r] · vertical[i, r] · horizontal[j, r]

which runs as four plain convs: 1×1 ``C → R``, depthwise ``kh×1``, depthwise ``1×kw``,
1×1 ``R → N`` (see :class:`decouple.nn.factorized.CPConv2d`). A MobileNet-style block is the special
case where one factor is the identity, so CP is the most compact of the three methods, but ALS is
iterative and need not converge: every result says whether it did.

:func:`cp_weight` gives one rank; :func:`cp_weights_for_ranks` the many ranks a planner compares,
each warm-started from the one below. Both run one ALS engine in torch that repeats tensorly's
``parafac`` sweep for sweep but never forms the Khatri-Rao product of the whole kernel (which
takes gigabytes at the ranks of a 512-channel conv): two GEMMs and four small Cholesky solves a
sweep.

Nothing here knows about ``nn.Module``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from .tensorly_compat import parafac_als, run_parafac_torch, unit_columns

CP_MAX_ITER = 100
CP_TOL = 1e-6
CP_WARM_SWEEPS = 5
"""Sweeps of work each warm-started rank of :func:`cp_weights_for_ranks` gets, counted at its
largest rank (a rank ``r`` below the largest ``R`` gets ``ceil(5 · R / r)`` sweeps)."""
CP_THREADS = 1
"""Torch threads :func:`cp_weights_for_ranks` (and so :func:`cp_weight`) computes on. ALS is
thousands of small BLAS/LAPACK calls; with two threads on two shared, busy cores each call can
wait out a scheduler slice: measured 15× slower (ResNet-18's 256-channel convs) than one thread."""
CP_FREE_WORK = 1e8
"""Floating-point work (about 0.1 s at most) below which :func:`cp_weights_for_ranks` does not
ration sweeps: a warm-started rank runs as many sweeps (up to ``n_iter_max``) as this buys, and
where :func:`cp_weight`'s own run fits in it, that runs too and the better fit is kept."""


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

    @property
    def spatial(self) -> str:
        """``"separable"`` (each term's kernel the outer product of ``vertical`` and
        ``horizontal``) or ``"full"`` (:mod:`decouple.factor.cp_full`: ``vertical`` holds
        each term's whole ``kh×kw`` kernel, flattened, and ``horizontal`` is ones)."""
        kh, kw = self.weight_shape[2:]
        return "full" if kw > 1 and self.vertical.shape[1] == kh * kw else "separable"

    def reconstruct(self) -> torch.Tensor:
        """The kernel the factors represent, ``(N, C/g, kh, kw)`` in float64."""
        # out @ head: one GEMM; a four-way einsum formed an (N, C, R) temporary (gigabytes at
        # the ranks of a 512-channel conv)
        return torch.bmm(self.out, self.head_matrix()).reshape(self.weight_shape)

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

    The CP-ALS of tensorly's ``parafac`` (``init="svd"``, unnormalised factors), sweep for sweep:
    the same SVD start and the same updates in the same order, so the same factors up to
    rounding (and, like tensorly, a restart from its random start where a normal-equation
    system is exactly singular). Computed by :func:`cp_weights_for_ranks` on one rank, on
    :data:`CP_THREADS` torch threads.

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
        Seeds the random columns the SVD start adds where ``rank`` exceeds a mode's size.

    Returns
    -------
    CPFactors
    """
    _check_rank(rank)
    return cp_weights_for_ranks(weight, [rank], groups, n_iter_max, tol, seed)[rank]


def _check_rank(rank) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer) or rank < 1:
        raise ValueError(f"CP rank must be an integer >= 1; got {rank!r}")


# ------------------------------------------------------------------------------------------
# CP at many ranks: warm starts from rank to rank


def _top_singular(m: torch.Tensor, k: int):
    """The ``k`` leading singular triplets ``(u, s, vt)`` of a matrix, via the Gram matrix of
    its short side (only to start new CP terms, so its accuracy is ample)."""
    if m.shape[0] <= m.shape[1]:
        evals, evecs = torch.linalg.eigh(m @ m.T)
        u = evecs.flip(1)[:, :k]
        s = evals.flip(0)[:k].clamp_min(0).sqrt()
        vt = (u.T @ m) / torch.where(s > 0, s, torch.ones_like(s))[:, None]
    else:
        evals, evecs = torch.linalg.eigh(m.T @ m)
        vt = evecs.flip(1)[:, :k].T
        s = evals.flip(0)[:k].clamp_min(0).sqrt()
        u = (m @ vt.T) / torch.where(s > 0, s, torch.ones_like(s))[None, :]
    return u, s, vt


def _rank_one_terms(u, s, vt, other: int, k1: int, k2: int):
    """Rank-one terms from singular triplets of an unfolding ``(mode, other·k1·k2)``: each right
    vector, reshaped ``(other, k1·k2)``, cut to its best rank one, and its spatial part again
    to ``(k1, k2)``. Returns ``(scale, this-mode, other-mode, vertical, horizontal)``."""
    k = s.numel()
    u2, s2, vh2 = torch.linalg.svd(vt.reshape(k, other, k1 * k2), full_matrices=False)
    u3, s3, vh3 = torch.linalg.svd(vh2[:, 0, :].reshape(k, k1, k2), full_matrices=False)
    return s * s2[:, 0] * s3[:, 0], u, u2[:, :, 0].T, u3[:, :, 0].T, vh3[:, 0, :].T


def _residual_start(x: torch.Tensor, factors: list[torch.Tensor], extra: int, seed: int):
    """``extra`` new CP terms for a warm start: rank-one terms of the residual ``x − x̂`` from the
    leading singular vectors of its out-channel (then in-channel) unfolding; a residual that is
    numerically zero adds zero terms, a shortfall seeded random ones."""
    n, c, k1, k2 = x.shape
    a, b, v, h = factors
    bv = (b[:, None, :] * v[None, :, :]).reshape(c * k1, -1)
    kr = (bv[:, None, :] * h[None, :, :]).reshape(c * k1 * k2, -1)
    res = x.reshape(n, -1) - a @ kr.T
    scale = float(res.norm())
    if scale <= 1e-12 * float(x.norm()):
        return [torch.zeros(d, extra, dtype=x.dtype) for d in (n, c, k1, k2)]
    cols = []  # (scale, out, inp, vertical, horizontal) blocks
    for mode in (0, 1):
        want = extra - sum(blk[0].numel() for blk in cols)
        if want <= 0:
            break
        m = res if mode == 0 else res.reshape(n, c, k1 * k2).transpose(0, 1).reshape(c, -1)
        u, s, vt = _top_singular(m, min(want, *m.shape))
        keep = s > 1e-9 * scale
        if not bool(keep.any()):
            continue
        g, this, other, vert, hor = _rank_one_terms(
            u[:, keep], s[keep], vt[keep], c if mode == 0 else n, k1, k2
        )
        cols.append((g, this, other, vert, hor) if mode == 0 else (g, other, this, vert, hor))
    got = sum(blk[0].numel() for blk in cols)
    if got < extra:
        gen = torch.Generator().manual_seed(seed)
        rnd = [torch.randn(d, extra - got, generator=gen, dtype=x.dtype) for d in (n, c, k1, k2)]
        rnd = [f / f.norm(dim=0) for f in rnd]
        smallest = min((float(blk[0].min()) for blk in cols), default=scale / math.sqrt(extra))
        cols.append((torch.full((extra - got,), smallest, dtype=x.dtype), *rnd))
    g = torch.cat([blk[0] for blk in cols])
    out = torch.cat([blk[1] for blk in cols], dim=1) * g
    return [out, *(torch.cat([blk[i] for blk in cols], dim=1) for i in (2, 3, 4))]


def _sweep_flops(shape, rank: int) -> float:
    """Rough floating-point work of one ALS sweep (two GEMMs, four Cholesky factorisations)."""
    return 4.0 * math.prod(shape) * rank + 2.0 * rank**3


def _warm_caps(shape, chain: list[int], n_iter_max: int, warm_sweeps: int) -> list[int]:
    """Sweep budget of each rank of ``chain`` after the first: ``ceil(warm_sweeps · top / r)``,
    or as many as :data:`CP_FREE_WORK` buys where more; at most ``n_iter_max``."""
    top, free = chain[-1], CP_FREE_WORK
    caps = [
        max(math.ceil(warm_sweeps * top / r), int(free // _sweep_flops(shape, r))) for r in chain
    ]
    return [min(n_iter_max, c) for c in caps]


def _cp_chain(x, chain, n_iter_max, tol, seed, warm_sweeps, extrapolate=True):
    """``{rank: (factors, iterations, converged)}`` for one group's kernel ``x`` at the sorted
    ``chain`` of ranks: the first from the SVD start, each next one warm."""
    out = {}
    caps = _warm_caps(x.shape, chain, n_iter_max, warm_sweeps)
    prev = None
    for i, rank in enumerate(chain):
        if prev is None:
            factors, errors = run_parafac_torch(x, rank, n_iter_max, tol, seed)
        else:
            grams = [f.T @ f for f in prev]
            old, _ = unit_columns(prev, grams)
            new = _residual_start(x, old, rank - old[0].shape[1], seed + i)
            start = [torch.cat([p, q], dim=1) for p, q in zip(old, new, strict=True)]
            factors, errors = parafac_als(x, start, caps[i], tol, extrapolate)
            if n_iter_max * _sweep_flops(x.shape, rank) <= CP_FREE_WORK:  # cheap: try cold too
                cold, cold_errors = run_parafac_torch(x, rank, n_iter_max, tol, seed)
                if cold_errors and errors and cold_errors[-1] < errors[-1]:
                    factors, errors = cold, cold_errors
        ok = len(errors) >= 2 and abs(errors[-2] - errors[-1]) < tol
        out[rank] = (factors, len(errors), ok)
        prev = factors
    return out


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Run the block on ``n`` torch threads (``None``: as set), then restore the setting."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cp_weights_for_ranks(
    weight: torch.Tensor,
    ranks: Iterable[int],
    groups: int = 1,
    n_iter_max: int = CP_MAX_ITER,
    tol: float = CP_TOL,
    seed: int = 0,
    *,
    warm_sweeps: int = CP_WARM_SWEEPS,
    threads: int | None = CP_THREADS,
) -> dict[int, CPFactors]:
    """CP decompositions of a conv kernel at many ranks, each rank started from the last.

    What a rank planner asks for: :func:`cp_weight` at every rank in ``ranks``, much faster.
    Per group, the ranks are solved in increasing order:

    * the smallest exactly as :func:`cp_weight` does (SVD start, up to ``n_iter_max`` ALS
      sweeps, the same factors up to rounding);
    * each larger rank ``r`` from the previous rank's factors plus ``r − r_prev`` new terms:
      rank-one terms of the residual kernel, from the leading singular vectors of its
      out-channel unfolding. ALS then runs with a line search (each sweep also tries a jump along
      the change it made, kept only where it lowers the error) for at most
      ``ceil(warm_sweeps · R / r)`` sweeps, ``R`` the largest rank (and never more than
      ``n_iter_max``): each warm rank gets about the same work, and the small ranks, where a
      warm start gains least over a cold one, get the most sweeps.

    Started this way, a rank's fit is typically as good as or better than :func:`cp_weight`'s
    100 sweeps from the SVD start, at a fraction of the sweeps (``results/cp_speed.md``: on
    ResNet-18 and ResNet-20 the error is about 2 % lower on average and at worst about 3 %
    higher). Where sweeps are cheap (:data:`CP_FREE_WORK`: small kernels) a warm rank runs up to
    ``n_iter_max`` of them, and :func:`cp_weight`'s own run too if it is cheap, keeping the
    better fit, so there no rank is worse than :func:`cp_weight`'s. A rank's result depends on
    the smaller ranks asked for with it; it is deterministic for the same ``ranks`` and
    ``seed`` (and threads). Errors never rise with rank: new terms only lower the residual and
    every ALS step and accepted jump lowers the error.

    Parameters
    ----------
    weight : torch.Tensor
        ``(N, C/g, kh, kw)``; computed in float64 on the CPU.
    ranks : iterable of int
        Terms per group, each ``>= 1``; each is clipped to :func:`cp_max_rank`, and ranks that
        clip to the same value share one decomposition.
    groups : int
        The conv's ``groups``; each group is decomposed on its own.
    n_iter_max : int
        Most ALS sweeps at any rank (the smallest rank's budget).
    tol : float
        ALS at a rank stops once the relative reconstruction error changes by less than ``tol``
        in a sweep; ``converged`` says whether that happened (in every group) before the sweep
        budget ran out. With the default ``1e-6`` the rationed warm ranks of a large conv rarely
        get there: their ``converged`` is then ``False``, as it is for most of
        :func:`cp_weight`'s 100 sweeps on such convs.
    seed : int
        Seeds the random columns of the SVD start (as in :func:`cp_weight`) and any random new
        terms a warm start needs (only where the residual's out- and in-channel unfoldings have
        too few singular vectors for the terms to add).
    warm_sweeps : int
        Work per warm-started rank, in sweeps at the largest rank (see above).
    threads : int or None
        Torch threads to compute on, restored afterwards (``None``: leave the setting alone). One
        by default (:data:`CP_THREADS`): on shared cores more threads are far slower, not faster;
        to use several cores, decompose several convs in parallel processes.

    Returns
    -------
    dict of int to CPFactors
        Keyed by the requested ranks; ``iterations`` counts the sweeps run at that rank alone.
    """
    ranks = list(ranks)
    for r in ranks:
        _check_rank(r)
    if isinstance(warm_sweeps, bool) or not isinstance(warm_sweeps, int) or warm_sweeps < 1:
        raise ValueError(f"warm_sweeps must be an integer >= 1; got {warm_sweeps!r}")
    if not ranks:
        return {}
    w = weight.detach().double().cpu()
    n, cg, kh, kw = w.shape
    ng = n // groups
    top = cp_max_rank(tuple(w.shape), groups)
    chain = sorted({min(int(r), top) for r in ranks})
    per_group = []
    with _torch_threads(threads):
        for j in range(groups):
            block = w[j * ng : (j + 1) * ng]
            if float(block.norm()) == 0.0:  # nothing to fit (and ALS would divide by zero)
                zeros = {r: [torch.zeros(d, r).double() for d in (ng, cg, kh, kw)] for r in chain}
                per_group.append({r: (f, 0, True) for r, f in zeros.items()})
            else:
                per_group.append(_cp_chain(block, chain, n_iter_max, tol, seed, warm_sweeps))
    results = {}
    for r in chain:
        parts = [_normalise(*res[r][0]) for res in per_group]
        results[r] = CPFactors(
            tuple(w.shape),
            groups,
            *(torch.stack([p[i] for p in parts]) for i in range(4)),
            iterations=[res[r][1] for res in per_group],
            converged=all(res[r][2] for res in per_group),
        )
    return {r: results[min(int(r), top)] for r in ranks}

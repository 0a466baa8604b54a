"""tensorly's CP and Tucker, pinned to behaviour we have tested.

Tucker-2 runs tensorly's ``partial_tucker``. CP runs tensorly's ``parafac`` re-implemented in torch
(the second half of this module: :func:`run_parafac_torch`; the same SVD or random start, the
same updates in the same order, so the same iterates up to rounding), because ``parafac`` forms
the Khatri-Rao product of the whole kernel every update, gigabytes at the ranks of a 512-channel
conv. tensorly's own ``parafac`` (:func:`run_parafac`) and start (:func:`parafac_start`) stay as
the reference it is checked against (tests, ``experiments/cp_speed.py``).

tensorly's return types have changed between releases: ``partial_tucker`` returned
``(core, factors)`` up to 0.7 and ``((core, factors), errors)`` since 0.8; ``parafac`` returns a
``CPTensor`` (or a plain ``(weights, factors)`` pair in old releases) and, with
``return_errors=True``, a pair ``(cp, errors)``. The adapters below accept every form, so one
change upstream breaks a test here rather than a user's run. They always compute on the numpy
backend in float64, whatever backend the user has set globally.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import tensorly as tl
import torch
from tensorly.decomposition import parafac, partial_tucker

TENSORLY_MIN_VERSION = (0, 9)


def parse_version(text: str) -> tuple[int, ...]:
    """``"0.10.1"`` -> ``(0, 10, 1)``; pre-release tails (``rc1``, ``.dev0``) are ignored."""
    parts = []
    for piece in text.split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def check_tensorly_version(version: str | None = None) -> None:
    """Raise ``ImportError`` if tensorly is older than :data:`TENSORLY_MIN_VERSION`."""
    version = tl.__version__ if version is None else version
    if parse_version(version) < TENSORLY_MIN_VERSION:
        need = ".".join(map(str, TENSORLY_MIN_VERSION))
        raise ImportError(
            f"decouple's CP and Tucker need tensorly >= {need}; found {version} "
            f"(pip install 'tensorly>={need}')"
        )


def split_cp_result(result) -> tuple[np.ndarray, list[np.ndarray], list[float]]:
    """``(weights, factors, errors)`` from whatever ``parafac`` returned."""
    errors: list[float] = []
    if (
        isinstance(result, tuple)
        and len(result) == 2
        and isinstance(result[1], list)
        and (not result[1] or np.ndim(result[1][0]) == 0)
    ):
        result, errors = result[0], [float(e) for e in result[1]]
    weights, factors = result  # CPTensor unpacks as (weights, factors)
    return np.asarray(weights), [np.asarray(f) for f in factors], errors


def split_tucker_result(result) -> tuple[np.ndarray, list[np.ndarray]]:
    """``(core, factors)`` from whatever ``partial_tucker`` returned."""
    first, second = result
    if isinstance(first, tuple | list) and len(first) == 2 and np.ndim(first[0]) > 1:
        first, second = first  # >= 0.8: ((core, factors), errors)
    return np.asarray(first), [np.asarray(f) for f in second]


def run_parafac(tensor: np.ndarray, rank: int, n_iter_max: int, tol: float, seed: int):
    """CP-ALS of a float64 array: ``(weights, factors, errors)``; deterministic for a seed."""
    check_tensorly_version()
    try:
        return _parafac(tensor, rank, n_iter_max, tol, seed, "svd")
    except np.linalg.LinAlgError:
        # A singular ALS system from the SVD start (degenerate kernels): a seeded random start.
        try:
            return _parafac(tensor, rank, n_iter_max, tol, seed, "random")
        except np.linalg.LinAlgError:
            raise ValueError(
                f"CP-ALS failed at rank {rank} on a kernel of shape {tensor.shape} "
                "(singular least-squares system); try a smaller rank or another method"
            ) from None


def _parafac(tensor, rank, n_iter_max, tol, seed, init):
    # tensorly warns when a rank exceeds a mode's size (it fills in seeded random columns): expected.
    with tl.backend_context("numpy"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = parafac(
            tensor,
            rank,
            n_iter_max=n_iter_max,
            init=init,
            tol=tol,
            random_state=seed,
            return_errors=True,
            normalize_factors=False,
        )
    return split_cp_result(result)


def parafac_start(tensor: np.ndarray, rank: int, init: str, seed: int) -> list[np.ndarray]:
    """The factors tensorly's ``parafac`` starts from (``init`` ``"svd"`` or ``"random"``,
    unnormalised), float64 on the numpy backend."""
    from tensorly.decomposition._cp import initialize_cp  # not exported; present since 0.6

    check_tensorly_version()
    with tl.backend_context("numpy"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _, factors = initialize_cp(tensor, rank, init=init, random_state=seed)
    return [np.asarray(f, dtype=np.float64) for f in factors]


# ------------------------------------------------------------------------------------------
# parafac's ALS in torch, on 4-way float64 kernels: what decouple.factor.cp runs


class SingularSystem(Exception):
    """An ALS normal-equation system that is exactly singular (LU hits a zero pivot)."""


def solve_gram(gram: torch.Tensor, rhs: torch.Tensor, strict: bool = False) -> torch.Tensor:
    """``X`` with ``X @ gram = rhs`` for a symmetric PSD ``gram`` (ALS normal equations):
    Cholesky; LU where Cholesky fails (tensorly's ``solve``); where that fails too, raise
    :class:`SingularSystem` if ``strict``, else a minimum-norm least-squares solve."""
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return torch.cholesky_solve(rhs.T, chol).T
    sol, info = torch.linalg.solve_ex(gram, rhs.T)
    if int(info) == 0:
        return sol.T
    if strict:
        raise SingularSystem
    return torch.linalg.lstsq(gram, rhs.T, driver="gelsd").solution.T


def rel_error(xx: float, inner: float, model: float) -> float:
    """``‖X − X̂‖ / ‖X‖`` from ``‖X‖²``, ``⟨X, X̂⟩`` and ``‖X̂‖²`` (no reconstruction)."""
    return math.sqrt(abs(xx - 2.0 * inner + model)) / math.sqrt(xx)


def svd_start(x: torch.Tensor, rank: int, seed: int) -> list[torch.Tensor]:
    """tensorly's ``init="svd"`` start of ``parafac`` (same columns, signs and seeded random
    fill-in), with each mode's singular vectors taken from the small Gram matrix of its
    unfolding rather than a full SVD."""
    rng = np.random.RandomState(seed)
    factors = []
    for mode, size in enumerate(x.shape):
        m = torch.movedim(x, mode, 0).reshape(size, -1)
        if m.shape[0] <= m.shape[1]:
            evals, evecs = torch.linalg.eigh(m @ m.T)
            u, s = evecs.flip(1), evals.flip(0).clamp_min(0).sqrt()
        else:
            u, s, _ = torch.linalg.svd(m, full_matrices=False)
        k = min(rank, u.shape[1])
        u = u[:, :k]
        idx = u.abs().argmax(dim=0)
        u = u * u[idx, torch.arange(k)].sign()  # tensorly's svd_flip: largest entry positive
        if mode == 0:
            u = u * s[:k]
        if size < rank:
            fill = torch.from_numpy(rng.random_sample((size, rank - size)))
            u = torch.cat([u, fill], dim=1)
        factors.append(u[:, :rank].contiguous())
    return factors


def random_start(shape, rank: int, seed: int) -> list[torch.Tensor]:
    """tensorly's ``init="random"`` start (uniform factors from ``RandomState(seed)``)."""
    rng = np.random.RandomState(seed)
    return [torch.from_numpy(rng.random_sample((size, rank))) for size in shape]


def unit_columns(factors, grams):
    """Unit columns for every factor but the first, which takes the scale; Grams to match."""
    a, b, v, h = factors
    ga, gb, gv, gh = grams
    total = torch.ones_like(a[0])
    out, gout = [], []
    for f, g in ((b, gb), (v, gv), (h, gh)):
        norms = f.norm(dim=0)
        norms = torch.where(norms > 0, norms, torch.ones_like(norms))
        out.append(f / norms)
        gout.append(g / (norms[:, None] * norms[None, :]))
        total = total * norms
    return [a * total, *out], [ga * (total[:, None] * total[None, :]), *gout]


def parafac_als(x, factors, n_iter_max, tol, extrapolate=False, strict=False):
    """CP-ALS of a 4-way float64 tensor from ``factors`` (updated in order out, in, vertical,
    horizontal, as tensorly's ``parafac`` does), two GEMMs per sweep: ``X₍₀₎ · (in ⊙ v ⊙ h)``
    for the out factor, then ``outᵀ · X₍₀₎``, from which the other three MTTKRPs follow cheaply.

    With ``extrapolate`` (not in :func:`run_parafac_torch`), every sweep from the second on also
    tries a line-search jump along the change the sweep made, as tensorly's ``linesearch`` does
    (step ``it^(1/p)``, ``p`` growing after four rejections), kept only if it lowers the error;
    ``b``, ``v``, ``h`` are then kept at unit columns so that steps compare like with like.

    Returns ``(factors, errors)``; ``errors[i]`` is the relative error after sweep ``i``; ALS
    stops once it changes by less than ``tol`` in a sweep or after ``n_iter_max`` sweeps. An
    exactly singular system raises :class:`SingularSystem` if ``strict``.
    """
    a, b, v, h = factors
    n, c, k1, k2 = x.shape
    r = a.shape[1]
    x0 = x.reshape(n, c * k1 * k2)
    xx = float((x0 * x0).sum())
    grams = [f.T @ f for f in (a, b, v, h)]
    errors: list[float] = []
    prev, power, fails = None, 2.0, 0
    for it in range(n_iter_max):
        ga, gb, gv, gh = grams
        e = (v[:, None, :] * h[None, :, :]).reshape(k1 * k2, r)
        a = solve_gram(gb * gv * gh, x0 @ (b[:, None, :] * e[None]).reshape(c * k1 * k2, r), strict)
        ga = a.T @ a
        z = (a.T @ x0).reshape(r, c, k1 * k2)
        b = solve_gram(ga * gv * gh, torch.bmm(z, e.T.unsqueeze(2)).squeeze(2).T, strict)
        gb = b.T @ b
        s = torch.bmm(b.T.unsqueeze(1), z).reshape(r, k1, k2)
        v = solve_gram(ga * gb * gh, torch.einsum("rij,jr->ir", s, h), strict)
        gv = v.T @ v
        mh = torch.einsum("rij,ir->jr", s, v)
        h = solve_gram(ga * gb * gv, mh, strict)
        gh = h.T @ h
        grams = [ga, gb, gv, gh]
        err = rel_error(xx, float((mh * h).sum()), float((ga * gb * gv * gh).sum()))
        if extrapolate:
            (a, b, v, h), grams = unit_columns([a, b, v, h], grams)
            if prev is not None and it >= 1:
                step = (it + 1) ** (1.0 / power)
                jump = [p + step * (q - p) for p, q in zip(prev, (a, b, v, h), strict=True)]
                jgrams = [f.T @ f for f in jump]
                je = (jump[2][:, None, :] * jump[3][None, :, :]).reshape(k1 * k2, r)
                jz = (jump[0].T @ x0).reshape(r, c, k1 * k2)
                inner = float((torch.bmm(jump[1].T.unsqueeze(1), jz).squeeze(1) * je.T).sum())
                jerr = rel_error(xx, inner, float(math.prod(jgrams).sum()))
                if jerr < err:
                    (a, b, v, h), grams, err, fails = jump, jgrams, jerr, 0
                else:
                    fails += 1
                    if fails == 4:
                        power, fails = power + 1.0, 0
            prev = (a, b, v, h)
        errors.append(err)
        if it >= 1 and abs(errors[-2] - errors[-1]) < tol:
            break
    return [a, b, v, h], errors


def run_parafac_torch(x: torch.Tensor, rank: int, n_iter_max: int, tol: float, seed: int):
    """:func:`run_parafac` in torch: ``(factors, errors)`` of CP-ALS from the SVD start, and like
    tensorly a random restart if a system is exactly singular (where tensorly then gives up:
    minimum-norm solves)."""
    try:
        return parafac_als(x, svd_start(x, rank, seed), n_iter_max, tol, strict=True)
    except SingularSystem:
        try:
            return parafac_als(x, random_start(x.shape, rank, seed), n_iter_max, tol, strict=True)
        except SingularSystem:
            return parafac_als(x, random_start(x.shape, rank, seed), n_iter_max, tol)


def run_partial_tucker(tensor: np.ndarray, ranks: tuple[int, int], seed: int):
    """Tucker-2 (HOOI from an SVD start) on modes 0 and 1: ``(core, [U_out, U_in])``."""
    check_tensorly_version()
    with tl.backend_context("numpy"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = partial_tucker(
            tensor, rank=list(ranks), modes=[0, 1], init="svd", random_state=seed
        )
    return split_tucker_result(result)

"""The small part of tensorly that CP and Tucker use, pinned to behaviour we have tested.

tensorly's return types have changed between releases: ``partial_tucker`` returned
``(core, factors)`` up to 0.7 and ``((core, factors), errors)`` since 0.8; ``parafac`` returns a
``CPTensor`` (or a plain ``(weights, factors)`` pair in old releases) and, with
``return_errors=True``, a pair ``(cp, errors)``. The adapters below accept every form, so one
change upstream breaks a test here rather than a user's run. They always compute on the numpy
backend in float64, whatever backend the user has set globally.
"""

from __future__ import annotations

import warnings

import numpy as np
import tensorly as tl
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


def run_partial_tucker(tensor: np.ndarray, ranks: tuple[int, int], seed: int):
    """Tucker-2 (HOOI from an SVD start) on modes 0 and 1: ``(core, [U_out, U_in])``."""
    check_tensorly_version()
    with tl.backend_context("numpy"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = partial_tucker(
            tensor, rank=list(ranks), modes=[0, 1], init="svd", random_state=seed
        )
    return split_tucker_result(result)

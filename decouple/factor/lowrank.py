"""Low-rank (truncated SVD) factorization of a kernel reshaped to a matrix, as pure tensor math.

Every group's kernel ``(N/g, C/g, kh, kw)`` is read as a matrix ``N/g × F`` with
``F = C/g·kh·kw`` (a 1×1 conv's or a linear layer's weight is that matrix already) and cut to its
top ``R`` singular triplets::

    W[n, f] ≈ Σ_r  out[n, r] · inp[r, f],   out = U_R·S_R,  inp = V_Rᵀ

which runs as two plain layers: a conv ``C → g·R`` with the original kernel size (a 1×1 conv, or
``nn.Linear`` ``C → R``), then a 1×1 conv ``g·R → N`` (``nn.Linear`` ``R → N``); see
:mod:`decouple.nn.lowrank`. By Eckart–Young this is the best rank-``R`` approximation in the
Frobenius norm and exact at ``R = min(N/g, F)``. Network decoupling (:mod:`.nd`) is the same
theorem applied to another reshaping of ``W``: each channel's ``N × kh·kw`` (or ``C × kh·kw``)
slice, so its rank counts spatial terms per channel, where this one counts channels.

Nothing here knows about ``nn.Module``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .nd import layer_energy, rank_for_energy, svd_flip

# Past this many elements per matrix, the SVD goes through the Gram matrix: LAPACK's SVD of a
# linear layer's 4096 x 9216 float64 weight took 113 s on one core, its Gram route 15 s.
GRAM_ELEMENTS = 1 << 20


def _svd(mats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched thin SVD ``(U, S, Vh)`` of float64 matrices ``(g, m, n)``.

    Large matrices (:data:`GRAM_ELEMENTS`) take the eigendecomposition of the smaller Gram
    matrix (``M·Mᵀ`` or ``Mᵀ·M``) and the other factor by projection: all BLAS-3 work. Singular
    values come out to within about ``1e-16·σ_max²`` in their squares, so energies and the
    leading triplets that truncation keeps are as precise as LAPACK's; only directions with
    ``σ < 1e-8·σ_max`` (which no saving rank keeps) lose their relative precision.
    """
    g, m, n = mats.shape
    if m * n <= GRAM_ELEMENTS:
        return torch.linalg.svd(mats, full_matrices=False)
    wide = m <= n
    gram = mats @ mats.transpose(1, 2) if wide else mats.transpose(1, 2) @ mats
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(-1).clamp_min(0), evecs.flip(-1)
    s = evals.sqrt()
    inv = torch.where(s > s[:, :1] * 1e-12, 1 / s, torch.zeros_like(s))
    if wide:  # evecs = U; Vh = S⁻¹ Uᵀ M
        return evecs, s, inv[:, :, None] * (evecs.transpose(1, 2) @ mats)
    return (mats @ evecs) * inv[:, None, :], s, evecs.transpose(1, 2)


def lowrank_max_rank(weight_shape: tuple[int, ...], groups: int = 1) -> int:
    """Rank at which the factorization is exact: ``min(N/g, C/g·kh·kw)``."""
    n, cg = weight_shape[0], weight_shape[1]
    f = cg * (weight_shape[2] * weight_shape[3] if len(weight_shape) == 4 else 1)
    return min(n // groups, f)


def lowrank_params(weight_shape: tuple[int, ...], groups: int, rank: int) -> int:
    """Weights of the two factors at ``rank`` per group (no bias): ``g·R·(F + N/g)``."""
    n, cg = weight_shape[0], weight_shape[1]
    f = cg * (weight_shape[2] * weight_shape[3] if len(weight_shape) == 4 else 1)
    return rank * (groups * f + n)


def saves(weight_shape: tuple[int, ...], groups: int, rank: int) -> bool:
    """Whether the rank-``rank`` form holds fewer weights (and so costs fewer FLOPs: both layers
    run at the original output's positions) than the original layer."""
    n, cg = weight_shape[0], weight_shape[1]
    f = cg * (weight_shape[2] * weight_shape[3] if len(weight_shape) == 4 else 1)
    return lowrank_params(weight_shape, groups, rank) < n * f


@dataclass
class LowRankFactors:
    """Truncated SVD of every group of a kernel (float64).

    Attributes
    ----------
    weight_shape : tuple
        ``(N, C/g, kh, kw)`` (a linear layer's ``(N, C)`` reads as ``(N, C, 1, 1)``).
    groups : int
    out : torch.Tensor
        ``(g, N/g, R)``: ``U_R·S_R``, the second layer's weights; carries the scale.
    inp : torch.Tensor
        ``(g, R, F)``: ``V_Rᵀ``, orthonormal rows, the first layer's weights.
    singular_values : torch.Tensor
        ``(g, min(N/g, F))``: every singular value, for energy rules and error bounds.
    """

    weight_shape: tuple[int, ...]
    groups: int
    out: torch.Tensor
    inp: torch.Tensor
    singular_values: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.inp.shape[1])

    @property
    def max_rank(self) -> int:
        return int(self.singular_values.shape[1])

    def truncated(self, rank: int) -> LowRankFactors:
        """The first ``rank`` triplets (``rank`` at most the current one)."""
        if not 1 <= rank <= self.rank:
            raise ValueError(f"rank must be in [1, {self.rank}]; got {rank}")
        return LowRankFactors(
            self.weight_shape,
            self.groups,
            self.out[:, :, :rank].clone(),
            self.inp[:, :rank].clone(),
            self.singular_values,
        )

    def reconstruct(self) -> torch.Tensor:
        """The kernel the factors represent, ``weight_shape``, in float64."""
        return torch.einsum("gnr,grf->gnf", self.out, self.inp).reshape(self.weight_shape)

    def head_matrix(self) -> torch.Tensor:
        """``(g, R, F)``: what the first layer computes from a patch (calibration's features)."""
        return self.inp

    def layer_energy(self) -> torch.Tensor:
        """Fraction of the kernel's squared norm kept at ``R = 1 … max_rank``."""
        return layer_energy(self.singular_values)

    def relative_error(self, weight: torch.Tensor) -> float:
        """``‖W − Ŵ‖_F / ‖W‖_F`` against the original kernel."""
        w = weight.detach().double().cpu().reshape(self.weight_shape)
        denom = float(w.norm())
        diff = float((w - self.reconstruct()).norm())
        return diff / denom if denom > 0 else diff


def lowrank_weight(
    weight: torch.Tensor, rank: int | None = None, groups: int = 1, energy: float | None = None
) -> LowRankFactors:
    """Truncated SVD of every group of ``weight``, in one batched float64 ``torch.linalg.svd``.

    Parameters
    ----------
    weight : torch.Tensor
        ``(N, C/g, kh, kw)`` or a linear layer's ``(N, C)``.
    rank : int, optional
        Triplets kept per group, clipped to :func:`lowrank_max_rank`; ``None`` (and no
        ``energy``): all of them, which is exact.
    groups : int
        The conv's ``groups``; each group is factored on its own.
    energy : float, optional
        Instead of ``rank``: the smallest rank keeping this fraction of the squared norm
        (summed over groups), in ``(0, 1]``.

    Signs are fixed by :func:`~decouple.factor.nd.svd_flip`, so results repeat.
    """
    if rank is not None and energy is not None:
        raise ValueError("give either rank or energy, not both")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be an integer >= 1; got {rank!r}")
    w = weight.detach().double().cpu()
    shape = tuple(w.shape) if w.dim() == 4 else (w.shape[0], w.shape[1], 1, 1)
    n = shape[0]
    if n % groups or w.numel() == 0:
        raise ValueError(f"cannot factor a kernel of shape {tuple(w.shape)} in {groups} groups")
    mats = w.reshape(groups, n // groups, -1)
    u, s, vh = _svd(mats)
    u, vh = svd_flip(u, vh)
    if energy is not None:
        rank = rank_for_energy(s, energy)
    top = s.shape[1] if rank is None else min(rank, s.shape[1])
    return LowRankFactors(
        shape,
        groups,
        (u[..., :top] * s[:, None, :top]).contiguous(),
        vh[:, :top].contiguous(),
        s,
    )

"""Network decoupling as pure tensor math (Guo et al., BMVC 2018).

A k×k convolution kernel ``W`` of shape ``(N, C/g, kh, kw)`` is rewritten as a sum of ``T``
depthwise-separable terms by one SVD per channel slice:

* ``dw-pw``: for every input channel ``c`` the ``(N/g) × (kh·kw)`` slice ``W[:, c]`` (restricted
  to the outputs of ``c``'s group) is factored as ``U S Vᵀ``; term ``t`` is the depthwise filter
  ``v_ct`` followed by the pointwise weights ``σ_ct · u_ct``.
* ``pw-dw``: for every output channel ``n`` the ``(C/g) × (kh·kw)`` slice ``W[n]`` is factored;
  term ``t`` is the pointwise weights ``σ_nt · u_nt`` followed by the depthwise filter ``v_nt``.

Keeping the top ``T`` singular triplets of every slice is the best rank-``T`` approximation of the
kernel in Frobenius norm (Eckart–Young), and ``T = min(slice rows, kh·kw)`` is exact.

Nothing here knows about ``nn.Module``; the layer lives in :mod:`decouple.nn.decoupled`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

ORDERS = ("dw-pw", "pw-dw")


def check_order(order: str) -> str:
    """Return ``order`` if it is a known decoupling order, else raise ``ValueError``."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}; got {order!r}")
    return order


def svd_flip(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fix the sign ambiguity of a batched SVD so results repeat across runs and platforms.

    Each singular vector pair ``(u_t, v_t)`` is flipped so that the entry of ``u_t`` with the
    largest magnitude is positive (the convention of tensorly's ``svd_flip``).

    Parameters
    ----------
    u : torch.Tensor
        Left singular vectors, shape ``(..., m, r)``.
    vh : torch.Tensor
        Right singular vectors, shape ``(..., r, n)``.

    Returns
    -------
    u, vh : torch.Tensor
        The same factors with consistent signs; ``u @ diag(s) @ vh`` is unchanged.
    """
    idx = u.abs().argmax(dim=-2, keepdim=True)  # (..., 1, r)
    signs = torch.gather(u, -2, idx).sign()
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return u * signs, vh * signs.transpose(-1, -2)


def _slices(weight: torch.Tensor, order: str, groups: int) -> torch.Tensor:
    """Reshape a conv kernel into the stack of matrices that network decoupling factors.

    Returns shape ``(C, N/g, kh·kw)`` for dw-pw and ``(N, C/g, kh·kw)`` for pw-dw.
    """
    n, cg, kh, kw = weight.shape
    if order == "pw-dw":
        return weight.reshape(n, cg, kh * kw)
    ng = n // groups
    # (g, N/g, C/g, k²) -> (g, C/g, N/g, k²): one slice per input channel, in channel order.
    return weight.reshape(groups, ng, cg, kh * kw).transpose(1, 2).reshape(groups * cg, ng, kh * kw)


def _unslice(slices: torch.Tensor, shape: tuple[int, ...], order: str, groups: int) -> torch.Tensor:
    """Inverse of :func:`_slices`."""
    n, cg, kh, kw = shape
    if order == "pw-dw":
        return slices.reshape(n, cg, kh, kw)
    ng = n // groups
    return slices.reshape(groups, cg, ng, kh * kw).transpose(1, 2).reshape(n, cg, kh, kw)


def max_rank(weight_shape: tuple[int, ...], order: str, groups: int = 1) -> int:
    """Largest useful ``T``: the rank bound ``min(slice rows, kh·kw)`` of every slice."""
    n, cg, kh, kw = weight_shape
    rows = n // groups if check_order(order) == "dw-pw" else cg
    return min(rows, kh * kw)


@dataclass(frozen=True)
class Decoupling:
    """Factors of a decoupled kernel.

    Attributes
    ----------
    order : str
        ``"dw-pw"`` or ``"pw-dw"``.
    weight_shape : tuple of int
        Shape ``(N, C/g, kh, kw)`` of the original kernel.
    groups : int
        ``groups`` of the original convolution.
    depthwise : torch.Tensor
        Spatial filters, shape ``(S, T, kh, kw)``; ``S = C`` for dw-pw, ``N`` for pw-dw.
    pointwise : torch.Tensor
        Channel-mixing weights with the singular values folded in, shape ``(S, T, M)``;
        ``M = N/g`` (outputs fed by input channel ``s``) for dw-pw, ``C/g`` for pw-dw.
    singular_values : torch.Tensor
        The full spectrum of every slice, shape ``(S, min(M, kh·kw))``, descending.
    """

    order: str
    weight_shape: tuple[int, ...]
    groups: int
    depthwise: torch.Tensor
    pointwise: torch.Tensor
    singular_values: torch.Tensor

    @property
    def rank(self) -> int:
        """Number of terms ``T`` kept."""
        return self.depthwise.shape[1]

    @property
    def max_rank(self) -> int:
        return self.singular_values.shape[1]

    def truncated(self, rank: int) -> Decoupling:
        """The same factors with only the top ``rank`` terms (clipped to what is held)."""
        if rank < 1:
            raise ValueError(f"rank must be an integer >= 1; got {rank!r}")
        t = min(int(rank), self.rank)
        return replace(
            self,
            depthwise=self.depthwise[:, :t].contiguous(),
            pointwise=self.pointwise[:, :t].contiguous(),
        )

    def reconstruct(self) -> torch.Tensor:
        """The rank-``T`` kernel, shape ``weight_shape``, in the factors' dtype."""
        s, t, kh, kw = self.depthwise.shape
        slices = torch.einsum("stm,stk->smk", self.pointwise, self.depthwise.reshape(s, t, kh * kw))
        return _unslice(slices, self.weight_shape, self.order, self.groups)

    def energy(self) -> torch.Tensor:
        """Per-slice cumulative energy spectra, shape ``(S, max_rank)``.

        Entry ``[s, t-1]`` is the fraction of slice ``s``'s squared Frobenius norm kept by its
        top ``t`` singular values. Slices that are entirely zero count as fully kept.
        """
        return cumulative_energy(self.singular_values)

    def layer_energy(self) -> torch.Tensor:
        """Fraction of the whole kernel's squared norm kept at each ``T``, shape ``(max_rank,)``."""
        return layer_energy(self.singular_values)

    def relative_error(self) -> float:
        """``‖W − Ŵ‖_F / ‖W‖_F`` of the kept rank, computed from the spectrum (Eckart–Young)."""
        return relative_error_at(self.singular_values, self.rank)


def cumulative_energy(singular_values: torch.Tensor) -> torch.Tensor:
    """Per-slice cumulative energy of spectra of shape ``(S, r)``; see :meth:`Decoupling.energy`."""
    sq = singular_values.double().square()
    total = sq.sum(dim=-1, keepdim=True)
    cum = sq.cumsum(dim=-1)
    return torch.where(total > 0, cum / total.clamp_min(torch.finfo(sq.dtype).tiny), 1.0)


def layer_energy(singular_values: torch.Tensor) -> torch.Tensor:
    """Fraction of the total squared norm kept by the top ``t`` triplets of every slice."""
    sq = singular_values.double().square().sum(dim=0)  # (r,)
    total = sq.sum()
    if total == 0:
        return torch.ones_like(sq)
    return sq.cumsum(0) / total


def relative_error_at(singular_values: torch.Tensor, rank: int) -> float:
    """Relative Frobenius error of keeping ``rank`` triplets of every slice."""
    sq = singular_values.double().square()
    total = sq.sum()
    if total == 0:
        return 0.0
    return float((sq[:, rank:].sum() / total).clamp_min(0).sqrt())


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest ``T`` whose kept fraction of the kernel's squared norm reaches ``energy``.

    Parameters
    ----------
    singular_values : torch.Tensor
        Spectra of shape ``(S, r)`` as in :attr:`Decoupling.singular_values`.
    energy : float
        Target fraction in ``(0, 1]``.
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1]; got {energy!r}")
    kept = layer_energy(singular_values)
    # A small slack so that energy=1.0 is reached despite rounding in the cumulative sum.
    reached = (kept >= energy - 1e-12).nonzero()
    return int(reached[0]) + 1 if len(reached) else kept.numel()


def spectrum(weight: torch.Tensor, order: str = "dw-pw", groups: int = 1) -> torch.Tensor:
    """Singular values of every slice, shape ``(S, r)``, without computing the factors."""
    check_order(order)
    return torch.linalg.svdvals(_slices(weight.detach().double(), order, groups))


def decouple_weight(
    weight: torch.Tensor, rank: int | None = None, order: str = "dw-pw", groups: int = 1
) -> Decoupling:
    """Decouple a conv kernel into ``rank`` depthwise-separable terms.

    One batched float64 ``torch.linalg.svd`` over all slices; no Python loop over channels.

    Parameters
    ----------
    weight : torch.Tensor
        Kernel of shape ``(N, C/g, kh, kw)``.
    rank : int, optional
        Terms to keep, ``T ≥ 1``; clipped to :func:`max_rank`. ``None`` keeps the full rank.
    order : {"dw-pw", "pw-dw"}
        Which side the depthwise filter sits on.
    groups : int
        ``groups`` of the convolution; ``N`` and ``C`` must both be divisible by it.

    Returns
    -------
    Decoupling
        Factors in float64, plus the full spectra.
    """
    check_order(order)
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D (N, C/g, kh, kw); got shape {tuple(weight.shape)}")
    if groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"groups={groups} does not divide out_channels={weight.shape[0]}")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be an integer >= 1; got {rank!r}")
    shape = tuple(weight.shape)
    full = max_rank(shape, order, groups)
    t = full if rank is None else min(int(rank), full)
    u, s, vh = torch.linalg.svd(
        _slices(weight.detach().double(), order, groups), full_matrices=False
    )
    u, vh = svd_flip(u, vh)
    kh, kw = shape[2:]
    depthwise = vh[:, :t, :].reshape(-1, t, kh, kw)
    pointwise = (u[:, :, :t] * s[:, None, :t]).transpose(1, 2)  # (S, T, M)
    return Decoupling(order, shape, groups, depthwise.contiguous(), pointwise.contiguous(), s)

"""The math: exactness at full rank, planted-rank recovery, Eckart–Young optimality, monotone error."""

import pytest
import torch

from decouple.factor.nd import (
    ORDERS,
    decouple_weight,
    max_rank,
    rank_for_energy,
    spectrum,
    svd_flip,
)


def planted_kernel(order, n, c, k, t, groups=1, seed=0):
    """A kernel that is exactly a sum of ``t`` depthwise-separable terms in ``order``."""
    g = torch.Generator().manual_seed(seed)
    cg = c // groups
    if order == "dw-pw":
        # For each input channel c: W[:, c] = sum_t u_ct v_ct^T with u over its group's outputs.
        u = torch.randn(c, t, n // groups, generator=g, dtype=torch.float64)
        v = torch.randn(c, t, k * k, generator=g, dtype=torch.float64)
        slices = torch.einsum("stm,stk->smk", u, v)  # (C, N/g, k²)
        return slices.reshape(groups, cg, n // groups, k * k).transpose(1, 2).reshape(n, cg, k, k)
    u = torch.randn(n, t, cg, generator=g, dtype=torch.float64)
    v = torch.randn(n, t, k * k, generator=g, dtype=torch.float64)
    return torch.einsum("stm,stk->smk", u, v).reshape(n, cg, k, k)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("shape,groups", [((8, 6, 3, 3), 1), ((12, 3, 3, 2), 2), ((5, 4, 5, 5), 1)])
def test_full_rank_is_exact(order, shape, groups):
    w = torch.randn(*shape, dtype=torch.float64)
    dec = decouple_weight(w, None, order, groups)
    assert dec.rank == max_rank(shape, order, groups)
    assert (dec.reconstruct() - w).norm() / w.norm() < 1e-12
    assert dec.relative_error() < 1e-6


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("t", [1, 2, 4])
def test_planted_rank_is_recovered_exactly(order, groups, t):
    w = planted_kernel(order, n=16, c=8, k=3, t=t, groups=groups, seed=t)
    dec = decouple_weight(w, t, order, groups)
    assert dec.rank == t
    assert (dec.reconstruct() - w).norm() / w.norm() < 1e-10
    # The spectrum beyond the planted rank is numerically zero.
    if t < dec.max_rank:
        assert dec.singular_values[:, t:].abs().max() < 1e-10 * dec.singular_values.max()
    # And one term fewer is clearly not enough.
    if t > 1:
        assert decouple_weight(w, t - 1, order, groups).relative_error() > 1e-3


@pytest.mark.parametrize("order", ORDERS)
def test_error_is_non_increasing_in_rank_and_matches_reconstruction(order):
    w = torch.randn(10, 7, 3, 3, dtype=torch.float64)
    errors = []
    for t in range(1, max_rank(w.shape, order) + 1):
        dec = decouple_weight(w, t, order)
        direct = float((dec.reconstruct() - w).norm() / w.norm())
        assert dec.relative_error() == pytest.approx(direct, rel=1e-9, abs=1e-12)
        errors.append(direct)
    assert all(a >= b - 1e-12 for a, b in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 1e-12


def test_truncated_svd_beats_random_separable_terms():
    """Eckart–Young: no other rank-T sum of separable terms per slice is closer."""
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    best = decouple_weight(w, 2, "dw-pw").relative_error()
    for seed in range(20):
        other = planted_kernel("dw-pw", 6, 4, 3, 2, seed=100 + seed)
        # Best scaling of a random rank-2 candidate still loses.
        alpha = float((other * w).sum() / (other * other).sum())
        assert float((alpha * other - w).norm() / w.norm()) >= best - 1e-12


def test_rank_is_clipped_and_validated():
    w = torch.randn(4, 3, 3, 3)
    assert decouple_weight(w, 50, "dw-pw").rank == 4  # N=4 < k²=9
    assert decouple_weight(w, 50, "pw-dw").rank == 3  # C=3
    with pytest.raises(ValueError, match="rank"):
        decouple_weight(w, 0)
    with pytest.raises(ValueError, match="order"):
        decouple_weight(w, 1, "dw-dw")
    with pytest.raises(ValueError, match="groups"):
        decouple_weight(w, 1, "dw-pw", groups=3)


def test_results_repeat_and_signs_are_fixed():
    w = torch.randn(8, 4, 3, 3)
    a, b = decouple_weight(w, 3), decouple_weight(w.clone(), 3)
    assert torch.equal(a.depthwise, b.depthwise) and torch.equal(a.pointwise, b.pointwise)
    u, s, vh = torch.linalg.svd(torch.randn(5, 6, 4, dtype=torch.float64), full_matrices=False)
    u2, vh2 = svd_flip(-u, -vh)
    assert torch.allclose(u2 @ torch.diag_embed(s) @ vh2, u @ torch.diag_embed(s) @ vh)
    assert torch.allclose(u2, svd_flip(u, vh)[0])  # the same signs whatever the solver returned
    idx = u2.abs().argmax(dim=-2, keepdim=True)
    assert (torch.gather(u2, -2, idx) > 0).all()


def test_factors_are_float64_and_input_untouched():
    w = torch.randn(4, 4, 3, 3)
    before = w.clone()
    dec = decouple_weight(w, 2)
    assert dec.depthwise.dtype == dec.pointwise.dtype == torch.float64
    assert torch.equal(w, before)


def test_energy_spectra_and_rank_for_energy():
    w = planted_kernel("dw-pw", 8, 4, 3, 3, seed=1)
    dec = decouple_weight(w, None, "dw-pw")
    energy = dec.energy()
    assert energy.shape == (4, dec.max_rank)
    assert torch.all(energy[:, 1:] >= energy[:, :-1] - 1e-12)
    assert torch.allclose(energy[:, -1], torch.ones(4, dtype=torch.float64))
    kept = dec.layer_energy()
    assert kept[2] == pytest.approx(1.0)
    assert rank_for_energy(dec.singular_values, 1.0) == 3  # planted rank 3 holds all the energy
    for e in (0.3, 0.6, 0.9, 0.99):
        t = rank_for_energy(dec.singular_values, e)
        assert kept[t - 1] >= e and (t == 1 or kept[t - 2] < e)
        # relative error and energy are two views of the same spectrum
        assert dec.truncated(t).relative_error() == pytest.approx(
            float((1 - kept[t - 1]).sqrt()), abs=1e-7
        )
    with pytest.raises(ValueError, match="energy"):
        rank_for_energy(dec.singular_values, 0.0)
    assert torch.allclose(spectrum(w, "dw-pw"), dec.singular_values)


def test_zero_kernel_has_zero_error():
    dec = decouple_weight(torch.zeros(4, 2, 3, 3), 1)
    assert dec.relative_error() == 0.0
    assert rank_for_energy(dec.singular_values, 0.99) == 1

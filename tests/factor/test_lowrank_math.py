"""The low-rank (svd) factorization as math: exact at full rank, Eckart–Young optimal, planted
ranks recovered, errors monotone in the rank, energy rules, repeatable signs."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from decouple.factor import lowrank
from decouple.factor.lowrank import (
    lowrank_max_rank,
    lowrank_params,
    lowrank_weight,
    saves,
)


def kernel(n=12, c=8, k=3, seed=0):
    return torch.randn(
        n, c, k, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


@given(
    n=st.sampled_from([4, 6, 12]),
    c=st.sampled_from([2, 6, 8]),
    k=st.sampled_from([1, 3]),
    groups=st.sampled_from([1, 2]),
)
def test_exact_at_full_rank(n, c, k, groups):
    w = kernel(n, c // groups * groups, k)[:, : c // groups]
    f = lowrank_weight(w, None, groups)
    assert f.rank == f.max_rank == lowrank_max_rank(tuple(w.shape), groups)
    assert torch.allclose(f.reconstruct(), w, atol=1e-10)
    assert f.relative_error(w) < 1e-12


def test_a_linear_weight_reads_as_a_1x1_kernel():
    w = kernel(7, 10, 1)[:, :, 0, 0]  # (N, C)
    f = lowrank_weight(w, 3)
    assert f.weight_shape == (7, 10, 1, 1) and f.rank == 3 and f.max_rank == 7
    assert f.reconstruct().shape == (7, 10, 1, 1)
    assert lowrank_max_rank((7, 10)) == 7


def test_eckart_young_error_is_the_tail_of_the_spectrum_and_beats_other_rank_r_maps():
    w = kernel(16, 8, 1)
    s = torch.linalg.svdvals(w.reshape(16, 8))
    gen = torch.Generator().manual_seed(3)
    for r in range(1, 8):
        f = lowrank_weight(w, r)
        tail = float(s[r:].square().sum().sqrt() / s.square().sum().sqrt())
        assert f.relative_error(w) == pytest.approx(tail, rel=1e-9)
        assert float(1 - f.layer_energy()[r - 1]) == pytest.approx(tail**2, rel=1e-9)
        other = torch.randn(16, r, generator=gen, dtype=torch.float64) @ torch.randn(
            r, 8, generator=gen, dtype=torch.float64
        )
        best_scaled = (other * (other * w.reshape(16, 8)).sum() / other.square().sum()).reshape(
            w.shape
        )
        assert f.relative_error(w) <= float((w - best_scaled).norm() / w.norm())


def test_a_planted_rank_is_recovered_exactly_and_errors_fall_with_the_rank():
    gen = torch.Generator().manual_seed(1)
    planted = (
        torch.randn(20, 3, generator=gen, dtype=torch.float64)
        @ torch.randn(3, 8 * 9, generator=gen, dtype=torch.float64)
    ).reshape(20, 8, 3, 3)
    errors = [lowrank_weight(planted, r).relative_error(planted) for r in range(1, 6)]
    assert errors[0] > errors[1] > 1e-3 and max(errors[2:]) < 1e-12
    w = kernel(12, 8, 3)
    errors = [lowrank_weight(w, r).relative_error(w) for r in range(1, 13)]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False))


def test_energy_rule_takes_the_smallest_rank_reaching_it():
    w = kernel(12, 8, 1)
    kept = lowrank_weight(w).layer_energy()
    for e in (0.3, 0.8, 0.99, 1.0):
        f = lowrank_weight(w, energy=e)
        assert kept[f.rank - 1] >= e - 1e-12
        assert f.rank == 1 or kept[f.rank - 2] < e
    with pytest.raises(ValueError, match="either rank or energy"):
        lowrank_weight(w, 2, energy=0.5)
    with pytest.raises(ValueError, match="rank must be an integer"):
        lowrank_weight(w, 0)


def test_signs_are_fixed_so_results_repeat():
    w = kernel(9, 6, 3)
    a, b = lowrank_weight(w, 4), lowrank_weight(w.clone(), 4)
    assert torch.equal(a.out, b.out) and torch.equal(a.inp, b.inp)
    idx = a.out[0].abs().argmax(0)
    assert bool((a.out[0][idx, torch.arange(4)] > 0).all())  # largest entry of each column


def test_truncation_and_the_cost_rule():
    w = kernel(12, 8, 1)
    f = lowrank_weight(w, 6)
    t = f.truncated(2)
    assert torch.equal(t.out, f.out[:, :, :2]) and torch.equal(t.inp, f.inp[:, :2])
    with pytest.raises(ValueError):
        f.truncated(7)
    # 1x1 12x8: rank R costs R*(8+12) weights against 96
    assert lowrank_params((12, 8, 1, 1), 1, 4) == 80 and saves((12, 8, 1, 1), 1, 4)
    assert not saves((12, 8, 1, 1), 1, 5)  # 100 >= 96: nothing saved
    assert lowrank_params((12, 4, 3, 3), 2, 2) == 2 * (2 * 36 + 12)


@pytest.mark.parametrize("shape", [(12, 40, 1, 1), (40, 4, 3, 3)])
def test_the_gram_route_of_large_matrices_agrees_with_lapack(monkeypatch, shape):
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(*shape, generator=gen, dtype=torch.float64)
    w[1] = w[0]  # a repeated row: one singular value is zero
    direct = lowrank_weight(w, 5)
    monkeypatch.setattr(lowrank, "GRAM_ELEMENTS", 16)  # every matrix takes the Gram route
    gram = lowrank_weight(w, 5)
    s_gram, s_direct = gram.singular_values, direct.singular_values
    # The Gram route squares the values: a zero comes back as about sqrt(eps)·σ_max (how close
    # depends on the machine's arithmetic); the others agree to 1e-10.
    zero = s_direct < 1e-12 * s_direct.max()
    torch.testing.assert_close(s_gram[~zero], s_direct[~zero], atol=1e-10, rtol=0)
    assert bool((s_gram[zero] <= 4 * torch.finfo(w.dtype).eps ** 0.5 * s_direct.max()).all())
    torch.testing.assert_close(gram.reconstruct(), direct.reconstruct(), atol=1e-10, rtol=0)
    full = lowrank_weight(w)
    assert full.relative_error(w) < 1e-10  # exact at full rank, the zero direction included
    rows = gram.inp[0]
    torch.testing.assert_close(rows @ rows.T, torch.eye(5, dtype=torch.float64))

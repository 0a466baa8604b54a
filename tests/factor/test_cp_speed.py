"""CP at many ranks (``cp_weights_for_ranks``) and the ALS engine under ``cp_weight``: the same
iterates as tensorly's ``parafac``, each rank as good as ``cp_weight``'s within a stated tolerance,
errors that never rise with rank, planted ranks recovered, deterministic, grouped convs, and an
honest ``converged`` flag."""

import numpy as np
import pytest
import torch
from planted import planted_cp

from decouple.factor import cp
from decouple.factor.cp import cp_max_rank, cp_weight, cp_weights_for_ranks
from decouple.factor.tensorly_compat import (
    parafac_start,
    random_start,
    run_parafac,
    run_parafac_torch,
    svd_start,
    unit_columns,
)

# The budget allocator's 8 CP levels (10 % to 90 %) on a (16, 12, 3, 3) kernel (max rank 108).
RANKS = [10, 21, 32, 43, 54, 70, 86, 97]
# Each warm-started rank may be this much worse than cp_weight's cold 100 sweeps (relative error
# ratio); on average it must be no worse. Measured on real convs (results/cp_speed.md): mean
# ratio about 0.98, worst about 1.03.
RANK_TOLERANCE = 1.05


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture
def rationed(monkeypatch):
    """Ration every warm rank's sweeps as on a large conv (tiny test kernels would otherwise get
    ``n_iter_max`` sweeps and cp_weight's own run too, see ``CP_FREE_WORK``)."""
    monkeypatch.setattr(cp, "CP_FREE_WORK", 0.0)


# ------------------------------------------------------------------------------------------
# cp_weight: tensorly's ALS, sweep for sweep


@pytest.mark.parametrize("init", ["svd", "random"])
def test_start_is_tensorlys(init):
    x = _randn(5, 3, 3, 2, seed=3)  # rank 7 > every mode but the first: seeded random columns
    for rank in (2, 7):
        mine = svd_start(x, rank, 4) if init == "svd" else random_start(x.shape, rank, 4)
        theirs = parafac_start(x.numpy(), rank, init, 4)
        for a, b in zip(mine, theirs, strict=True):
            np.testing.assert_allclose(a.numpy(), b, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize(
    ("shape", "rank"), [((8, 5, 3, 3), 4), ((6, 4, 3, 1), 9), ((4, 3, 2, 2), 6)]
)
def test_cp_weight_repeats_tensorly_parafac(shape, rank):
    w = _randn(*shape, seed=rank)
    for n_iter_max, tol in ((100, 1e-6), (7, 0.0)):
        _, _, errors = run_parafac(w.numpy(), rank, n_iter_max, tol, 0)
        f = cp_weight(w, rank, n_iter_max=n_iter_max, tol=tol)
        assert f.iterations == [len(errors)]
        assert f.relative_error(w) == pytest.approx(errors[-1], rel=1e-7, abs=1e-12)


def test_singular_start_restarts_like_tensorly():
    """A zero out-channel makes the SVD start's normal equations singular: tensorly restarts from
    a random start, and so does cp_weight, reaching the exact fit."""
    w = _randn(2, 5, 4, 1, seed=2)
    w[0] = 0
    f = cp_weight(w, 8)
    assert f.relative_error(w) < 1e-8


# ------------------------------------------------------------------------------------------
# cp_weights_for_ranks


def test_smallest_rank_is_cp_weight_and_larger_ones_are_as_good(rationed):
    for seed in (0, 1):
        w = _randn(16, 12, 3, 3, seed=seed)
        many = cp_weights_for_ranks(w, RANKS)
        first = cp_weight(w, RANKS[0])
        for name in ("out", "inp", "vertical", "horizontal"):
            assert torch.equal(getattr(many[RANKS[0]], name), getattr(first, name))
        ratios = [many[r].relative_error(w) / cp_weight(w, r).relative_error(w) for r in RANKS]
        assert max(ratios) <= RANK_TOLERANCE, ratios
        assert np.mean(ratios) <= 1.0, ratios
        # each warm rank ran at most its ration: ceil(5 · 97 / r) sweeps
        for r in RANKS[1:]:
            assert many[r].iterations[0] <= -(-5 * RANKS[-1] // r)


def test_small_kernels_are_never_worse_than_cp_weight():
    """Where cp_weight's own run is cheap (``CP_FREE_WORK``), it runs too and the better fit is
    kept."""
    rng = np.random.default_rng(0)
    for case in range(12):
        shape = (int(rng.integers(2, 7)), int(rng.integers(1, 5)), 3, int(rng.integers(1, 4)))
        top = cp_max_rank(shape)
        ranks = sorted({max(1, int(lv * top)) for lv in (0.2, 0.5, 0.8, 1.0)})
        w = _randn(*shape, seed=case)
        many = cp_weights_for_ranks(w, ranks)
        for r in ranks:
            assert (
                many[r].relative_error(w) <= cp_weight(w, r).relative_error(w) * (1 + 1e-7) + 1e-9
            )


@pytest.mark.parametrize("rationed_sweeps", [False, True])
def test_errors_fall_with_rank_to_zero_at_the_planted_rank(rationed_sweeps, monkeypatch):
    if rationed_sweeps:
        monkeypatch.setattr(cp, "CP_FREE_WORK", 0.0)
    planted = 4
    w = planted_cp((8, 6, 3, 3), 1, planted, seed=planted)
    ranks = [1, 2, 3, 4, 5, 7, 9]
    many = cp_weights_for_ranks(w, ranks, n_iter_max=1000, tol=1e-12, warm_sweeps=20)
    errors = [many[r].relative_error(w) for r in ranks]
    assert all(a >= b - 1e-12 for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[ranks.index(planted) - 1] > 1e-3  # one term short is a real error
    assert all(e < 1e-6 for r, e in zip(ranks, errors, strict=True) if r >= planted), errors


def test_new_terms_never_worsen_the_fit():
    w = _randn(10, 7, 3, 3, seed=5)
    factors, errors = run_parafac_torch(w, 6, 20, 0.0, 0)
    old, _ = unit_columns(factors, [f.T @ f for f in factors])
    new = cp._residual_start(w, old, 9, 0)
    start = [torch.cat([p, q], dim=1) for p, q in zip(old, new, strict=True)]
    before = float((w - torch.einsum("nr,cr,ir,jr->ncij", *old)).norm() / w.norm())
    after = float((w - torch.einsum("nr,cr,ir,jr->ncij", *start)).norm() / w.norm())
    assert before == pytest.approx(errors[-1], rel=1e-9)
    assert after < before - 1e-3


def test_deterministic_for_a_seed_and_independent_of_order():
    w = _randn(9, 6, 3, 3, seed=7)
    a = cp_weights_for_ranks(w, [20, 5, 12], seed=3)
    b = cp_weights_for_ranks(w, [5, 12, 20], seed=3)
    for r in (5, 12, 20):
        for name in ("out", "inp", "vertical", "horizontal"):
            assert torch.equal(getattr(a[r], name), getattr(b[r], name))
        assert a[r].iterations == b[r].iterations and a[r].converged == b[r].converged


def test_grouped_conv(rationed):
    groups, shape = 2, (8, 3, 3, 3)
    w = planted_cp(shape, groups, 2, seed=1)
    w[4:] += 0.01 * _randn(4, 3, 3, 3, seed=2)  # the second group is not exactly low rank
    many = cp_weights_for_ranks(w, [1, 2, 3, 6], groups, n_iter_max=500, tol=1e-12)
    for r in (1, 2, 3, 6):
        f = many[r]
        assert f.out.shape == (groups, 4, r) and f.inp.shape == (groups, 3, r)
        assert f.vertical.shape == (groups, 3, r) and f.horizontal.shape == (groups, 3, r)
        assert len(f.iterations) == groups and f.reconstruct().shape == shape
    assert many[2].relative_error(w) < 0.02 < many[1].relative_error(w)
    single = cp_weight(w, 1, groups, n_iter_max=500, tol=1e-12)
    assert torch.equal(many[1].out, single.out) and many[1].iterations == single.iterations
    # each group on its own gives the same factors
    alone = cp_weights_for_ranks(w[4:], [1, 2, 3, 6], 1, n_iter_max=500, tol=1e-12)
    assert torch.allclose(many[6].out[1], alone[6].out[0])


def test_converged_flag_is_honest(rationed):
    w = _randn(12, 8, 3, 3, seed=4)
    loose = cp_weights_for_ranks(w, [4, 8, 16], tol=1.0)  # any change is below tol
    assert all(f.converged and f.iterations == [2] for f in loose.values())
    capped = cp_weights_for_ranks(w, [4, 8, 16], n_iter_max=3, tol=1e-12)
    assert not any(f.converged for f in capped.values())
    assert all(f.iterations[0] <= 3 for f in capped.values())
    # a kernel the smallest rank fits exactly converges there, and the rank above it at once
    # (the error, computed from Gram matrices as tensorly does, is exact to about 1e-8 only, so
    # a tol far below that could never be met near an exact fit)
    exact = planted_cp((6, 4, 3, 3), 1, 2, seed=0)
    fits = cp_weights_for_ranks(exact, [2, 3], n_iter_max=1000)
    assert fits[2].converged and fits[3].converged
    assert fits[3].relative_error(exact) < 1e-8


def test_ranks_clipped_keyed_as_asked_and_validated():
    w = _randn(4, 2, 3, 3, seed=0)
    top = cp_max_rank(tuple(w.shape))  # 18
    many = cp_weights_for_ranks(w, [3, 100, top, 3])
    assert set(many) == {3, 100, top}
    assert many[100] is many[top] and many[100].rank == top
    assert cp_weights_for_ranks(w, []) == {}
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="CP rank"):
            cp_weights_for_ranks(w, [2, bad])
    with pytest.raises(ValueError, match="warm_sweeps"):
        cp_weights_for_ranks(w, [2], warm_sweeps=0)


def test_zero_kernel_and_zero_group():
    zero = cp_weights_for_ranks(torch.zeros(4, 3, 3, 3), [1, 3])
    assert all(float(f.reconstruct().abs().max()) == 0.0 and f.converged for f in zero.values())
    w = torch.cat([torch.zeros(3, 2, 3, 3, dtype=torch.float64), _randn(3, 2, 3, 3)])
    half = cp_weights_for_ranks(w, [2, 4], groups=2)
    assert all(f.iterations[0] == 0 and f.iterations[1] > 0 for f in half.values())
    assert float(half[4].reconstruct()[:3].abs().max()) == 0.0


def test_threads_are_restored():
    outer = torch.get_num_threads()
    torch.set_num_threads(2)  # not CP_THREADS (1), so a missing restore shows
    try:
        w = _randn(6, 4, 3, 3, seed=1)
        one = cp_weights_for_ranks(w, [2, 5])  # CP_THREADS (1) during the call
        assert torch.get_num_threads() == 2
        same = cp_weights_for_ranks(w, [2, 5], threads=None)  # as set
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(outer)
    assert one[5].relative_error(w) == pytest.approx(same[5].relative_error(w), rel=1e-6)

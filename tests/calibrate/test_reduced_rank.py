"""Reduced-rank regression from moments: every rank priced at once equals a refit at each rank,
it beats the kernel's SVD and a last-factor refit where inputs are correlated, it is exact at
full rank, and calibration uses it on conv and linear layers alike."""

import copy

import pytest
import torch
from torch import nn
from toys import calibrated_change

from decouple import DecoupleConfig, decouple_
from decouple.calibrate import reduced_rank
from decouple.calibrate.layerwise import calibrate_
from decouple.calibrate.moments import Moments
from decouple.calibrate.reduced_rank import lowrank_losses, refit_lowrank
from decouple.calibrate.refit import refit_factored
from decouple.factor.lowrank import lowrank_weight


def correlated(n, c=8, hw=6, seed=0):
    """Inputs whose channels are mixed and offset: what a kernel's own SVD does not know."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(c, c, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    mix[:, 4:] *= 0.05  # half the input directions barely vary
    z = torch.randn(n, c, hw, hw, generator=gen, dtype=torch.float64)
    return torch.einsum("dc,bchw->bdhw", mix, z) + 0.5


def moments_of(conv, x):
    m = Moments.zeros(conv)
    with torch.no_grad():
        m.add(conv, x, conv(x))
    return m


@pytest.mark.parametrize("groups,bias,k", [(1, True, 1), (2, True, 1), (1, False, 1), (2, True, 3)])
def test_every_rank_at_once_equals_a_refit_at_each_rank(groups, bias, k):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, k, groups=groups, bias=bias, padding=k // 2).double()
    fit, val = moments_of(conv, correlated(20)), moments_of(conv, correlated(10, seed=1))
    ranks = list(range(1, 7))
    b = None if conv.bias is None else conv.bias.detach().double()
    fast = lowrank_losses(conv.weight, b, groups, ranks, fit, val, 1e-6)
    for r, loss in zip(ranks, fast, strict=True):
        start = lowrank_weight(conv.weight, r, groups)
        errors = []
        for lam in reduced_rank.ridges(1e-6):
            _, _, new_bias, kern = refit_lowrank(start, b, fit, lam, conv.weight)
            errors.append(val.relative_error(kern, new_bias) ** 2)
        assert loss == pytest.approx(min(errors), rel=1e-6, abs=1e-12)


def test_it_beats_the_kernel_svd_and_a_last_factor_refit_and_is_exact_at_full_rank():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 1).double()
    m = moments_of(conv, correlated(30))
    b = conv.bias.detach().double()
    for r in (2, 3, 4):
        f = lowrank_weight(conv.weight, r)
        svd_err = m.relative_error(f.reconstruct(), b)
        _, last_b, last_kernel = refit_factored(f, b, m, 1e-9)
        rrr = refit_lowrank(f, b, m, 1e-9)
        rrr_err = m.relative_error(rrr[3], rrr[2])
        assert rrr_err <= m.relative_error(last_kernel, last_b) + 1e-9 <= svd_err + 2e-9
        assert rrr_err < 0.9 * svd_err  # the inputs' correlations are worth something
    full = refit_lowrank(lowrank_weight(conv.weight, 8), b, m, 1e-12)
    assert m.relative_error(full[3], full[2]) < 1e-6


class LinearNet(nn.Module):
    """Tokens through two linear layers: calibration reads (B, T, C) inputs as rows."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 6)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_calibration_refits_low_rank_linear_layers_by_reduced_rank_regression():
    torch.manual_seed(0)
    net = LinearNet().double().eval()
    ref = copy.deepcopy(net)
    gen = torch.Generator().manual_seed(2)
    mix = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    x = torch.randn(96, 5, 8, generator=gen, dtype=torch.float64) @ mix
    decouple_(net, DecoupleConfig(method="svd", rank=3, fold_bn=False))
    before, records, after = calibrated_change(net, ref, x, mode="auto", batch_size=32)
    assert [r.name for r in records] == ["fc1", "fc2"]
    assert all(r.error_after <= r.error_before for r in records)
    assert {"data-free", "last", "alternating"} <= set(records[0].errors)
    assert after < before


def test_a_layer_whose_moments_would_not_fit_stays_data_free(monkeypatch):
    torch.manual_seed(0)
    net = LinearNet().double().eval()
    ref = copy.deepcopy(net)
    decouple_(net, DecoupleConfig(method="svd", rank=3, fold_bn=False))
    monkeypatch.setattr(reduced_rank, "MAX_MOMENT_ELEMENTS", 10 * 10)  # fc1 reads 8: (8+1)² fits
    fc2 = copy.deepcopy(net.fc2.state_dict())
    records = calibrate_(net, ref, torch.randn(64, 8, dtype=torch.float64), batch_size=32)
    by_name = {r.name: r for r in records}
    assert by_name["fc1"].skipped is None and "last" in by_name["fc1"].errors
    assert by_name["fc2"].mode == "data-free" and "exceed" in by_name["fc2"].skipped
    assert all(torch.equal(fc2[k], v) for k, v in net.fc2.state_dict().items())


@pytest.mark.parametrize("f,n", [(5, 12), (12, 5), (7, 7)])
def test_principal_directions_from_the_smaller_side_equal_the_full_eigendecomposition(f, n):
    """A widening map's directions come from an F-sized problem: the same projector on the
    top R directions as the N×N eigendecomposition, for every R up to min(F, N)."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(f, n, generator=gen, dtype=torch.float64)
    a = torch.randn(f, f, generator=gen, dtype=torch.float64)
    cov = a @ a.T
    u = reduced_rank._principal(w, cov)
    assert u.shape == (n, min(f, n))
    fitted = w.T @ cov @ w
    full = torch.linalg.eigh(fitted)[1].flip(-1)
    for r in range(1, min(f, n) + 1):
        mine, ref = u[:, :r] @ u[:, :r].T, full[:, :r] @ full[:, :r].T
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-8)
        top = reduced_rank._principal(w, cov, r)  # the refit's: only the first r
        assert top.shape == (n, r)
        torch.testing.assert_close(top, u[:, :r], rtol=0, atol=1e-8)
    torch.testing.assert_close(u.T @ u, torch.eye(min(f, n), dtype=torch.float64))


def test_top_directions_of_a_rank_deficient_widening_map_fall_back_to_the_svd():
    """Past the Gram matrix's precision (a direction with no variance) the top directions come
    from the SVD: still orthonormal, still the projector of the full eigendecomposition."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(6, 10, generator=gen, dtype=torch.float64)
    a = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    cov = a @ a.T  # rank 3: the fitted outputs vary in 3 directions only
    u = reduced_rank._principal(w, cov, 5)
    torch.testing.assert_close(u.T @ u, torch.eye(5, dtype=torch.float64))
    full = torch.linalg.eigh(w.T @ cov @ w)[1].flip(-1)[:, :3]
    torch.testing.assert_close(u[:, :3] @ u[:, :3].T, full @ full.T, rtol=0, atol=1e-8)

"""Calibration gives a CP layer that runs as ``square`` full kernels where they measure better.

Planted: a conv that is exactly a few terms with non-separable 2-D filters. Separable CP at that
rank cannot reproduce it whatever its last 1×1 conv; the full-kernel CP can, so ``auto`` must
take it (held-out error near zero). A layer that runs as ``separable``, or a mode other than
``auto``, keeps its separable factors.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from decouple import DecoupleConfig, decouple_
from decouple.calibrate.cp_kernels import FULL, FULL_ALTERNATING, refit_kernels
from decouple.calibrate.layerwise import calibrate_
from decouple.calibrate.moments import Moments
from decouple.factor.cp_full import cp_full_weight


def planted_net(rank=3, seed=0) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, stride=2)
    ).double()
    with torch.no_grad():
        for conv in (net[0], net[2]):
            n, c = conv.out_channels, conv.in_channels
            out, inp = torch.randn(n, rank, generator=g), torch.randn(c, rank, generator=g)
            k = torch.randn(9, rank, generator=g)
            conv.weight.copy_(torch.einsum("nr,cr,pr->ncp", out, inp, k).reshape(n, c, 3, 3))
    return net.eval()


def images(n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 10, 10, generator=g, dtype=torch.float64)


def decoupled(net, realization):
    model = copy.deepcopy(net)
    decouple_(model, DecoupleConfig(method="cp", rank=3, fold_bn=False, include_stem=True))
    for i in (0, 2):
        model[i].set_realization(realization)
    return model


def test_a_square_cp_layer_takes_full_kernels_where_they_fit_better():
    net = planted_net()
    model = decoupled(net, "square")
    records = calibrate_(model, net, images(), mode="auto", ridge=1e-10)
    assert all(r.mode in (FULL, FULL_ALTERNATING) for r in records)
    for r in records:
        assert r.errors[FULL] < 1e-4 < r.errors["last"]  # separable factors cannot get there
        assert r.errors[FULL_ALTERNATING] < 1e-4
        assert r.error_after == min(r.errors.values())
    assert model[0].spatial == model[2].spatial == "full"
    x = images(16, seed=7)
    with torch.no_grad():
        assert (model(x) - net(x)).norm() < 1e-4 * net(x).norm()


@pytest.mark.parametrize(("realization", "mode"), [("separable", "auto"), ("square", "last")])
def test_separable_graphs_and_other_modes_keep_separable_factors(realization, mode):
    net = planted_net()
    model = decoupled(net, realization)
    records = calibrate_(model, net, images(), mode=mode)
    assert all(not r.mode.startswith(FULL) and FULL not in r.errors for r in records)
    assert model[0].spatial == model[2].spatial == "separable"


def test_auto_keeps_whichever_kernels_measure_lower():
    """Convs whose every slice is a separable filter: whichever wins, ``auto`` keeps the lower
    held-out error (never worse than the separable refit) and the layer's kernels say which."""
    net = planted_net()
    with torch.no_grad():
        for i in (0, 2):
            w = net[i].weight
            net[i].weight.copy_(w[..., :1, :] * w[..., :, :1])  # each slice an outer product
    model = decoupled(net, "square")
    records = calibrate_(model, net, images(), mode="auto")
    for r in records:
        assert r.error_after == min(r.errors.values()) <= r.errors["last"]
        assert (model.get_submodule(r.name).spatial == "full") == r.mode.startswith(FULL)


def test_a_calibrated_latency_plan_runs_full_kernels_and_its_recipe_replays_them(fake_clock):
    """End to end: CP runs fastest as square (the fake clock says so), the planted convs fit
    better with full kernels, so the written layers have them and say so in the recipe."""
    from decouple import apply_recipe_, make_recipe
    from decouple.pipeline import compress_
    from decouple.runtime.latency import LatencyConfig

    def cost(m):  # ms per call: the originals 1, CP as four ops 0.6, as three 0.3
        if type(m).__name__ == "CPConv2d":
            return 0.3 if m.realization == "square" else 0.6
        return 1.0 if type(m) is nn.Conv2d and m.kernel_size == (3, 3) else 0.0

    fake_clock.cost = cost
    net = planted_net().float()
    model = copy.deepcopy(net)
    quick = LatencyConfig(min_run_time=0.001, layer_min_run_time=0.001, layer_rounds=1,
                          layer_table="measured")  # fmt: skip
    config = DecoupleConfig(method="cp", fold_bn=False, include_stem=True)
    result = compress_(model, config, (3, 10, 10), target_latency=0.6, latency=quick,
                       criterion="output", calib_images=images(128).float())  # fmt: skip
    assert set(result.latency_plan.realizations.values()) == {"square"}
    modes = {r.name: r.mode for r in result.calibration}
    assert any(mode.startswith(FULL) for mode in modes.values())
    for name, mode in modes.items():
        assert (model.get_submodule(name).spatial == "full") == mode.startswith(FULL)
    recipe = make_recipe(result.records, config)
    assert any(e.get("spatial") == "full" for e in recipe["layers"].values())
    fresh = planted_net().float()
    apply_recipe_(fresh, recipe)
    fresh.load_state_dict(model.state_dict())
    x = images(8, seed=9).float()
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model(x))


@pytest.mark.parametrize("groups", [1, 2])
def test_refit_kernels_recovers_planted_kernels_from_the_moments(groups):
    """Both 1×1 convs right, the kernels spoiled: one solve puts them back exactly."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=1, stride=2, groups=groups).double()
    f = cp_full_weight(conv.weight, 3, groups)
    x = torch.randn(48, 6, 9, 9, dtype=torch.float64)
    y = nn.functional.conv2d(x, f.reconstruct(), conv.bias, stride=2, padding=1, groups=groups)
    m = Moments.zeros(conv)
    m.add(conv, x, y)
    noise = 0.3 * torch.randn(f.vertical.shape, dtype=torch.float64)
    spoiled = type(f)(**{**f.__dict__, "vertical": f.vertical + noise})
    bias = conv.bias.detach().double()
    assert m.relative_error(spoiled.reconstruct(), bias) > 0.1
    fixed = refit_kernels(spoiled, bias, m, ridge=1e-10)
    assert m.relative_error(fixed.reconstruct(), bias) < 1e-6
    torch.testing.assert_close(fixed.vertical, f.vertical, rtol=1e-6, atol=1e-6)

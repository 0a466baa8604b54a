"""Data-free bias correction: BatchNorm-statistics means, and the shift that restores them."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch import nn

from decouple import DecoupleConfig
from decouple.calibrate import bn_bias
from decouple.calibrate.bn_bias import InputMeans, bn_input_means, correct_biases_
from decouple.nn.decoupled import DecoupledConv2d
from decouple.nn.lowrank import LowRankLinear
from decouple.pipeline import compress_
from decouple.surgery.methods import full_svd


def bn_relu_net(pool: nn.Module | None = None) -> nn.Sequential:
    """stem conv → BN (set statistics) → ReLU → [pool] → conv → BN → ReLU → flatten → linear."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(4))
        bn.running_var.copy_(torch.rand(4) + 0.5)
        bn.weight.copy_(torch.tensor([1.0, -2.0, 0.5, 1.5]))
        bn.bias.copy_(torch.tensor([0.0, 1.0, -1.0, 0.5]))
    layers = [nn.Conv2d(3, 4, 3, padding=1), bn, nn.ReLU()]
    layers += [pool] if pool is not None else []
    bn2 = nn.BatchNorm2d(6)
    with torch.no_grad():
        bn2.running_mean.normal_()
        bn2.bias.normal_()
    layers += [nn.Conv2d(4, 6, 3, padding=1, bias=False), bn2, nn.ReLU(),
               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)]  # fmt: skip
    return nn.Sequential(*layers).eval()


@torch.no_grad()
def rectified_mean(bn: nn.BatchNorm2d) -> torch.Tensor:
    """E[ReLU(z)] for z ~ N(β, s²), s = |γ|·σ/√(σ² + ε): what the BN's output gives a ReLU."""
    var = bn.running_var.double()
    s = bn.weight.double().abs() * (var / (var + bn.eps)).sqrt()
    m = bn.bias.double()
    a = m / s
    pdf = torch.exp(-0.5 * a**2) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(a / math.sqrt(2)))
    return m * cdf + s * pdf


def test_means_are_those_of_the_batchnorm_gaussian_after_relu():
    model = bn_relu_net()
    got = bn_input_means(model, (3, 16, 16), samples=64)["3"]  # the second conv
    assert got.size == (16, 16)
    # 64 images of 16x16: each mean averages 16,384 draws, ~1 % of the BN's std each
    torch.testing.assert_close(got.mean, rectified_mean(model[1]), atol=0.05, rtol=0.0)


def test_max_pooling_is_taken_halfway_between_independent_and_equal_neighbours(monkeypatch):
    model = bn_relu_net(nn.MaxPool2d(2))
    got = bn_input_means(model, (3, 16, 16), samples=64)["4"]
    assert got.size == (8, 8)
    equal = rectified_mean(model[1])  # neighbours that move as one: max-pooling keeps the mean
    monkeypatch.setattr(bn_bias, "_PoolsHalfway", contextlib.nullcontext)
    independent = bn_input_means(model, (3, 16, 16), samples=64)["4"].mean
    assert bool((independent > 1.5 * equal).all()), "the max of 4 independent draws is higher"
    torch.testing.assert_close(got.mean, (equal + independent) / 2, atol=0.05, rtol=0.0)


def test_layers_not_reached_through_batchnorm_have_no_statistic():
    model = bn_relu_net()
    means = bn_input_means(model, (3, 8, 8), samples=8)
    assert "0" not in means, "the stem reads the image: no BatchNorm statistics for it"
    assert {"3", "8"} <= set(means)  # the second conv, and the linear layer after the pool
    assert means["8"].size == ()
    assert bn_input_means(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval(), (3, 8, 8)) == {}


def test_statistics_pass_leaves_the_model_as_it_was():
    model = bn_relu_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        y = model(x)
    bn_input_means(model, (3, 8, 8), samples=8)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(model(x), y, rtol=0, atol=0)  # no hook left behind


def test_seeded():
    a = bn_input_means(bn_relu_net(), (3, 8, 8), samples=8, seed=3)
    b = bn_input_means(bn_relu_net(), (3, 8, 8), samples=8, seed=3)
    c = bn_input_means(bn_relu_net(), (3, 8, 8), samples=8, seed=4)
    assert torch.equal(a["3"].mean, b["3"].mean) and not torch.equal(a["3"].mean, c["3"].mean)


@pytest.mark.parametrize("padding", [0, 1])
def test_corrected_layer_is_exact_on_average_for_an_input_of_the_means(padding):
    torch.manual_seed(1)
    conv = nn.Conv2d(5, 7, 3, padding=padding).double()
    layer = DecoupledConv2d.from_conv(conv, rank=1)
    mu = torch.rand(5, dtype=torch.float64) + 0.5
    x = mu.view(1, 5, 1, 1).expand(1, 5, 6, 6)
    with torch.no_grad():
        before = (conv(x) - layer(x)).mean((0, 2, 3))
        assert float(before.abs().max()) > 1e-2, "rank 1 of 9 must leave a mean error to fix"
        done = correct_biases_(nn.Sequential(layer), {"0": conv}, {"0": InputMeans(mu, (6, 6))})
        after = (conv(x) - layer(x)).mean((0, 2, 3))
    assert done.layers == ["0"] and not done.skipped
    torch.testing.assert_close(after, torch.zeros_like(after), atol=1e-10, rtol=0)


def test_exact_layers_and_linear_layers():
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    full = DecoupledConv2d.from_conv(conv)  # full rank: exact, nothing to correct
    bias = full.bias.clone()
    correct_biases_(
        nn.Sequential(full), {"0": conv}, {"0": InputMeans(torch.rand(4).double(), (5, 5))}
    )
    torch.testing.assert_close(full.bias, bias, atol=1e-10, rtol=0)

    lin = nn.Linear(8, 6).double()
    low = LowRankLinear.from_factors(lin, full_svd(lin).truncated(2))
    mu = torch.randn(8, dtype=torch.float64)
    correct_biases_(nn.Sequential(low), {"0": lin}, {"0": InputMeans(mu, ())})
    with torch.no_grad():
        torch.testing.assert_close(low(mu[None]), lin(mu[None]), atol=1e-10, rtol=0)


def test_layers_it_cannot_correct_are_named_with_why():
    torch.manual_seed(3)
    a, b = nn.Conv2d(4, 4, 3, bias=False), nn.Conv2d(4, 4, 3)
    model = nn.Sequential(DecoupledConv2d.from_conv(a, 1), DecoupledConv2d.from_conv(b, 1))
    done = correct_biases_(model, {"0": a, "1": b}, {"0": InputMeans(torch.ones(4), (6, 6))})
    assert done.layers == []
    assert "no bias" in done.skipped["0"] and "no BatchNorm statistics" in done.skipped["1"]


def test_compress_corrects_data_free_only():
    x = torch.randn(4, 3, 8, 8)
    model = bn_relu_net()
    result = compress_(model, DecoupleConfig(rank=1, include_stem=True), (3, 8, 8))
    bc = result.bias_correction
    assert bc is not None and bc.layers == ["3"], bc  # the stem has no statistics
    assert bc.skipped == {"0": "no BatchNorm statistics for its input"}
    assert result.extra()["bias_correction"]["layers"] == ["3"]
    plain = bn_relu_net()
    assert compress_(plain, DecoupleConfig(rank=1), (3, 8, 8), bias_correction=False
                     ).bias_correction is None  # fmt: skip
    with torch.no_grad():
        assert not torch.allclose(model(x), plain(x)), "the correction moved the outputs"
    calibrated = bn_relu_net()
    got = compress_(
        calibrated, DecoupleConfig(rank=1), (3, 8, 8), calib_images=torch.randn(16, 3, 8, 8)
    )
    assert got.bias_correction is None, "with images the refit corrects the biases"


def test_compress_without_batchnorm_says_why():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    bc = compress_(model, DecoupleConfig(rank=1), (3, 8, 8)).bias_correction
    assert bc.layers == [] and "no BatchNorm statistics" in bc.reason


def test_untrained_batchnorms_give_no_statistics():
    model = bn_relu_net()
    model[4].reset_running_stats()  # the second BN never saw data: the linear after it reads it
    means = bn_input_means(model, (3, 8, 8), samples=8)
    assert "3" in means and "8" not in means
    model[1].reset_running_stats()
    assert bn_input_means(model, (3, 8, 8), samples=8) == {}

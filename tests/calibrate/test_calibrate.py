"""Calibration refit where the answer is known: exact layers stay exact, planted factors come back."""

import copy

import pytest
import torch
from torch import nn
from toys import images, toy

from decouple import DecoupleConfig, DecoupledConv2d, decouple_, decouple_weight
from decouple.calibrate import moments
from decouple.calibrate.layerwise import calibrate_
from decouple.calibrate.moments import Moments, patches, patches_at, positions_for
from decouple.calibrate.refit import Factors, refit, refit_first, refit_last
from decouple.surgery.bn_fold import fold_batchnorm_

GEOMETRIES = [
    dict(padding=1),
    dict(padding=1, stride=2, groups=2, padding_mode="reflect"),
    dict(padding="same", dilation=2, padding_mode="circular"),
    dict(padding=(0, 1), stride=(1, 2), padding_mode="replicate", bias=False),
]


def ref_conv(cfg, seed=0):
    torch.manual_seed(seed)
    return nn.Conv2d(6, 8, 3, **cfg).double()


def inputs(n=12, c=6, seed=1):
    return torch.randn(
        n, c, 9, 9, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


@pytest.mark.parametrize("cfg", GEOMETRIES)
def test_moments_give_the_exact_squared_error(cfg):
    conv = ref_conv(cfg)
    x = inputs()
    m = Moments.zeros(conv)
    m.add(conv, x[:5], conv(x[:5]))
    m.add(conv, x[5:], conv(x[5:]))  # accumulation over batches
    other = torch.randn_like(conv.weight)
    b = None if conv.bias is None else torch.randn_like(conv.bias)
    with torch.no_grad():
        twin = copy.deepcopy(conv)
        twin.weight.copy_(other)
        if b is not None:
            twin.bias.copy_(b)
        direct = (twin(x) - conv(x)).square().sum(dim=(0, 2, 3))
    assert torch.allclose(m.error(other, b), direct, rtol=1e-8, atol=1e-8)
    assert m.relative_error(conv.weight, conv.bias) < 1e-6
    # patches turn the conv into a matrix product, group by group
    p = patches(x, conv)
    with torch.no_grad():
        y = conv(x).permute(0, 2, 3, 1).reshape(p.shape[0], -1)
    g, f = conv.groups, p.shape[1] // conv.groups
    w = conv.weight.reshape(g, 8 // g, f)
    prod = torch.cat([p[:, j * f : (j + 1) * f] @ w[j].T for j in range(g)], dim=1)
    if conv.bias is not None:
        prod = prod + conv.bias
    assert torch.allclose(prod, y, atol=1e-10)


def planted(order, cfg, t=2, seed=0):
    """A conv whose kernel is exactly rank ``t`` in ``order``, its moments, and true factors."""
    conv = ref_conv(cfg, seed)
    dec = decouple_weight(conv.weight, t, order, conv.groups)
    with torch.no_grad():
        conv.weight.copy_(dec.reconstruct())
    x = inputs(16)
    m = Moments.zeros(conv)
    with torch.no_grad():
        m.add(conv, x, conv(x))
    return conv, m, Factors.from_decoupling(dec, conv.bias)


@pytest.mark.parametrize("order", ["dw-pw", "pw-dw"])
@pytest.mark.parametrize("cfg", GEOMETRIES)
def test_refit_recovers_planted_factors(order, cfg):
    conv, m, true = planted(order, cfg)
    g = torch.Generator().manual_seed(3)
    # Spoil the last factor (and bias): refit_last must restore the kernel exactly.
    bad = true.copy()
    if order == "dw-pw":
        bad.pointwise += torch.randn(bad.pointwise.shape, generator=g, dtype=torch.float64)
    else:
        bad.depthwise += torch.randn(bad.depthwise.shape, generator=g, dtype=torch.float64)
    if bad.bias is not None:
        bad.bias += 1.0
    fixed = refit_last(bad, m, ridge=1e-10)
    assert (fixed.weight() - conv.weight).norm() / conv.weight.norm() < 1e-6
    if conv.bias is not None:
        assert torch.allclose(fixed.bias, conv.bias, atol=1e-6)
    # Spoil the first factor only: refit_first restores it.
    bad = true.copy()
    if order == "dw-pw":
        bad.depthwise += torch.randn(bad.depthwise.shape, generator=g, dtype=torch.float64)
    else:
        bad.pointwise += torch.randn(bad.pointwise.shape, generator=g, dtype=torch.float64)
    fixed = refit_first(bad, m, ridge=1e-10)
    assert (fixed.weight() - conv.weight).norm() / conv.weight.norm() < 1e-6


@pytest.mark.parametrize("order", ["dw-pw", "pw-dw"])
def test_alternating_never_increases_the_fit_error(order):
    conv = ref_conv(dict(padding=1))
    x = inputs(16)
    m = Moments.zeros(conv)
    with torch.no_grad():
        m.add(conv, x, conv(x))
    start = Factors.from_decoupling(decouple_weight(conv.weight, 2, order), conv.bias)
    errors = [m.relative_error(start.weight(), start.bias)]
    fac = refit_last(start, m, ridge=1e-10)
    errors.append(m.relative_error(fac.weight(), fac.bias))
    for _ in range(4):
        fac = refit_first(fac, m, ridge=1e-10)
        errors.append(m.relative_error(fac.weight(), fac.bias))
        fac = refit_last(fac, m, ridge=1e-10)
        errors.append(m.relative_error(fac.weight(), fac.bias))
    assert all(b <= a + 1e-9 for a, b in zip(errors, errors[1:], strict=False))
    assert errors[-1] < errors[0]
    with pytest.raises(ValueError, match="refit mode"):
        refit(start, m, "both")


@pytest.mark.parametrize("mode", ["last", "alternating", "auto"])
@pytest.mark.parametrize("order", ["dw-pw", "pw-dw"])
def test_full_rank_output_is_unchanged_by_calibration(mode, order):
    net = toy()
    original = copy.deepcopy(net)
    fold_batchnorm_(net)
    reference = copy.deepcopy(net)
    decouple_(net, DecoupleConfig(rank=9, order=order, fold_bn=False, include_stem=True))
    records = calibrate_(net, reference, images(), mode=mode)
    assert [r.name for r in records] == ["conv1", "conv2", "conv3"]
    x = images(8)
    with torch.no_grad():
        assert torch.allclose(net(x), original(x), atol=1e-8)
    assert all(r.error_after < 1e-6 for r in records)


@pytest.mark.parametrize("order", ["dw-pw", "pw-dw"])
def test_calibration_reduces_output_error_at_low_rank(order):
    net = toy()
    fold_batchnorm_(net)
    reference = copy.deepcopy(net)
    decouple_(net, DecoupleConfig(rank=1, order=order, fold_bn=False, include_stem=True))
    free = copy.deepcopy(net)
    records = calibrate_(net, reference, images(128), mode="auto")
    for r in records:
        assert r.mode in ("data-free", "last", "alternating")
        assert r.error_after == min(r.errors.values())  # auto keeps the best on held-out images
        assert r.error_after <= r.error_before
    x = images(32)
    with torch.no_grad():
        ref_out = reference(x)
        err_free = (free(x) - ref_out).norm() / ref_out.norm()
        err_cal = (net(x) - ref_out).norm() / ref_out.norm()
    assert err_cal < err_free


def test_calibrate_on_planted_network_recovers_the_weights():
    """The original convs are exactly rank 2; the decoupled start has spoiled pointwise factors."""
    net = toy()
    fold_batchnorm_(net)
    for name in ("conv1", "conv2", "conv3"):
        conv = net.get_submodule(name)
        with torch.no_grad():
            conv.weight.copy_(decouple_weight(conv.weight, 2, "dw-pw").reconstruct())
    reference = copy.deepcopy(net)
    decouple_(net, DecoupleConfig(rank=2, fold_bn=False, include_stem=True))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, DecoupledConv2d):
                m.pointwise.weight.mul_(0.5).add_(0.1)
    calibrate_(net, reference, images(128), mode="last", ridge=1e-10)
    for name in ("conv1", "conv2", "conv3"):
        w, w0 = net.get_submodule(name).reconstructed_weight(), reference.get_submodule(name).weight
        assert (w - w0).norm() / w0.norm() < 1e-6


def test_bad_mode():
    with pytest.raises(ValueError, match="refit mode"):
        calibrate_(toy(), toy(), images(4), mode="best")


@pytest.mark.parametrize("cfg", GEOMETRIES)
def test_patches_at_some_pixels_are_those_rows_of_every_patch(cfg):
    conv = ref_conv(cfg)
    x = inputs(n=3)
    every = patches(x, conv)
    h, w = conv(x).shape[2:]
    gen = torch.Generator().manual_seed(0)
    b = torch.randint(0, 3, (40,), generator=gen)
    i, j = torch.randint(0, h, (40,), generator=gen), torch.randint(0, w, (40,), generator=gen)
    torch.testing.assert_close(patches_at(x, conv, b, i, j), every[(b * h + i) * w + j])


def test_float32_activations_give_the_float64_moments_to_float32_precision():
    conv = ref_conv(dict(padding=1))
    x = inputs(n=40)
    y = conv(x)
    exact, fast = Moments.zeros(conv), Moments.zeros(conv)
    exact.add(conv, x, y)
    fast.add(conv.float(), x.float(), y.float())
    scale = exact.xx.abs().max()
    assert (fast.xx - exact.xx).abs().max() < 1e-5 * scale
    assert (fast.xy - exact.xy).abs().max() < 1e-5 * exact.xy.abs().max()
    w = conv.weight.double() * 0.9
    assert abs(fast.relative_error(w, None) - exact.relative_error(w, None)) < 1e-5


def test_positions_per_image_fall_as_images_grow_and_stop_at_the_cap():
    conv = ref_conv(dict(padding=1))  # 6·9 = 54 features: MIN_SAMPLES decides
    few, many = positions_for(conv, 16), positions_for(conv, 4096)
    assert few == 1024 and many == 8 and positions_for(conv, None) == 1024
    big = nn.Conv2d(512, 8, 3)  # 4,608 features: SAMPLES_PER_FEATURE samples each
    assert positions_for(big, 512) == -(-moments.SAMPLES_PER_FEATURE * 4609 // 512)


def test_large_outputs_read_the_same_positions_of_an_image_whatever_the_batching():
    conv = ref_conv(dict(padding=1))
    x = inputs(n=6)  # 9×9 = 81 output pixels per image
    y = conv(x)
    whole, one_by_one, every = Moments.zeros(conv), Moments.zeros(conv), Moments.zeros(conv)
    whole.add(conv, x, y, positions=30)
    for i in range(len(x)):
        one_by_one.add(conv, x[i : i + 1], y[i : i + 1], positions=30, index=i)
    every.add(conv, x, y, positions=81)  # as many as there are: no selection
    assert whole.count == 6 * 30 and every.count == 6 * 81
    torch.testing.assert_close(whole.xx, one_by_one.xx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(whole.xy, one_by_one.xy, rtol=1e-12, atol=1e-12)
    reference = Moments.zeros(conv)
    reference.add(conv, x, y, positions=None)
    torch.testing.assert_close(every.xx, reference.xx, rtol=1e-12, atol=1e-12)
    assert whole.relative_error(conv.weight, conv.bias) < 1e-6  # the conv itself: no error


@pytest.mark.parametrize("order", ["dw-pw", "pw-dw"])
@pytest.mark.parametrize(("groups", "bias"), [(1, True), (2, False)])
def test_every_rank_from_one_build_is_each_rank_refit_alone(order, groups, bias):
    """refit_last_ranks solves blocks of the full-rank system: the same as refitting each
    truncation on its own."""
    from decouple.calibrate.refit import refit_last_ranks

    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 3, padding=1, groups=groups, bias=bias)
    x = torch.randn(20, 8, 6, 6)
    y = conv(x).detach() + 0.1 * torch.randn(20, 6, 6, 6)
    m = Moments.zeros(conv)
    m.add(conv, x, y)
    full = decouple_weight(conv.weight, None, order, groups)
    every = refit_last_ranks(
        Factors.from_decoupling(full, conv.bias), m, range(1, full.max_rank + 1)
    )
    assert sorted(every) == list(range(1, full.max_rank + 1))
    for t, got in every.items():
        alone = refit_last(Factors.from_decoupling(full.truncated(t), conv.bias), m)
        torch.testing.assert_close(got.weight(), alone.weight(), rtol=0, atol=1e-10)
        if bias:
            torch.testing.assert_close(got.bias, alone.bias, rtol=0, atol=1e-10)

"""CP and Tucker layers are refit from the moments of the features their last 1×1 conv reads:
the same solution as from the k×k patches' moments, which cost (C·k²/R)² times more."""

import copy

import pytest
import torch
from torch import nn
from toys import calibrated_change

from decouple import DecoupleConfig, decouple_
from decouple.calibrate.layerwise import calibrate_, layer_moments
from decouple.calibrate.refit import refit_factored


def single(conv: nn.Conv2d, method: str, rank: int):
    net = nn.Sequential(conv).double().eval()
    ref = copy.deepcopy(net)
    decouple_(net, DecoupleConfig(method=method, rank=rank, fold_bn=False, include_stem=True))
    return net, ref


@pytest.mark.parametrize("method", ["cp", "tucker"])
@pytest.mark.parametrize("groups,stride,bias", [(1, 1, True), (2, 2, False), (1, 2, True)])
def test_the_features_refit_equals_the_patches_refit(method, groups, stride, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, stride=stride, padding=1, groups=groups, bias=bias)
    net, ref = single(conv, method, 2)
    x = torch.randn(40, 6, 7, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    layer = net[0]
    f = layer.factors()
    b = None if layer.bias is None else layer.bias.detach().double()
    with torch.no_grad():
        fit, _ = layer_moments(iter([(0, x)]), iter([(0, ref(x))]), layer, 0.125, len(x))
    want_out, want_bias, _ = refit_factored(f, b, fit, 1e-4)
    (rec,) = calibrate_(net, ref, x, mode="last", batch_size=16)
    assert rec.mode == "last"
    got = layer.pointwise_out.weight.detach().reshape(want_out.shape)
    torch.testing.assert_close(got, want_out, rtol=1e-8, atol=1e-10)
    if bias:
        torch.testing.assert_close(layer.bias.detach(), want_bias, rtol=1e-8, atol=1e-10)


def test_low_rank_convs_are_refit_from_their_inputs():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(12, 16, 1), nn.ReLU(), nn.Conv2d(16, 10, 1)).double().eval()
    ref = copy.deepcopy(net)
    decouple_(net, DecoupleConfig(method="svd", rank=3, fold_bn=False, include_stem=True))
    gen = torch.Generator().manual_seed(2)
    scales = torch.logspace(0, -2, 12, dtype=torch.float64)  # inputs of a few directions
    mix = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=torch.float64))[0] * scales
    x = (torch.randn(48, 5, 5, 12, generator=gen, dtype=torch.float64) @ mix).permute(0, 3, 1, 2)
    before, records, after = calibrated_change(net, ref, x, mode="auto", batch_size=16)
    assert [r.name for r in records] == ["0", "2"]
    assert all(r.error_after <= r.error_before for r in records)
    assert {"data-free", "last", "alternating"} <= set(records[0].errors)
    assert after < 0.5 * before

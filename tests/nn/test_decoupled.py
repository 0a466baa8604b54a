"""DecoupledConv2d: full rank reproduces the original conv for every Conv2d option, both orders."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from planted import conv_configs
from torch import nn

from decouple import DecoupledConv2d, decouple_weight
from decouple.factor.nd import ORDERS, max_rank


@settings(max_examples=150, deadline=None)
@given(cfg=conv_configs(), order=st.sampled_from(ORDERS), seed=st.integers(0, 2**16))
def test_full_rank_matches_original_conv(cfg, order, seed):
    torch.manual_seed(seed)
    conv = nn.Conv2d(**cfg).double()
    # Big enough for the receptive field (and for reflect padding, which needs pad < size).
    h = (cfg["kernel_size"][0] - 1) * cfg["dilation"][0] + 4
    w = (cfg["kernel_size"][1] - 1) * cfg["dilation"][1] + 5
    x = torch.randn(2, cfg["in_channels"], h, w, dtype=torch.float64)
    layer = DecoupledConv2d.from_conv(conv, None, order)
    assert layer.rank == max_rank(conv.weight.shape, order, conv.groups)
    expected, got = conv(x), layer(x)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-10)
    assert torch.allclose(layer.reconstructed_weight(), conv.weight, atol=1e-12)


@pytest.mark.parametrize("order", ORDERS)
def test_layer_is_two_plain_convs_with_the_documented_shapes(order):
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1, groups=2)
    t = 3
    layer = DecoupledConv2d.from_conv(conv, t, order)
    children = dict(layer.named_children())
    assert set(children) == {"depthwise", "pointwise"}
    assert all(type(m) is nn.Conv2d for m in children.values())
    dw, pw = layer.depthwise, layer.pointwise
    if order == "dw-pw":
        assert (dw.in_channels, dw.out_channels, dw.groups) == (6, 6 * t, 6)
        assert (pw.in_channels, pw.out_channels, pw.groups) == (6 * t, 10, 2)
        assert dw.stride == (2, 2) and pw.stride == (1, 1) and pw.bias is not None
    else:
        assert (pw.in_channels, pw.out_channels, pw.groups) == (6, 10 * t, 2)
        assert (dw.in_channels, dw.out_channels, dw.groups) == (10 * t, 10, 10)
        assert dw.stride == (2, 2) and pw.stride == (1, 1) and dw.bias is not None
    assert pw.kernel_size == (1, 1) and dw.kernel_size == (3, 3)
    assert f"rank={t}" in repr(layer) and order in repr(layer)


@pytest.mark.parametrize("order", ORDERS)
def test_low_rank_layer_computes_the_reconstructed_kernel(order):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, 3, padding=1, padding_mode="reflect").double()
    layer = DecoupledConv2d.from_conv(conv, 2, order)
    approx = nn.Conv2d(5, 7, 3, padding=1, padding_mode="reflect").double()
    with torch.no_grad():
        approx.weight.copy_(decouple_weight(conv.weight, 2, order).reconstruct())
        approx.bias.copy_(conv.bias)
    x = torch.randn(1, 5, 9, 9, dtype=torch.float64)
    assert torch.allclose(layer(x), approx(x), atol=1e-10)


@pytest.mark.parametrize("order", ORDERS)
def test_empty_layer_loads_a_saved_state_dict(order):
    conv = nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding="valid", dilation=(1, 2), bias=False)
    built = DecoupledConv2d.from_conv(conv, 2, order)
    empty = DecoupledConv2d(
        4, 6, (3, 2), 2, order, stride=(2, 1), padding="valid", dilation=(1, 2), bias=False
    )
    empty.load_state_dict(built.state_dict())
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(empty(x), built(x))


def test_keeps_dtype_and_factor_round_trip():
    conv = nn.Conv2d(4, 8, 3, groups=2)
    layer = DecoupledConv2d.from_conv(conv, 3, "dw-pw")
    assert layer.depthwise.weight.dtype == torch.float32
    again = DecoupledConv2d.from_conv(conv, 3, "dw-pw")
    again.load_factors(layer.factors())
    assert torch.allclose(again.pointwise.weight, layer.pointwise.weight)


def test_bad_arguments():
    with pytest.raises(ValueError, match="order"):
        DecoupledConv2d(4, 4, 3, 1, order="pw")
    with pytest.raises(ValueError, match="rank"):
        DecoupledConv2d(4, 4, 3, 0)
    with pytest.raises(ValueError, match="different convolution"):
        DecoupledConv2d.from_decoupling(
            nn.Conv2d(4, 4, 3), decouple_weight(torch.randn(4, 4, 5, 5), 1)
        )

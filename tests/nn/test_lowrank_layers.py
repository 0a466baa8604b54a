"""The low-rank layers: exact at full rank with every conv option, linear layers on inputs of
any shape, empty layers that load a state_dict, and FLOPs that match FlopCounterMode."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from decouple.nn.flops import count_flops, factored_flops
from decouple.nn.geometry import positions
from decouple.nn.lowrank import LowRankConv2d, LowRankLinear


@given(
    k=st.sampled_from([1, 3]),
    stride=st.sampled_from([1, 2]),
    groups=st.sampled_from([1, 2]),
    bias=st.booleans(),
    padding=st.sampled_from([0, 1, "same"]),
    mode=st.sampled_from(["zeros", "reflect", "circular"]),
)
def test_conv_exact_at_full_rank(k, stride, groups, bias, padding, mode):
    if padding == "same" and stride > 1:
        stride = 1  # PyTorch refuses 'same' with a stride
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, k, stride, padding, groups=groups, bias=bias, padding_mode=mode).double()
    layer = LowRankConv2d.from_conv(conv)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), atol=1e-10, rtol=1e-10)
    assert layer.rank == min(6 // groups, 4 // groups * k * k)


def test_linear_exact_at_full_rank_on_any_leading_shape():
    torch.manual_seed(0)
    lin = nn.Linear(10, 7).double()
    layer = LowRankLinear.from_linear(lin)
    for shape in [(3, 10), (2, 5, 10), (2, 3, 4, 10)]:
        x = torch.randn(*shape, dtype=torch.float64)
        torch.testing.assert_close(layer(x), lin(x), atol=1e-10, rtol=1e-10)
    assert (layer.in_channels, layer.out_channels, layer.kernel_size) == (10, 7, (1, 1))
    assert positions(torch.zeros(2, 5, 10), layer) == (5, 1)
    assert positions(torch.zeros(2, 10), lin) == (1, 1)


def test_empty_layers_load_a_state_dict_and_follow_requires_grad():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 1, bias=False)
    conv.weight.requires_grad_(False)
    full = LowRankConv2d.from_conv(conv, 3)
    empty = LowRankConv2d.empty_like(conv, 3)
    empty.load_state_dict(full.state_dict())
    x = torch.randn(1, 8, 4, 4)
    assert torch.equal(empty(x), full(x)) and empty.bias is None
    assert not any(p.requires_grad for p in empty.parameters())
    lin = nn.Linear(12, 5)
    twin = LowRankLinear.empty_like(lin, 2)
    twin.load_state_dict(LowRankLinear.from_linear(lin, 2).state_dict())
    assert set(twin.state_dict()) == {
        "pointwise_in.weight",
        "pointwise_out.weight",
        "pointwise_out.bias",
    }
    with pytest.raises(ValueError, match="rank must be an integer"):
        LowRankLinear(4, 4, 0)
    with pytest.raises(ValueError, match="different layer"):
        LowRankLinear.from_factors(nn.Linear(3, 5), LowRankLinear.from_linear(lin, 2).factors())


def test_factors_read_back_what_the_layer_holds():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=1, groups=2).double()
    layer = LowRankConv2d.from_conv(conv, 2)
    f = layer.factors()
    assert f.rank == 2 and f.groups == 2
    torch.testing.assert_close(f.reconstruct(), layer.reconstructed_weight())
    lin = LowRankLinear.from_linear(nn.Linear(9, 4).double(), 3)
    w = lin.reconstructed_weight()
    x = torch.randn(5, 9, dtype=torch.float64)
    torch.testing.assert_close(lin(x), x @ w.T + lin.bias)


@pytest.mark.parametrize("groups", [1, 2])
def test_closed_form_flops_match_flop_counter(groups):
    conv = nn.Conv2d(8, 12, 1, stride=2, groups=groups)
    layer = LowRankConv2d.from_conv(conv, 3)
    x = torch.zeros(1, 8, 10, 10)
    counted, _ = count_flops(layer, x)
    assert counted == factored_flops(conv, "svd", "", 3, (10, 10), (5, 5))
    lin = nn.Linear(20, 30)
    low = LowRankLinear.from_linear(lin, 4)
    counted, _ = count_flops(low, torch.zeros(1, 7, 20))
    assert counted == factored_flops(lin, "svd", "", 4, (7, 1), (7, 1)) == 2 * 7 * 4 * 50

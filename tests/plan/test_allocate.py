"""Rank allocation: closed-form FLOPs match FlopCounterMode, the budget holds, the greedy is sane."""

import copy

import pytest
import torch
from torch import nn
from toys import images, toy

from decouple import DecoupleConfig, DecoupledConv2d, count_flops
from decouple.pipeline import compress_
from decouple.plan.allocate import Option, allocate, layer_options
from decouple.plan.flops_budget import plan_ranks
from decouple.plan.losses import probe_shapes
from decouple.plan.options import decoupled_flops


@pytest.mark.parametrize("order", ["dw-pw", "pw-dw"])
@pytest.mark.parametrize(
    "cfg", [dict(padding=1), dict(stride=2, groups=2), dict(padding="same", dilation=2)]
)
@pytest.mark.parametrize("t", [1, 3])
def test_closed_form_flops_match_flop_counter(order, cfg, t):
    conv = nn.Conv2d(6, 10, 3, **cfg)
    x = torch.zeros(1, 6, 11, 9)
    model = nn.Sequential(DecoupledConv2d.from_conv(conv, t, order))
    counted, _ = count_flops(model, x)
    out_hw = tuple(conv(x).shape[2:])
    assert decoupled_flops(conv, order, t, (11, 9), out_hw) == counted


def test_greedy_respects_budget_and_prefers_cheap_loss():
    options = {
        "a": [Option(0, 100, 0.0), Option(1, 20, 0.9), Option(2, 40, 0.1)],
        "b": [Option(0, 100, 0.0), Option(1, 20, 0.2), Option(2, 40, 0.15)],
    }
    plan = allocate(options, fixed_flops=10, target_flops=70)
    # From (20, 20): upgrading "a" to T=2 saves 0.8 for 20 FLOPs, the best buy; then nothing fits.
    assert plan.ranks() == {"a": 2, "b": 1} and plan.total_flops == 70
    plan = allocate(options, fixed_flops=10, target_flops=1000)
    assert plan.ranks() == {"a": 0, "b": 0}
    assert plan.reasons["a"].startswith("kept")
    tight = allocate(options, fixed_flops=10, target_flops=5)  # unreachable: cheapest of all
    assert tight.ranks() == {"a": 1, "b": 1} and tight.total_flops > tight.target_flops


def test_layer_options_drop_ranks_that_save_too_little():
    opts = layer_options([0.5, 0.2, 0.0], original=100, costs=[50, 85, 95], min_saving=0.1)
    assert [o.rank for o in opts] == [0, 1, 2]
    assert layer_options([0.0], original=100, costs=[95], min_saving=0.1) == [Option(0, 100, 0.0)]


@pytest.mark.parametrize("criterion", ["energy", "data"])
@pytest.mark.parametrize("target", [0.4, 0.6, 0.8])
def test_plan_meets_the_budget_as_flop_counter_counts_it(criterion, target):
    net = toy()
    before, _ = count_flops(net, torch.zeros(1, 3, 8, 8, dtype=torch.float64))
    model = copy.deepcopy(net)
    result = compress_(
        model,
        DecoupleConfig(fold_bn=True, include_stem=True),
        (3, 8, 8),
        target_flops=target,
        criterion=criterion,
        calib_images=images(48) if criterion == "data" else None,
        refit="none",
    )
    after, _ = count_flops(model, torch.zeros(1, 3, 8, 8, dtype=torch.float64))
    plan = result.allocation
    assert plan.total_flops == after  # the plan's arithmetic is what PyTorch dispatches
    if plan.total_flops <= plan.target_flops:
        assert after <= target * before
    for r in result.records:
        assert r.reason == plan.reasons[r.name]
        assert (r.action == "decoupled") == (plan.ranks()[r.name] > 0)


def test_looser_budget_never_has_more_loss():
    net = toy()
    losses = []
    for target in (0.3, 0.5, 0.7, 0.9):
        plan = plan_ranks(copy.deepcopy(net), DecoupleConfig(), (3, 8, 8), target, "energy")
        losses.append(sum(o.loss for o in plan.choice.values()))
    assert losses == sorted(losses, reverse=True)


def test_skip_overrides_hold_under_a_budget_and_shapes_probe():
    net = toy()
    shapes = probe_shapes(net, ["conv1", "conv3"], (3, 8, 8))
    assert shapes == {"conv1": ((8, 8), (8, 8)), "conv3": ((8, 8), (4, 4))}
    config = DecoupleConfig(overrides={"conv2": "skip"}, include_stem=True)
    plan = plan_ranks(net, config, (3, 8, 8), 0.5, "energy")
    assert set(plan.choice) == {"conv1", "conv3", "head"}  # a budget prices the linear head too
    # By default the stem (3 input channels) is kept out of the budget.
    plan = plan_ranks(net, DecoupleConfig(overrides={"conv2": "skip"}), (3, 8, 8), 0.5, "energy")
    assert set(plan.choice) == {"conv3", "head"}
    with pytest.raises(ValueError, match="target_flops"):
        plan_ranks(net, DecoupleConfig(), (3, 8, 8), 1.5, "energy")
    with pytest.raises(ValueError, match="calibration images"):
        plan_ranks(net, DecoupleConfig(), (3, 8, 8), 0.5, "data")

"""Budgets over 1×1 convs and linear layers: priced in svd whatever the k×k method, reaching
FLOPs that k×k methods alone cannot, with losses that fall as the rank grows."""

import copy

import torch
from torch import nn

from decouple import DecoupleConfig, count_flops
from decouple.pipeline import compress_
from decouple.plan.flops_budget import plan_ranks
from decouple.plan.options import rank_options


class MobileBlock(nn.Module):
    """A MobileNetV2-like net: its FLOPs are in 1×1 convs; the 3×3 ones are depthwise or stem."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.expand = nn.Conv2d(8, 48, 1)
        self.depthwise = nn.Conv2d(48, 48, 3, padding=1, groups=48)
        self.project = nn.Conv2d(48, 48, 1)
        self.head = nn.Linear(48, 10)

    def forward(self, x):
        x = torch.relu(self.expand(torch.relu(self.stem(x))))
        x = self.project(torch.relu(self.depthwise(x)))
        return self.head(x.mean((2, 3)))


def mobile(seed=0):
    torch.manual_seed(seed)
    return MobileBlock().double().eval()


def images(n=64):
    gen = torch.Generator().manual_seed(4)
    return torch.randn(n, 3, 8, 8, generator=gen, dtype=torch.float64)


def test_every_method_prices_1x1_and_linear_layers_in_svd_with_losses_falling_in_rank():
    for method in ("nd", "auto"):
        options, total, layers, _ = rank_options(mobile(), DecoupleConfig(method=method), (3, 8, 8))
        assert set(options) == {"expand", "project", "head"}  # stem kept, depthwise kept
        for name, opts in options.items():
            assert {o.method for o in opts if o.rank} == {"svd"}, name
            ranked = sorted((o for o in opts if o.rank), key=lambda o: o.rank)
            losses = [o.loss for o in ranked]
            assert losses == sorted(losses, reverse=True), name
            assert all(o.cost < opts[0].cost for o in ranked)


def test_a_budget_that_k_by_k_methods_cannot_reach_is_reached_with_svd():
    model = mobile()
    x = images(1)
    before, _ = count_flops(model, x)
    result = compress_(model, DecoupleConfig(method="auto"), (3, 8, 8), target_flops=0.5)
    after, _ = count_flops(model, x)
    assert after <= 0.5 * before and after == result.allocation.total_flops
    assert any(o.method == "svd" and o.rank for o in result.allocation.choice.values())
    skip = {"expand": "skip", "project": "skip", "head": "skip"}
    plan = plan_ranks(mobile(), DecoupleConfig(method="auto", overrides=skip), (3, 8, 8), 0.5)
    assert plan.total_flops > plan.target_flops  # nothing left to cut


def test_calibrated_plans_use_the_data_loss_and_refit_every_low_rank_or_pruned_layer():
    model, ref = mobile(), mobile()
    calib = images(96)
    result = compress_(
        model, DecoupleConfig(method="auto"), (3, 8, 8), target_flops=0.6, criterion="data",
        calib_images=calib,
    )  # fmt: skip
    plan = result.allocation
    factored = [n for n, o in plan.choice.items() if o.rank and o.method != "prune"]
    # and both ends of every pruned chain: the consumer on its kept inputs, the producer on its
    # kept outputs
    refit = factored + [n for c, _ in plan.pruned.values() for n in (c.producer, c.consumer)]
    assert refit and sorted(r.name for r in result.calibration) == sorted(refit)
    assert all(r.error_after <= r.error_before for r in result.calibration)
    with torch.no_grad():
        err = float((model(calib) - ref(calib)).norm() / ref(calib).norm())
    data_free = copy.deepcopy(ref)
    compress_(data_free, DecoupleConfig(method="auto"), (3, 8, 8), target_flops=0.6)
    with torch.no_grad():
        err_free = float((data_free(calib) - ref(calib)).norm() / ref(calib).norm())
    assert err < err_free


class WithAuxHead(MobileBlock):
    """An auxiliary head that eval-mode forward never calls (GoogLeNet's, Inception's)."""

    def __init__(self):
        super().__init__()
        self.aux = nn.Linear(48, 10)


def test_a_layer_the_forward_pass_never_calls_is_kept_and_said_so():
    torch.manual_seed(0)
    model = WithAuxHead().double().eval()
    result = compress_(model, DecoupleConfig(method="auto"), (3, 8, 8), target_flops=0.5)
    aux = next(r for r in result.records if r.name == "aux")
    assert aux.action == "kept" and "never called" in aux.reason
    assert "aux" not in result.allocation.choice and type(model.aux) is nn.Linear


class ReadsItsWeight(nn.Module):
    """A parent that reads its child's weight (torchvision's Swin attention does)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.qkv = nn.Linear(16, 48)

    def forward(self, x):
        return nn.functional.linear(self.conv(x).mean((2, 3)), self.qkv.weight, self.qkv.bias)


def test_a_fixed_rule_never_replaces_a_layer_whose_parent_reads_its_weights():
    torch.manual_seed(0)
    model = ReadsItsWeight().eval()
    result = compress_(model, DecoupleConfig(method="svd", rank=4, include_stem=True), (3, 8, 8))
    by_name = {r.name: r for r in result.records}
    assert by_name["qkv"].action == "kept" and "never called" in by_name["qkv"].reason
    assert type(model.qkv) is nn.Linear and by_name["conv"].action == "decoupled"
    assert model(images(2).float()).shape == (2, 48)

"""Fusing linear 1×1 pairs: exact, only where it is cheaper and provably safe, replayed by recipes."""

import copy

import pytest
import torch
from torch import nn

from decouple import DecoupleConfig, count_flops
from decouple.pipeline import compress_
from decouple.surgery.bn_fold import fold_batchnorm_
from decouple.surgery.linear_fuse import FusedConv, find_linear_pairs, fuse_linear_pairs_
from decouple.surgery.recipe import apply_recipe_, make_recipe, recipe_of_model
from decouple.surgery.recipe_check import check_recipe


def pw(c, n, **kw):
    return nn.Conv2d(c, n, 1, bias=False, **kw)


class Bottleneck(nn.Module):
    """3×3 conv, a linear projection (1×1 + BN, no activation) widening 8→24, then a 1×1 head
    24→32 with ReLU: the projection and the head fuse into one 8→32 conv (8·32 < 24·40)."""

    def __init__(self, act_between=False, reuse=False, mid=24, head_groups=1):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = pw(8, mid)
        self.proj_bn = nn.BatchNorm2d(mid)
        self.head = pw(mid, 32, groups=head_groups)
        self.head_bn = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 + (mid if reuse else 0), 5)
        self.act_between, self.reuse = act_between, reuse

    def forward(self, x):
        p = self.proj_bn(self.proj(torch.relu(self.conv(x))))
        h = torch.relu(self.head_bn(self.head(torch.relu(p) if self.act_between else p)))
        feats = [h.mean((2, 3))] + ([p.mean((2, 3))] if self.reuse else [])
        return self.fc(torch.cat(feats, 1))


class Chain(nn.Module):
    """Three linear 1×1 convs in a row (4→16→12→6): both steps are cheaper fused."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = pw(4, 16), pw(16, 12), pw(12, 6)

    def forward(self, x):
        return torch.relu(self.c(self.b(self.a(x))))


def ready(net, seed=0):
    torch.manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
    return net.double().eval()


def x_for(net, n=4):
    c = 3 if hasattr(net, "conv") else 4
    return torch.randn(n, c, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def test_fused_pair_is_exact_and_cheaper():
    net = ready(Bottleneck())
    ref, x = copy.deepcopy(net), x_for(net)
    fold_batchnorm_(net)
    assert fuse_linear_pairs_(net) == {"proj": "head"}
    assert isinstance(net.proj, FusedConv) and net.head.weight.shape == (32, 8, 1, 1)
    torch.testing.assert_close(net(x), ref(x), rtol=0, atol=1e-10)
    assert count_flops(net, x[:1])[0] < count_flops(ref, x[:1])[0]


@pytest.mark.parametrize(
    "kwargs, why",
    [
        ({"act_between": True}, "a ReLU between the convs"),
        ({"reuse": True}, "the projection is read elsewhere too"),
        ({"mid": 4}, "the middle is narrower: the product costs more"),
        ({"head_groups": 2}, "a grouped conv"),
    ],
)
def test_not_fused_when_not_exact_or_not_cheaper(kwargs, why):
    net = ready(Bottleneck(**kwargs))
    fold_batchnorm_(net)
    assert find_linear_pairs(net) == {}, why


def test_unfolded_batchnorm_blocks_fusion_and_exclude_is_honoured():
    net = ready(Bottleneck())
    assert find_linear_pairs(net) == {}  # BN still between them: not linear-only
    fold_batchnorm_(net)
    assert find_linear_pairs(net, exclude={"head"}) == {}
    assert find_linear_pairs(net, exclude={"proj"}) == {}


def test_chain_fuses_into_one_conv_and_recipe_replays_it():
    net = ready(Chain())
    ref, x = copy.deepcopy(net), x_for(net)
    pairs = fuse_linear_pairs_(net)
    assert list(pairs.items()) == [("a", "b"), ("b", "c")]
    assert net.c.weight.shape == (6, 4, 1, 1)
    torch.testing.assert_close(net(x), ref(x), rtol=0, atol=1e-10)
    recipe = recipe_of_model(net)
    assert recipe["fused_linear"] == {"a": "b", "b": "c"}
    fresh = Chain().double().eval()
    apply_recipe_(fresh, recipe)
    fresh.load_state_dict(net.state_dict())
    torch.testing.assert_close(fresh(x), ref(x), rtol=0, atol=1e-10)
    apply_recipe_(fresh, recipe)  # replayed twice: nothing changes
    torch.testing.assert_close(fresh(x), ref(x), rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "fused, message",
    [
        ({"a": "c"}, "does not read"),
        ({"a": "nope"}, "not a module"),
        ([["a", "b"]], "dict"),
    ],
)
def test_bad_fused_entries_are_refused(fused, message):
    recipe = recipe_of_model(Chain())
    recipe["fused_linear"] = fused
    with pytest.raises((ValueError, TypeError), match=message):
        check_recipe(Chain(), recipe)


def test_compress_fuses_and_counts_the_budget_from_the_original():
    net = ready(Bottleneck())
    ref, x = copy.deepcopy(net), x_for(net)
    result = compress_(net, DecoupleConfig(method="auto"), (3, 6, 6), target_flops=0.8)
    before, after = count_flops(ref, x[:1])[0], count_flops(net, x[:1])[0]
    assert after <= 0.8 * before
    head = next(r for r in result.records if r.name == "head")
    assert head.fused == {"proj": "head"}
    recipe = make_recipe(result.records)
    assert recipe["fused_linear"] == {"proj": "head"}
    fresh = Bottleneck().double().eval()
    apply_recipe_(fresh, recipe)
    fresh.load_state_dict(net.state_dict())
    torch.testing.assert_close(fresh(x), net(x), rtol=0, atol=1e-10)


def test_skip_override_keeps_the_pair_apart():
    net = ready(Bottleneck())
    config = DecoupleConfig(method="auto", overrides={"proj": "skip"})
    result = compress_(net, config, (3, 6, 6), target_flops=0.9)
    assert isinstance(net.proj, nn.Conv2d)
    assert all(r.fused is None for r in result.records)

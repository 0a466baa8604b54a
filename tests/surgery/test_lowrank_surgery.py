"""1×1 convs and linear layers in surgery: which rules reach them, the layers they become,
recipes that replay them, and what is never touched."""

import copy
import json

import pytest
import torch
from torch import nn

from decouple import DecoupleConfig, apply_recipe_, build_report, decouple_, make_recipe
from decouple.nn.lowrank import LowRankConv2d, LowRankLinear


class PointwiseNet(nn.Module):
    """A stem, a 1×1 expansion, a grouped 1×1, a 3×3 and a linear head: every kind of layer."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.expand = nn.Conv2d(16, 64, 1)
        self.grouped = nn.Conv2d(64, 32, 1, groups=2, bias=False)
        self.spatial = nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 24)

    def forward(self, x):
        x = torch.relu(self.expand(torch.relu(self.stem(x))))
        x = self.spatial(torch.relu(self.grouped(x)))
        return self.head(x.mean((2, 3)))


def net(seed=0):
    torch.manual_seed(seed)
    return PointwiseNet().double().eval()


def x(n=4):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def by_name(records):
    return {r.name: r for r in records}


def test_method_svd_factors_every_conv_and_linear_layer_but_the_stem():
    model, ref = net(), net()
    records = by_name(decouple_(model, DecoupleConfig(method="svd", rank=4, fold_bn=False)))
    assert isinstance(model.expand, LowRankConv2d) and model.expand.rank == 4
    assert isinstance(model.grouped, LowRankConv2d) and model.grouped.groups == 2
    assert isinstance(model.spatial, LowRankConv2d) and model.spatial.kernel_size == (3, 3)
    assert isinstance(model.head, LowRankLinear) and records["head"].kind == "linear"
    assert records["stem"].reason.startswith("kept: stem")
    assert records["expand"].rank_text == "4/16" and records["head"].rank_text == "4/24"
    assert 0 < records["expand"].rel_error < 1
    text = build_report(ref, model, list(records.values()), (3, 8, 8)).to_text()
    assert "32->24 linear" in text and "decoupled 4 of 5 layers" in text
    full = net()
    decouple_(full, DecoupleConfig(method="svd", rank=64, fold_bn=False))
    # full rank: the 1x1 layers would cost more than they save, so they are kept, exactly
    assert type(full.expand) is nn.Conv2d and type(full.head) is nn.Linear
    torch.testing.assert_close(full(x()), ref(x()))


def test_k_by_k_rules_leave_1x1_and_linear_layers_unless_an_override_names_them():
    model = net()
    records = by_name(decouple_(model, DecoupleConfig(rank=2, fold_bn=False)))
    assert records["expand"].reason.startswith("1x1 conv (low-rank it with --method svd")
    assert records["head"].reason.startswith("linear layer (low-rank it with --method svd")
    assert records["spatial"].method == "nd"
    model = net()
    config = DecoupleConfig(
        rank=2,
        fold_bn=False,
        overrides={"expand": 8, "head": {"energy": 0.5}, "grouped": {"method": "cp", "rank": 2}},
    )
    records = by_name(decouple_(model, config))
    assert records["expand"].method == "svd" and model.expand.rank == 8
    assert records["head"].method == "svd" and "energy 0.5" in records["head"].reason
    assert records["grouped"].action == "kept"  # CP does not apply to a 1x1 conv


def test_a_rank_that_saves_nothing_keeps_the_layer():
    model = net()
    records = by_name(
        decouple_(model, DecoupleConfig(fold_bn=False, overrides={"expand": 13, "head": 13}))
    )
    # expand 16->64: 13*(16+64) = 1040 >= 1024 weights; head 32->24: 13*56 = 728 < 768
    assert records["expand"].action == "kept" and "saves nothing" in records["expand"].reason
    assert type(model.expand) is nn.Conv2d
    assert records["head"].action == "decoupled" and isinstance(model.head, LowRankLinear)


def test_recipes_replay_low_rank_layers_and_check_their_ranks():
    model = net()
    records = decouple_(model, DecoupleConfig(method="svd", rank=3, fold_bn=False))
    recipe = json.loads(json.dumps(make_recipe(records)))
    assert recipe["layers"]["head"] == {"method": "svd", "rank": 3}
    fresh = apply_recipe_(net(seed=5), recipe)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x()), model(x()))
    bad = copy.deepcopy(recipe)
    bad["layers"]["head"]["rank"] = 25  # the head's full rank is 24
    with pytest.raises(ValueError, match="rank"):
        apply_recipe_(net(), bad)
    bad = copy.deepcopy(recipe)
    bad["layers"]["head"] = {"method": "nd", "rank": 1}
    with pytest.raises(ValueError, match="linear layer: only method svd"):
        apply_recipe_(net(), bad)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        return self.proj(self.attn(x, x, x, need_weights=False)[0])


def test_multihead_attention_is_left_alone_it_reads_its_weights_itself():
    torch.manual_seed(0)
    model = Attention().eval()
    ref = copy.deepcopy(model)
    records = decouple_(model, DecoupleConfig(method="svd", rank=4))
    assert [r.name for r in records] == ["proj"]
    assert type(model.attn.out_proj) is type(ref.attn.out_proj)
    inp = torch.randn(2, 5, 16)
    assert model(inp).shape == ref(inp).shape


def test_a_linear_subclass_with_its_own_forward_is_kept():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Conv2d(8, 8, 3), nn.Flatten(), Scaled(8, 4))
    records = decouple_(model.eval(), DecoupleConfig(method="svd", rank=2, fold_bn=False))
    assert records[-1].reason == "kept: custom forward (Scaled)"

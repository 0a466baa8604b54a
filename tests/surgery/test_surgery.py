"""Model surgery: what is decoupled, overrides, idempotence, BatchNorm folding, recipes."""

import copy
import json

import pytest
import torch
from torch import nn

from decouple import DecoupleConfig, DecoupledConv2d, apply_recipe_, decouple_, make_recipe
from decouple.surgery.bn_fold import find_conv_bn_pairs, fold_batchnorm_
from decouple.surgery.rewrite import decouple_with_fold_info


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))) + x


class Net(nn.Module):
    """Every case the walker must tell apart, in a few channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(Block(8), Block(8))
        self.point = nn.Conv2d(8, 8, 1)
        self.depth = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.tail = nn.Conv2d(8, 6, (3, 1), stride=2, padding=(1, 0))
        self.shared_bn = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = self.depth(self.point(self.blocks(x)))
        t = self.tail(x)
        y = self.shared_bn(t) + t  # tail feeds the BN and the sum: must NOT be folded
        return self.head(y.mean((2, 3)))


def trained_net(seed=0):
    torch.manual_seed(seed)
    net = Net()
    for m in net.modules():  # non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval().double()


def x_batch():
    return torch.randn(
        2, 3, 10, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )


def by_name(records):
    return {r.name: r for r in records}


def test_walker_decouples_regular_convs_only():
    net = trained_net()
    records = by_name(decouple_(net, DecoupleConfig(rank=2)))
    assert records["point"].reason.startswith("1x1 conv (low-rank it with --method svd")
    assert records["depth"].reason == "depthwise conv"
    decoupled = {n for n, r in records.items() if r.action == "decoupled"}
    assert decoupled == {"blocks.0.conv", "blocks.1.conv", "tail"}
    assert records["stem"].reason.startswith("kept: stem (3 input channels")
    assert isinstance(net.blocks[1].conv, DecoupledConv2d) and type(net.point) is nn.Conv2d
    assert records["tail"].rank == 2 and records["tail"].max_rank == 3  # (3,1) kernel: k²=3


@pytest.mark.parametrize("order", ["dw-pw", "pw-dw"])
def test_full_rank_model_is_unchanged_and_second_run_is_a_no_op(order):
    net = trained_net()
    ref = copy.deepcopy(net)
    decouple_(net, DecoupleConfig(rank=9, order=order, include_stem=True))
    assert torch.allclose(net(x_batch()), ref(x_batch()), atol=1e-10)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    structure = repr(net)
    with pytest.raises(ValueError, match=r"already decoupled \(4 factored layers, no Conv2d"):
        decouple_(net, DecoupleConfig(rank=1, order=order, include_stem=True))
    assert repr(net) == structure
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_overrides_exact_name_beats_regex_and_skip():
    net = trained_net()
    config = DecoupleConfig(
        rank=1,
        include_stem=True,
        overrides={
            r"blocks\..*": 3,
            "blocks.1.conv": {"rank": 2, "order": "pw-dw"},
            "tail": "skip",
        },
    )
    records = by_name(decouple_(net, config))
    assert records["stem"].rank == 1
    assert records["blocks.0.conv"].rank == 3 and records["blocks.0.conv"].order == "dw-pw"
    assert records["blocks.1.conv"].rank == 2 and records["blocks.1.conv"].order == "pw-dw"
    assert records["tail"].action == "kept" and records["tail"].reason == "skipped by override"


def test_per_layer_mapping_alone_and_filter_fn():
    net = trained_net()
    records = by_name(decouple_(net, DecoupleConfig(overrides={"stem": 2})))
    assert [n for n, r in records.items() if r.action == "decoupled"] == ["stem"]
    net = trained_net()
    records = by_name(
        decouple_(net, DecoupleConfig(rank=2), filter_fn=lambda m, name: name != "stem")
    )
    assert (
        records["stem"].reason == "excluded by filter_fn" and records["tail"].action == "decoupled"
    )


def test_energy_rule_picks_smallest_rank_reaching_it():
    net = trained_net()
    records = decouple_(net, DecoupleConfig(energy=0.8))
    for r in records:
        if r.action == "decoupled":
            assert r.energy >= 0.8
            assert r.rel_error == pytest.approx((1 - r.energy) ** 0.5, abs=1e-6)
    # Error falls as energy rises, layer by layer.
    hi = by_name(decouple_(trained_net(), DecoupleConfig(energy=0.99)))
    for r in records:
        if r.action == "decoupled":
            assert hi[r.name].rank >= r.rank and hi[r.name].rel_error <= r.rel_error + 1e-12


def test_bn_folding_only_where_conv_feeds_just_that_bn():
    net = trained_net()
    pairs = find_conv_bn_pairs(net)
    assert pairs == {
        "stem": "stem_bn",
        "blocks.0.conv": "blocks.0.bn",
        "blocks.1.conv": "blocks.1.bn",
    }
    ref = copy.deepcopy(net)
    result = fold_batchnorm_(net)
    assert result.error is None and result.folded == pairs
    assert isinstance(net.stem_bn, nn.Identity) and isinstance(net.shared_bn, nn.BatchNorm2d)
    assert torch.allclose(net(x_batch()), ref(x_batch()), atol=1e-10)


def test_bn_folding_reports_untraceable_models():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow defeats torch.fx
                return self.bn(self.conv(x))
            return self.conv(x)

    model = Dynamic().eval()
    records, error = decouple_with_fold_info(model, DecoupleConfig(rank=1, include_stem=True))
    assert "torch.fx" in error and isinstance(model.bn, nn.BatchNorm2d)
    assert records[0].action == "decoupled" and records[0].bn_folded is None


def test_low_rank_error_shrinks_with_rank():
    ref = trained_net()
    errors = []
    for t in (1, 2, 3, 6, 9):
        net = copy.deepcopy(ref)
        decouple_(net, DecoupleConfig(rank=t))
        with torch.no_grad():
            errors.append(float((net(x_batch()) - ref(x_batch())).norm()))
    assert errors[-1] < 1e-9 and errors[0] > 1e-3
    assert errors == sorted(errors, reverse=True)


def test_shared_conv_is_replaced_once():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(), conv)
    records = decouple_(model, DecoupleConfig(rank=2, include_stem=True))
    assert model[0] is model[2] and isinstance(model[0], DecoupledConv2d)
    assert len(records) == 1


def test_nan_weights_are_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    model[0].weight.data[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        decouple_(model, DecoupleConfig(rank=1, include_stem=True))


@pytest.mark.parametrize("fold_bn", [False, True])
def test_recipe_round_trip_through_json(fold_bn):
    net = trained_net()
    config = DecoupleConfig(
        rank=2, fold_bn=fold_bn, overrides={"tail": {"rank": 1, "order": "pw-dw"}}
    )
    records = decouple_(net, config)
    recipe = json.loads(json.dumps(make_recipe(records, config)))
    assert DecoupleConfig.from_dict(recipe["config"]) == config
    fresh = apply_recipe_(Net().double().eval(), recipe)
    fresh.load_state_dict(net.state_dict())  # strict: the structure matches exactly
    assert torch.equal(fresh(x_batch()), net(x_batch()))
    assert bool(recipe["folded_bn"]) == fold_bn
    with pytest.raises(ValueError, match="recipe"):
        apply_recipe_(Net(), {"layers": {}})

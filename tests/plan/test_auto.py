"""One planner over every method (``method="auto"``), the output-weighted loss, and the split of
calibration images into the ones that decide and the ones that measure."""

from __future__ import annotations

import pytest
import torch
from planted import planted_cp
from torch import nn
from toys import images, toy

from decouple import DecoupleConfig, count_flops
from decouple.calibrate.stream import Split
from decouple.nn.decoupled import DecoupledConv2d
from decouple.nn.factorized import CPConv2d
from decouple.pipeline import compress_
from decouple.plan.allocate import Option, allocate
from decouple.plan.flops_budget import plan_ranks
from decouple.plan.losses import noise_sensitivity, output_sensitivity
from decouple.plan.options import AUTO_KINDS, allocated_config, rank_options
from decouple.surgery.methods import FactorCache, layer_method
from decouple.surgery.rewrite import decouple_


def test_auto_prices_every_method_for_every_layer():
    options, *_ = rank_options(toy(), DecoupleConfig(method="auto"), (3, 8, 8))
    for name, opts in options.items():
        kinds = {(o.method, o.order) for o in opts if o.rank}
        # k×k convs in every method; the linear head in the one that applies to it
        assert kinds == ({("svd", "")} if name == "head" else set(AUTO_KINDS)), name
        assert [o.rank for o in opts].count(0) == 1  # one "keep", priced at the conv's FLOPs
        assert all(o.loss >= 0 for o in opts)


class CPNet(nn.Module):
    """Two convs: ``a`` holds a planted CP-rank-2 kernel, ``b`` a random one."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(planted_cp((8, 8, 3, 3), 1, 2).float())

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_auto_finds_the_method_that_fits_a_planted_kernel():
    """A CP-rank-2 kernel is exact as CP R=2, far cheaper than any exact network decoupling:
    under a tight budget the planner picks CP for it, and says which method lost."""
    torch.manual_seed(0)
    model = CPNet().eval()
    plan = plan_ranks(model, DecoupleConfig(method="auto"), (8, 6, 6), 0.6, cache=FactorCache())
    a = plan.choice["a"]
    assert a.method == "cp" and a.rank >= 2 and a.loss < 1e-8
    assert "best other method at no more cost" in plan.reasons["a"]
    assert plan.total_flops <= plan.target_flops


def test_auto_plan_applies_the_method_chosen_per_layer():
    model, ref = toy(), toy()
    result = compress_(model, DecoupleConfig(method="auto", fold_bn=True), (3, 8, 8), 0.6)
    plan = result.allocation
    x = torch.zeros(1, 3, 8, 8, dtype=torch.float64)
    assert count_flops(model, x)[0] <= plan.target_flops
    for name, o in plan.choice.items():
        layer = model.get_submodule(name)
        if o.rank == 0:
            assert type(layer) in (nn.Conv2d, nn.Linear)
            continue
        assert layer_method(layer) == o.method
        if o.method == "nd":
            assert isinstance(layer, DecoupledConv2d) and layer.order == o.order
    assert result.extra()["allocation"]["methods"] == plan.methods()
    assert model(images(4)).shape == ref(images(4)).shape


def test_allocated_config_resolves_auto_to_each_layers_method():
    config = DecoupleConfig(method="auto", overrides={"conv3": "skip"})
    choice = {
        "conv1": Option(2, 1, 0.1, "cp", ""),
        "conv2": Option(3, 1, 0.1, "nd", "pw-dw"),
        "conv3": Option(0, 1, 0.0, "", ""),
    }
    out = allocated_config(config, choice)
    assert out.method == "nd" and out.rank is None
    assert out.resolve("conv1").method == "cp" and out.resolve("conv1").rank == 2
    assert out.resolve("conv2").order == "pw-dw" and out.resolve("conv2").rank == 3
    assert out.resolve("conv3").skip
    records = decouple_(toy(), out)
    assert {r.name: r.method for r in records if r.action == "decoupled"} == {
        "conv1": "cp",
        "conv2": "nd",
    }
    assert isinstance(toy().conv1, nn.Conv2d)


def test_allocation_is_greedy_across_methods():
    """Two methods on one layer: the allocator takes the one with the better loss per cost."""
    options = {
        "x": [
            Option(0, 100, 0.0, "", ""),
            Option(1, 40, 0.5, "nd", "dw-pw"),
            Option(2, 40, 0.1, "cp", ""),
        ]
    }
    plan = allocate(options, 0, 50)
    assert plan.choice["x"].method == "cp" and plan.methods() == {"x": "cp R=2"}
    assert plan.loss == pytest.approx(0.1)


def test_output_sensitivity_sees_what_reaches_the_output():
    """A branch multiplied by zero downstream has no effect; the last conv has the most."""

    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.dead = nn.Conv2d(4, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return (self.b(h) + 0.0 * self.dead(h)).mean((2, 3))

    torch.manual_seed(0)
    model = Branches().double().eval()
    s = output_sensitivity(model, ["a", "dead", "b"], images(32))
    assert s["dead"] == 0.0
    assert s["a"] > 0 and s["b"] > 0
    again = output_sensitivity(model, ["a", "dead", "b"], images(32))
    assert again == s  # seeded


def test_output_criterion_scales_the_data_losses():
    model, calib = toy(), images(64)
    config = DecoupleConfig()
    data, *_ = rank_options(model, config, (3, 8, 8), "data", calib)
    out, *_ = rank_options(model, config, (3, 8, 8), "output", calib)
    s = output_sensitivity(model, list(data), calib)
    for name in data:
        for d, o in zip(data[name], out[name], strict=True):
            assert (d.rank, d.cost) == (o.rank, o.cost)
            assert o.loss == pytest.approx(d.loss * s[name])


@pytest.mark.parametrize("source", ["tensor", "batches"])
def test_split_parts_are_disjoint_and_cover_the_source(source):
    x = torch.arange(30, dtype=torch.float64).view(30, 1, 1, 1)
    data = x if source == "tensor" else [(x[i : i + 7], None) for i in range(0, 30, 7)]
    decide = torch.cat(list(Split(data, "decide"))).flatten().tolist()
    measure = torch.cat(list(Split(data, "measure"))).flatten().tolist()
    assert measure == [i for i in range(30) if i % 4 == 3]
    assert sorted(decide + measure) == list(range(30)) and not set(decide) & set(measure)
    assert list(map(torch.Tensor.tolist, Split(data, "measure"))) == list(
        map(torch.Tensor.tolist, Split(data, "measure"))
    )  # the same on every pass
    assert Split(data, "decide").count() == len(decide)
    with pytest.raises(ValueError, match="part must be one of decide, measure"):
        Split(data, "both")


def test_auto_needs_a_budget():
    with pytest.raises(ValueError, match="'auto' chooses each layer's method"):
        DecoupleConfig(method="auto", rank=2)


def test_cp_layers_of_an_auto_plan_are_cp():
    torch.manual_seed(0)
    model = CPNet().eval()
    compress_(model, DecoupleConfig(method="auto"), (8, 6, 6), 0.6)
    assert isinstance(model.a, CPConv2d)


def test_max_change_keeps_the_cheapest_plan_within_reach():
    from decouple.agreement import compress_within_change_

    model, calib = toy(), images(64)
    ref = toy()
    result, search = compress_within_change_(
        model, DecoupleConfig(fold_bn=True), (3, 8, 8), 20.0, calib, steps=3
    )
    assert search.measured_on == 16 and search.decided_on == 48
    assert 1 <= len(search.tries) <= 4
    within = [t for t in search.tries if t["within"]]
    if result is None:
        assert not within
        return
    assert search.changed_pct <= 20.0
    assert search.cost_ratio == pytest.approx(min(t["cost_ratio"] for t in within), abs=1e-4)
    x = torch.zeros(1, 3, 8, 8, dtype=torch.float64)
    assert count_flops(model, x)[0] / count_flops(ref, x)[0] == pytest.approx(search.cost_ratio)
    assert search.to_dict()["agreement_pct"] == pytest.approx(100 - search.changed_pct)


def test_max_change_leaves_the_model_alone_when_no_plan_is_within_reach(monkeypatch):
    """Every plan is made to change every prediction (a compress_ that scrambles the model)."""
    from decouple import agreement

    def scramble(model, *args, **kwargs):
        with torch.no_grad():
            model.head.weight.neg_()
            model.head.bias.add_(100 * torch.arange(5, dtype=torch.float64).flip(0))
        return None

    monkeypatch.setattr(agreement, "compress_", scramble)
    model, calib = toy(), images(64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result, search = agreement.compress_within_change_(
        model, DecoupleConfig(), (3, 8, 8), 1.0, calib, steps=2
    )
    assert result is None and not search.reached and search.budget is None
    assert len(search.tries) == 3 and not any(t["within"] for t in search.tries)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match=r"percentage in \[0, 100\)"):
        agreement.compress_within_change_(model, DecoupleConfig(), (3, 8, 8), 100, calib)


def test_max_change_with_closest_keeps_the_plan_that_changed_the_fewest(monkeypatch):
    """``closest=True`` (the CLI's --allow-miss): no plan within reach, the closest one kept."""
    from decouple import agreement

    def scramble(model, *args, target_flops=None, **kwargs):
        with torch.no_grad():  # the larger the budget, the fewer predictions change
            model.head.bias.add_(100 * (1 - target_flops) * torch.arange(5.0).double().flip(0))
        return "a result"

    monkeypatch.setattr(agreement, "compress_", scramble)
    model, calib = toy(), images(64)
    result, search = agreement.compress_within_change_(
        model, DecoupleConfig(), (3, 8, 8), 0.0, calib, steps=2, closest=True
    )
    changed = [t["changed_pct"] for t in search.tries]
    assert result == "a result" and search.missed and not search.reached
    assert min(changed) > 0 and search.changed_pct == min(changed)
    assert search.to_dict()["reached"] is False


def test_an_unreachable_flops_target_raises_with_the_model_as_it_was():
    from decouple.pipeline import TargetMissed

    model = toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TargetMissed, match=r"target_flops=0.01 is out of reach: the cheapest plan "
                       r"keeps \d+\.\d % of the FLOPs; its predicted loss") as e:  # fmt: skip
        compress_(model, DecoupleConfig(method="auto"), (3, 8, 8), 0.01, allow_miss=False)
    assert isinstance(e.value, ValueError)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    result = compress_(model, DecoupleConfig(method="auto"), (3, 8, 8), 0.01)  # the default
    assert result.extra()["allocation"]["reached"] is False


def test_jacobian_sensitivity_matches_perturbing_one_layer_at_a_time():
    """The backward-pass estimate and the noise one measure the same first-order factor."""
    torch.manual_seed(0)
    model = toy().eval()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    calib = images(256)
    fast = output_sensitivity(model, names, calib)
    slow = noise_sensitivity(model, names, calib, noise=0.01)
    for n in names:
        assert fast[n] == pytest.approx(slow[n], rel=0.25), n
    assert fast == output_sensitivity(model, names, calib)  # seeded


def test_a_model_without_gradients_falls_back_to_perturbation():
    class NoGrad(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            with torch.no_grad():
                return self.a(x).mean((2, 3))

    model = NoGrad().double().eval()
    calib = images(16)
    assert output_sensitivity(model, ["a"], calib) == noise_sensitivity(model, ["a"], calib)


def test_moments_priced_a_few_layers_at_a_time_give_the_same_options(monkeypatch):
    """The planner holds the moments of a chunk of layers at once; however small the chunks,
    the options (and so the plan) are those of holding them all."""
    from decouple.plan import options as opts_module

    x = images(32)
    config = DecoupleConfig(method="auto")
    whole, *_ = rank_options(toy(), config, (3, 8, 8), "data", x)
    assert len(opts_module.moment_chunks(toy(), list(whole), budget=1)) == len(whole)
    monkeypatch.setattr(opts_module, "moment_chunks", lambda m, n, budget=1: [[name] for name in n])
    alone, *_ = rank_options(toy(), config, (3, 8, 8), "data", x)
    assert whole.keys() == alone.keys()
    for name in whole:
        assert [(o.rank, o.method, o.order) for o in whole[name]] == [
            (o.rank, o.method, o.order) for o in alone[name]
        ]
        for a, b in zip(whole[name], alone[name], strict=True):
            assert a.loss == pytest.approx(b.loss, rel=1e-9, abs=1e-15)

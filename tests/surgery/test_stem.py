"""The stem policy (a conv reading <= 4 channels is kept by default), the fold_bn default, and
``decouple_`` refusing a model that is already decoupled."""

import copy

import pytest
import torch
from torch import nn

from decouple.nn.decoupled import DecoupledConv2d
from decouple.plan.flops_budget import plan_ranks
from decouple.surgery.config import STEM_MAX_CHANNELS, DecoupleConfig
from decouple.surgery.rewrite import decouplable_convs, decouple_


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 7, padding=3), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
    ).eval()


def by_name(records):
    return {r.name: r for r in records}


def test_the_stem_is_kept_by_default_and_says_how_to_include_it():
    model = net()
    records = by_name(decouple_(model, DecoupleConfig(rank=2)))
    assert records["0"].action == "kept" and type(model[0]) is nn.Conv2d
    assert records["0"].reason == "kept: stem (3 input channels; --include-stem to decouple it)"
    assert records["2"].action == "decoupled"
    assert STEM_MAX_CHANNELS == 4
    wider = nn.Sequential(nn.Conv2d(5, 8, 3))  # more than 4 input channels: not a stem
    assert decouple_(wider, DecoupleConfig(rank=2))[0].action == "decoupled"


def test_include_stem_or_an_override_decouples_it():
    model = net()
    records = by_name(decouple_(model, DecoupleConfig(rank=2, include_stem=True)))
    assert records["0"].action == "decoupled" and records["0"].rank == 2
    for override in ({"0": 3}, {"0": {"method": "tucker"}}, {r"\d": {"rank": 3}}):
        model = net()
        records = by_name(decouple_(model, DecoupleConfig(rank=2, overrides=override)))
        assert records["0"].action == "decoupled", override
    model = net()
    records = by_name(decouple_(model, DecoupleConfig(rank=2, overrides={"0": "skip"})))
    assert records["0"].reason == "skipped by override"


def test_budgets_leave_the_stem_out_unless_included():
    assert decouplable_convs(net(), DecoupleConfig()) == ["2"]
    assert decouplable_convs(net(), DecoupleConfig(include_stem=True)) == ["0", "2"]
    plan = plan_ranks(net(), DecoupleConfig(), (3, 8, 8), 0.6, "energy")
    assert set(plan.choice) == {"2"}


def test_include_stem_and_fold_bn_defaults_round_trip():
    c = DecoupleConfig(rank=2)
    assert c.fold_bn is True and c.include_stem is False
    d = DecoupleConfig(rank=2, include_stem=True, fold_bn=False)
    assert DecoupleConfig.from_json(d.to_json()) == d
    assert d.to_dict()["include_stem"] is True and d.to_dict()["fold_bn"] is False
    with pytest.raises(TypeError, match="include_stem"):
        DecoupleConfig(rank=2, include_stem="yes")


def test_fold_bn_is_on_by_default_and_needs_eval_mode():
    model = nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)).eval()
    records = decouple_(model, DecoupleConfig(rank=2))
    assert records[0].bn_folded == "1" and isinstance(model[1], nn.Identity)
    with pytest.raises(ValueError, match="training mode"):
        decouple_(nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)), DecoupleConfig(rank=2))


def test_an_already_decoupled_model_is_refused():
    model = net()
    decouple_(model, DecoupleConfig(rank=2))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError) as info:
        decouple_(model, DecoupleConfig(rank=1))
    assert str(info.value) == (
        "the model is already decoupled (1 factored layers, no Conv2d left to decouple); "
        "decouple the original model"
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Including the stem leaves a plain conv to change: only it is decoupled.
    layer = model[2]
    records = by_name(decouple_(model, DecoupleConfig(rank=1, include_stem=True)))
    assert records["0"].action == "decoupled" and records["2"].reason == "already decoupled"
    assert model[2] is layer and isinstance(model[0], DecoupledConv2d)

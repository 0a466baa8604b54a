"""CP and Tucker through the whole product: surgery, recipes, budgets, calibration, CLI."""

import copy
import json

import pytest
import torch
from planted import planted_cp, planted_tucker
from torch import nn
from toys import images, toy

from decouple import (
    DecoupleConfig,
    apply_recipe_,
    build_report,
    count_flops,
    decouple_,
    make_recipe,
)
from decouple.calibrate.layerwise import calibrate_
from decouple.cli.run import main
from decouple.nn.factorized import CPConv2d, TuckerConv2d
from decouple.pipeline import compress_
from decouple.surgery.methods import FactorCache

LAYER = {"cp": CPConv2d, "tucker": TuckerConv2d}


@pytest.mark.parametrize("method", ["cp", "tucker"])
def test_surgery_idempotent_and_recipe_round_trip(method):
    net, x = toy(), images(8)
    records = decouple_(net, DecoupleConfig(rank=3, method=method, include_stem=True))
    assert [type(m) for m in (net.conv1, net.conv2, net.conv3)] == [LAYER[method]] * 3
    convs = [r for r in records if r.kind == "conv"]  # the linear head is kept: not this method's
    assert all(r.method == method and r.rel_error is not None for r in convs)
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match=r"already decoupled \(3 factored layers, no Conv2d"):
        decouple_(net, DecoupleConfig(rank=2, method=method))  # the core conv is not re-cut
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    recipe = json.loads(json.dumps(make_recipe(records)))
    fresh = apply_recipe_(toy(seed=1), recipe)
    fresh.load_state_dict(net.state_dict())
    assert torch.equal(fresh(x), net(x))


def test_per_layer_method_override_and_report():
    net, ref = toy(), toy()
    config = DecoupleConfig(
        rank=2,
        overrides={"conv2": {"method": "tucker", "rank": 4}, "conv3": {"method": "cp"}},
        include_stem=True,
    )
    records = decouple_(net, config)
    assert [r.method for r in records] == ["nd", "tucker", "cp", None]  # the linear head kept
    assert records[-1].reason.startswith("linear layer (low-rank it with --method svd")
    assert isinstance(net.conv2, TuckerConv2d) and net.conv2.ranks == (4, 4)
    text = build_report(ref, net, records, (3, 8, 8)).to_text()
    assert "nd dw-pw" in text and "tucker" in text and "R=2" in text


def test_config_validates_and_round_trips():
    c = DecoupleConfig(
        rank=3, method="tucker", seed=7, cp_max_iter=50, overrides={"a": {"method": "cp"}}
    )
    assert DecoupleConfig.from_json(c.to_json()) == c
    with pytest.raises(
        ValueError, match="method must be one of nd, cp, tucker, svd or auto; got 'lowrank'"
    ):
        DecoupleConfig(rank=2, method="lowrank")
    with pytest.raises(ValueError, match="'auto' chooses each layer's method"):
        DecoupleConfig(rank=2, method="auto")
    assert DecoupleConfig(method="auto").method == "auto"
    with pytest.raises(ValueError, match="CP takes a rank"):
        DecoupleConfig(energy=0.9, method="cp")
    with pytest.raises(ValueError, match="cp_max_iter"):
        DecoupleConfig(rank=2, cp_max_iter=0)


def test_tucker_full_rank_in_a_network_is_exact_and_calibration_keeps_it():
    net, x = toy(), images(32)
    ref = copy.deepcopy(net)
    decouple_(net, DecoupleConfig(rank=64, method="tucker", fold_bn=False, include_stem=True))
    assert torch.allclose(net(x), ref(x), atol=1e-10)
    records = calibrate_(net, ref, x)
    assert all(r.error_after < 1e-6 for r in records)
    assert torch.allclose(net(x), ref(x), atol=1e-8)


@pytest.mark.parametrize("method", ["cp", "tucker"])
def test_refit_of_last_1x1_recovers_a_corrupted_layer(method):
    """A conv that is exactly low rank: its factored layer with a corrupted last 1×1 conv is
    brought back by the refit (the head is right, so the closed form is exact)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=1).double()
    planted = (
        planted_tucker((8, 6, 3, 3), 1, (3, 3))
        if method == "tucker"
        else planted_cp((8, 6, 3, 3), 1, 3)
    )
    with torch.no_grad():
        conv.weight.copy_(planted)
    ref = nn.Sequential(conv).eval()
    model = copy.deepcopy(ref)
    decouple_(model, DecoupleConfig(rank=3, method=method, cp_max_iter=1000))
    with torch.no_grad():
        model[0].pointwise_out.weight.mul_(1.5).add_(0.1)
        model[0].bias.add_(0.3)
    x = torch.randn(48, 6, 7, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        assert float((model(x) - ref(x)).norm() / ref(x).norm()) > 0.2
        (rec,) = calibrate_(model, ref, x, mode="last", ridge=1e-9)
        assert rec.error_after < 1e-4, rec
        assert float((model(x) - ref(x)).norm() / ref(x).norm()) < 1e-4


@pytest.mark.parametrize("method", ["cp", "tucker"])
@pytest.mark.parametrize("criterion", ["energy", "data"])
def test_budget_is_met_as_flop_counter_counts(method, criterion):
    net, x = toy(), images(32)
    flops0, _ = count_flops(net, x[:1])
    cache = FactorCache()
    result = compress_(
        net, DecoupleConfig(method=method, fold_bn=True), (3, 8, 8), target_flops=0.7,
        criterion=criterion, calib_images=x, cache=cache,
    )  # fmt: skip
    flops1, _ = count_flops(net, x[:1])
    assert flops1 == result.allocation.total_flops <= 0.7 * flops0
    assert any(isinstance(m, LAYER[method]) for m in net.modules())
    assert len(cache) > 0 and result.calibration


def test_cli_method_flags(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outputs go to the current folder
    model = tmp_path / "toy.pt"
    torch.save(toy().float().state_dict(), model)
    arch = ["--arch", "toys:ToyNet", "--input-shape", "3,8,8"]
    assert main([str(model), *arch, "--method", "tucker", "--rank", "3"]) == 0
    out = capsys.readouterr().out
    assert "tucker" in out and "3x3/" in out
    recipe = json.loads((tmp_path / "toy.decoupled.recipe.json").read_text())
    assert {v["method"] for v in recipe["layers"].values()} == {"tucker"}
    for bad, message in (
        (["--method", "cp", "--energy", "0.9"], "CP takes a rank"),
        (["--method", "cp", "--rank", "2", "--order", "pw-dw"], "--order applies to --method nd"),
        (["--method", "lowrank", "--rank", "2"], "invalid choice"),
        (["--method", "svd", "--rank", "2", "--order", "pw-dw"], "--order applies to --method nd"),
    ):
        assert main([str(model), *arch, "--out", str(tmp_path / "x.pt"), *bad]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err

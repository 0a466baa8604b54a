"""Pruning in the planner: offered with calibration only, chosen where it is exact, refit by
calibration, and the pruned model saved and reloaded whole."""

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

from decouple import DecoupleConfig
from decouple.io.checkpoint import load_decoupled
from decouple.io.save import save_decoupled
from decouple.nn.flops import count_flops
from decouple.pipeline import compress_
from decouple.plan import latency_budget
from decouple.plan.allocate import Option, allocate
from decouple.plan.prune_options import ChainUnit, candidate_widths
from decouple.report import build_report
from decouple.runtime.latency import LatencyConfig
from decouple.surgery.chains import Chain


class Head(nn.Module):
    """stem → conv (16 channels, only ``useful`` of which the classifier reads) → pool → fc."""

    def __init__(self, useful=4):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)
        with torch.no_grad():
            self.fc.weight[:, useful:] = 0

    def forward(self, x):
        h = self.pool(torch.relu(self.conv(torch.relu(self.stem(x)))))
        return self.fc(torch.flatten(h, 1))


def images(n, seed=0):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def head():
    torch.manual_seed(0)
    return Head().eval()


def test_a_chain_whose_dropped_channels_are_unread_is_pruned_exactly(tmp_path):
    model, original = head(), head()
    x = images(8, seed=5)
    result = compress_(model, DecoupleConfig(method="auto"), (3, 8, 8), target_flops=0.5,
                       criterion="output", calib_images=images(256))  # fmt: skip
    assert "conv" in result.allocation.pruned
    chain, keep = result.allocation.pruned["conv"]
    assert chain.consumer == "fc" and set(range(4)) <= set(keep)
    assert model.conv.out_channels == len(keep) == model.fc.in_features
    f0, f1 = count_flops(original, x[:1])[0], count_flops(model, x[:1])[0]
    assert f1 <= 0.5 * f0
    assert torch.allclose(model(x), original(x), atol=1e-4)
    rec = {r.name: r for r in result.records}
    assert rec["conv"].action == "pruned" and rec["conv"].rank == len(keep)
    assert "refit on the" in rec["fc"].reason
    refits = {c.name: c for c in result.calibration}
    assert "fc" in refits  # calibration refit the consumer, and the producer, which was exact
    # the producer keeps the original's channels as they were: exact, whatever the moments say
    h = torch.relu(original.stem(x))
    assert torch.allclose(model.conv(h), original.conv(h)[:, keep], atol=1e-6)
    # errors read from float32 moments (‖y‖² − 2⟨y, ŷ⟩ + ‖ŷ‖²) bottom out near √eps32 ≈ 3e-4
    assert refits["conv"].error_before < 1e-3 and refits["conv"].error_after < 1e-3
    path = tmp_path / "head.pt"
    save_decoupled(model, path, result.records, DecoupleConfig(method="auto"))
    fresh = load_decoupled(Head(), path)
    assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("how", ["data-free", "no refit"])
def test_no_pruning_without_a_refit_to_follow(how):
    model = head()
    kw = {} if how == "data-free" else {"calib_images": images(64), "refit": "none",
                                         "criterion": "output"}  # fmt: skip
    result = compress_(model, DecoupleConfig(method="auto"), (3, 8, 8), target_flops=0.6, **kw)
    assert result.allocation.pruned == {}
    assert model.conv.out_channels == 16


def test_overrides_keep_a_chain_out_of_pruning():
    model = head()
    config = DecoupleConfig(method="auto", overrides={"fc": "skip"})
    result = compress_(model, config, (3, 8, 8), target_flops=0.6, criterion="output",
                       calib_images=images(64))  # fmt: skip
    assert result.allocation.pruned == {}


def test_the_allocator_prunes_or_factors_a_chain_never_both():
    chain = Chain("p", (), "q", 8)
    options = {
        "p": [Option(0, 100, 0.0, "", ""), Option(2, 40, 0.5, "svd", "")],
        "q": [Option(0, 20, 0.0, "", ""), Option(1, 8, 0.3, "svd", "")],
        "r": [Option(0, 50, 0.0, "", ""), Option(3, 20, 0.01, "svd", "")],
    }
    unit = ChainUnit(chain, [Option(2, 30, 0.05, "prune", "")], [5, 1, 0, 2, 3, 4, 6, 7], 120)
    plan = allocate(options, 0, 90, units=[unit])
    assert plan.choice["p"].method == "prune" and plan.choice["q"].rank == 0
    assert plan.pruned["p"] == (chain, [1, 5])
    assert plan.total_flops == 30 + 0 + 50 <= 90  # the consumer costs nothing apart; r kept
    assert plan.methods()["p"] == "prune k=2"
    plain = allocate(options, 0, 90)  # without the unit: the pair's own options
    assert plain.pruned == {} and plain.total_flops <= 90


def test_candidate_widths_stay_under_the_saving_floor():
    assert candidate_widths(10, 0.9) == list(range(1, 10))
    big = candidate_widths(1000, 0.9)
    assert big[-1] == 900 and len(big) <= 50 and big == sorted(set(big))
    assert candidate_widths(1, 0.9) == []
    assert candidate_widths(20, 0.9, 8) == [8, 16]  # --rank-multiple 8: whole blocks only
    aligned = candidate_widths(1000, 0.9, 8)
    assert aligned[-1] == 896 and all(k % 8 == 0 for k in aligned) and len(aligned) <= 50
    assert candidate_widths(10, 0.9, 16) == []


def test_compress_is_deterministic_with_pruning():
    a, b = head(), head()
    for m in (a, b):
        compress_(m, DecoupleConfig(method="auto"), (3, 8, 8), target_flops=0.5,
                  criterion="output", calib_images=images(128))  # fmt: skip
    x = images(4, seed=9)
    assert torch.equal(a(x), b(x))
    assert copy.deepcopy(a).conv.out_channels == a.conv.out_channels


def _priced_by_weights(clock, factored: float = 1.0):
    """A conv or linear layer costs 0.1 µs per weight, a factored layer ``factored`` times that;
    everything else nothing."""

    def cost(m):
        weights = 1e-4 * sum(p.numel() for p in m.parameters())
        if type(m).__module__.startswith("decouple.nn"):
            return factored * weights
        return weights if isinstance(m, (nn.Conv2d, nn.Linear)) else 0.0

    clock.cost = cost


def test_a_latency_budget_prunes_a_chain_priced_by_its_time(fake_clock):
    """Time follows the weights: dropping the 12 channels the classifier never reads runs in
    under 0.6 of the time, exactly; the planner prices the widths by timing them and prunes."""
    _priced_by_weights(fake_clock)
    model, original = head(), head()
    x = images(8, seed=5)
    quick = LatencyConfig(min_run_time=0.001, layer_min_run_time=0.001, layer_rounds=1,
                          layer_table="measured")  # fmt: skip
    result = compress_(model, DecoupleConfig(method="auto"), (3, 8, 8), target_latency=0.6,
                       latency=quick, criterion="output", calib_images=images(256))  # fmt: skip
    plan = result.latency_plan
    assert "conv" in plan.allocation.pruned and plan.to_dict()["reached"]
    assert plan.allocation.choice["conv"].method == "prune" and "conv" not in plan.realizations
    chain, keep = plan.allocation.pruned["conv"]
    assert set(range(4)) <= set(keep) and model.conv.out_channels == len(keep) < 16
    assert model.fc.in_features == len(keep)
    assert torch.allclose(model(x), original(x), atol=1e-4)
    no_prune = compress_(head(), DecoupleConfig(method="auto"), (3, 8, 8), target_latency=0.6,
                         latency=quick, criterion="output", calib_images=images(256),
                         prune=False)  # fmt: skip
    assert no_prune.latency_plan.allocation.pruned == {}
    text = build_report(original, model, result.records, (3, 8, 8), extra=result.extra()).to_text()
    assert "latency budget:" in text and "(reached)" in text and "in multiples of" not in text


def test_a_missed_latency_budget_that_only_pruned_says_what_it_kept(fake_clock):
    """Out of reach (the stem alone takes more than the target): the fastest plan is kept, and
    it pruned (factored layers are slow here), so the report must not say that nothing changed."""
    _priced_by_weights(fake_clock, factored=100.0)
    model, original = head(), head()
    quick = LatencyConfig(min_run_time=0.001, layer_min_run_time=0.001, layer_rounds=1,
                          layer_table="measured")  # fmt: skip
    result = compress_(model, DecoupleConfig(method="auto"), (3, 8, 8), target_latency=0.1,
                       latency=quick, criterion="output", calib_images=images(256))  # fmt: skip
    assert result.latency_plan.allocation.pruned and not result.latency_plan.to_dict()["reached"]
    text = build_report(original, model, result.records, (3, 8, 8), extra=result.extra()).to_text()
    assert "NOT reached; the fastest plan kept" in text and "nothing changed" not in text


def test_onnx_runtime_plans_offer_ranks_in_whole_blocks(monkeypatch):
    monkeypatch.setattr(latency_budget, "block_size", lambda: 16)
    config = DecoupleConfig(method="auto")
    assert latency_budget.aligned(config, "eager") is config
    assert latency_budget.aligned(config, "onnxruntime").rank_multiple == 16
    assert (
        latency_budget.aligned(replace(config, rank_multiple=24), "onnxruntime").rank_multiple == 48
    )

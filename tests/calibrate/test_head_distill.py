"""Head distillation: the cut network is the same network, tuning lowers the held-out loss and
touches nothing before the cut, an exact head is left bit for bit, and compress_ says what it did."""

import copy

import pytest
import torch
from torch import nn

from decouple import DecoupleConfig
from decouple.calibrate.head_distill import distill_head_, head_graph, head_line
from decouple.calibrate.stream import _capture
from decouple.pipeline import compress_
from decouple.report import build_report


class Head(nn.Module):
    """stem → conv → ReLU → pool → fc: a head (conv on) that reads only its own input."""

    def __init__(self, width=16, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, width, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        h = self.pool(torch.relu(self.conv(torch.relu(self.stem(x)))))
        return self.fc(torch.flatten(h, 1))


class Skip(nn.Module):
    """conv1 → ReLU → conv2, plus the block's input: a cut at conv2 misses the skip path."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x))) + x


class Features(nn.Module):
    """A head whose output is a feature map, not class logits."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv(torch.relu(self.stem(x)))


def images(n, seed=0):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def model_and_damaged(seed=0, noise=0.5):
    torch.manual_seed(seed)
    reference = Head().eval()
    model = copy.deepcopy(reference)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a head that calibration left far from the original
        for p in (model.conv.weight, model.fc.weight):
            p.add_(noise * p.abs().mean() * torch.randn(p.shape, generator=g))
    return model, reference


def test_the_cut_head_computes_what_the_network_does_and_shares_its_layers():
    model = Head().eval()
    x = images(4)
    for start in ("conv", "stem"):
        head = head_graph(model, start)
        a = _capture(model.get_submodule(start), lambda: model(x), "input")
        assert torch.equal(head(a), model(x))
    head = head_graph(model, "conv")
    assert {n.target for n in head.graph.nodes if n.op == "call_module"} == {"conv", "pool", "fc"}
    assert head.get_submodule("fc") is model.fc  # tuning the head tunes the model


def test_no_head_where_a_later_value_reads_something_from_before_the_cut():
    assert head_graph(Skip().eval(), "conv2") is None
    assert head_graph(Skip().eval(), "conv1") is not None  # the skip reads the cut itself
    assert head_graph(Head().eval(), "nothing") is None


def test_tuning_lowers_the_held_out_loss_and_leaves_the_layers_before_the_cut_alone():
    model, reference = model_and_damaged()
    stem = copy.deepcopy(model.stem.state_dict())
    done = distill_head_(model, reference, images(512), ["conv"], steps=300, lr=1e-2)
    assert done.start == "conv" and done.layers == ["conv", "fc"]  # those with parameters
    assert done.loss == "kl" and done.images == 448 and done.held_out == 64
    assert done.best_step > 0 and done.loss_after < 0.5 * done.loss_before
    assert done.agreement_after >= done.agreement_before
    assert all(torch.equal(v, model.stem.state_dict()[k]) for k, v in stem.items())
    assert "held-out loss" in head_line(done.to_dict())
    # the kept step is the one measured: the held-out loss read again from the model agrees
    again = distill_head_(model, reference, images(512), ["conv"], steps=0)
    assert again.loss_before == pytest.approx(done.loss_after, rel=1e-5)


def test_of_several_pruned_chains_the_latest_cut_is_tuned():
    model, reference = model_and_damaged()
    stem = copy.deepcopy(model.stem.state_dict())
    done = distill_head_(model, reference, images(64), ["stem", "conv"], steps=10)
    assert done.start == "conv"
    assert all(torch.equal(v, model.stem.state_dict()[k]) for k, v in stem.items())


def test_the_same_inputs_and_seed_give_the_same_weights():
    runs = []
    for _ in range(2):
        model, reference = model_and_damaged()
        distill_head_(model, reference, images(256), ["conv"], steps=100, lr=1e-2, seed=3)
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_an_exact_head_is_left_bit_for_bit():
    torch.manual_seed(0)
    model = Head().eval()
    before = copy.deepcopy(model.state_dict())
    reference = copy.deepcopy(model)
    with torch.no_grad():  # exact up to rounding: Adam's full-length steps must not wander off
        reference.fc.bias.add_(1e-6)
    done = distill_head_(model, reference, images(128), ["conv"], steps=100, lr=1e-2)
    assert done.loss_before < 1e-8 and done.skipped == "its outputs already match the original's"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_no_step_better_than_calibration_leaves_the_layers_as_they_were():
    model, reference = model_and_damaged()
    before = copy.deepcopy(model.state_dict())
    done = distill_head_(model, reference, images(256), ["conv"], steps=100, lr=1e3)
    assert done.best_step == 0 and done.loss_after == done.loss_before
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert "no step beat the calibrated layers: kept" in head_line(done.to_dict())


def test_a_feature_map_output_is_fit_by_relative_squared_error():
    torch.manual_seed(0)
    reference = Features().eval()
    model = copy.deepcopy(reference)
    with torch.no_grad():
        model.conv.weight.mul_(1.5)
    done = distill_head_(model, reference, images(256), ["conv"], steps=200, lr=1e-2)
    assert done.loss == "relative squared error" and done.agreement_before is None
    assert done.loss_after < 0.1 * done.loss_before


def test_too_few_images_or_a_structured_output_tune_nothing():
    model, reference = model_and_damaged()
    before = copy.deepcopy(model.state_dict())
    done = distill_head_(model, reference, images(8), ["conv"])
    assert done.skipped == "8 images (fewer than 16)"
    assert "none from conv" in head_line(done.to_dict())

    class Pair(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return (self.net(x),)

    done = distill_head_(model, Pair(reference).eval(), images(64), ["conv"])
    assert done.skipped == "the model's output is not one tensor"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_compress_distills_a_pruned_head_and_says_so():
    torch.manual_seed(0)
    original = Head(width=32).eval()
    calib = images(256, seed=1)
    runs = {}
    for on in (True, False):
        model = copy.deepcopy(original)
        result = compress_(model, DecoupleConfig(method="auto"), (3, 8, 8), target_flops=0.5,
                           criterion="output", calib_images=calib, distill_head=on)  # fmt: skip
        assert "conv" in result.allocation.pruned
        runs[on] = (model, result)
    model, result = runs[True]
    done = result.head_distillation
    assert done.start == "conv" and done.loss_after <= done.loss_before
    assert runs[False][1].head_distillation is None
    assert torch.equal(model.stem.weight, runs[False][0].stem.weight)
    x = images(64, seed=2)
    extra = result.extra()
    assert extra["head_distillation"]["layers"] == ["conv", "fc"]
    text = build_report(original, model, result.records, (3, 8, 8), extra=extra).to_text()
    assert "head distillation: 2 layers from conv on" in text
    assert model(x).shape == original(x).shape

"""Nothing half-done: an in-place verb that fails leaves the model exactly as it was.

Each case builds a tiny model, takes its fingerprint (every tensor's bits and identity, every
module's identity, type and mode, and its output), makes a call that fails, and checks the
documented exception and that the fingerprint did not move. Then nothing lost: convs with their
own forward are kept, ``requires_grad`` carries over, models without a Conv2d are refused.
"""

from __future__ import annotations

import copy
import json
from itertools import chain

import pytest
import torch
from torch import nn
from toys import images, toy

import decouple.calibrate.layerwise as layerwise
from decouple import DecoupleConfig, DecoupledConv2d, apply_recipe_, decouple_, make_recipe
from decouple.calibrate.layerwise import calibrate_
from decouple.nn.factorized import CPConv2d, TuckerConv2d
from decouple.nn.transaction import transaction
from decouple.pipeline import compress_
from decouple.surgery import methods, recipe
from decouple.surgery.bn_fold import fold_batchnorm_


def _bits(t: torch.Tensor):
    if t.is_meta:
        return None
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).clone()


def fingerprint(model: nn.Module) -> dict:
    """What must not move: module identities/types/modes, tensor identities and bits, output."""
    modules = [
        (name, id(m), type(m), m.training)
        for name, m in model.named_modules(remove_duplicate=False)
    ]
    tensors = {
        name: (id(t), t.dtype, tuple(t.shape), t.device, t.requires_grad, _bits(t))
        for name, t in chain(
            model.named_parameters(remove_duplicate=False),
            model.named_buffers(remove_duplicate=False),
        )
    }
    state = {k: _bits(v) for k, v in model.state_dict().items()}
    x = images(4).to(next(model.parameters()).device)
    with torch.no_grad():  # on a copy: a train-mode forward would move the BN statistics
        out = copy.deepcopy(model)(x)
    return {"modules": modules, "tensors": tensors, "state": state, "out": out}


def assert_same(before: dict, after: dict) -> None:
    assert after["modules"] == before["modules"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, (*meta, bits) in before["tensors"].items():
        *meta2, bits2 = after["tensors"][name]
        assert meta2 == meta, name
        assert (bits is None and bits2 is None) or torch.equal(bits, bits2), name
    assert after["state"].keys() == before["state"].keys()
    for k, bits in before["state"].items():
        assert (bits is None and after["state"][k] is None) or torch.equal(bits, after["state"][k])
    a, b = before["out"], after["out"]
    assert a.shape == b.shape
    if not a.is_meta:
        assert torch.equal(_bits(a), _bits(b))


def _recipe_for(model: nn.Module) -> dict:
    done = copy.deepcopy(model)
    records = decouple_(done, DecoupleConfig(rank=2, fold_bn=True, include_stem=True))
    return json.loads(json.dumps(make_recipe(records)))


def _fail_on_call(monkeypatch, owner, attr: str, n: int = 2) -> None:
    """Make ``owner.attr`` raise on its ``n``-th call (a failure in the middle of surgery)."""
    real = getattr(owner, attr)
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, attr, flaky)


def _nan_in_last_conv(monkeypatch):
    model = toy()
    with torch.no_grad():
        model.conv3.weight[0, 0, 0, 0] = float("nan")
    return model, lambda: decouple_(model, DecoupleConfig(rank=2, fold_bn=True))


def _meta_model(monkeypatch):
    model = toy().to("meta")
    return model, lambda: decouple_(model, DecoupleConfig(rank=2))


def _unknown_layer_in_recipe(monkeypatch):
    model = toy()
    bad = _recipe_for(model)
    bad["layers"]["conv9"] = {"method": "nd", "rank": 2, "order": "dw-pw"}
    return model, lambda: apply_recipe_(model, bad)


def _rank_above_full_in_recipe(monkeypatch):
    model = toy()
    bad = _recipe_for(model)
    bad["layers"]["conv3"]["rank"] = 10**12
    return model, lambda: apply_recipe_(model, bad)


def _constructor_fails_second_time(monkeypatch):
    model = toy()
    _fail_on_call(monkeypatch, methods.DecoupledConv2d, "from_decoupling")
    return model, lambda: decouple_(model, DecoupleConfig(rank=2, fold_bn=True))


def _recipe_layer_fails_second_time(monkeypatch):
    model = toy()
    good = _recipe_for(model)
    _fail_on_call(monkeypatch, recipe, "empty_layer")
    return model, lambda: apply_recipe_(model, good)


def _fold_train_mode(monkeypatch):
    model = toy().train()
    return model, lambda: fold_batchnorm_(model)


def _decouple_fold_train_mode(monkeypatch):
    model = toy().train()
    return model, lambda: decouple_(model, DecoupleConfig(rank=2, fold_bn=True))


def _compress_calibration_fails(monkeypatch):
    model = toy()
    _fail_on_call(monkeypatch, layerwise, "release_memory")
    config = DecoupleConfig(rank=2, fold_bn=True)
    return model, lambda: compress_(model, config, (3, 8, 8), calib_images=images(16))


def _calibrate_fails_after_a_refit(monkeypatch):
    # Refits write into existing tensors in place: the undo log must copy them back.
    model = toy()
    decouple_(model, DecoupleConfig(rank=1, fold_bn=True))
    reference = toy()
    fold_batchnorm_(reference)
    _fail_on_call(monkeypatch, layerwise, "release_memory")
    return model, lambda: calibrate_(model, reference, images(16), "last")


CASES = {
    "nan-in-last-conv": (_nan_in_last_conv, ValueError, "'conv3' has NaN or Inf"),
    "meta-device": (_meta_model, ValueError, "meta device"),
    "recipe-unknown-layer": (_unknown_layer_in_recipe, ValueError, "'conv9'.*did you mean"),
    "recipe-rank-above-full": (_rank_above_full_in_recipe, ValueError, r"in \[1, 6\]"),
    "constructor-fails-2nd-call": (_constructor_fails_second_time, RuntimeError, "injected"),
    "recipe-layer-fails-2nd-call": (_recipe_layer_fails_second_time, RuntimeError, "injected"),
    "fold-bn-train-mode": (_fold_train_mode, ValueError, r"training mode.*model\.eval\(\)"),
    "decouple-fold-train-mode": (_decouple_fold_train_mode, ValueError, r"model\.eval\(\)"),
    "compress-calibration-fails": (_compress_calibration_fails, RuntimeError, "injected"),
    "calibrate-fails-after-refit": (_calibrate_fails_after_a_refit, RuntimeError, "injected"),
}


@pytest.mark.parametrize("case", CASES)
def test_failed_call_leaves_the_model_unchanged(case, monkeypatch):
    build, error, match = CASES[case]
    model, call = build(monkeypatch)
    before = fingerprint(model)
    with pytest.raises(error, match=match) as info:
        call()
    assert not getattr(info.value, "__notes__", None)  # every tensor could be restored
    assert_same(before, fingerprint(model))


def test_the_same_calls_succeed_without_the_fault():
    model = toy()
    records = decouple_(model, DecoupleConfig(rank=2, fold_bn=True, include_stem=True))
    assert [r.bn_folded for r in records] == ["bn1", "bn2", None, None]  # conv1-3, head
    assert all(isinstance(getattr(model, n), DecoupledConv2d) for n in ("conv1", "conv2", "conv3"))
    fresh = apply_recipe_(toy(), _recipe_for(toy()))
    fresh.load_state_dict(model.state_dict())


def test_transaction_restores_structure_attributes_and_saved_tensors():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).double().eval()
    before = fingerprint(model)
    with pytest.raises(KeyboardInterrupt), transaction(model, save_data=lambda m: True):
        model[0] = nn.Identity()
        with torch.no_grad():
            model[1].weight.mul_(3)  # in place: restored from the copy
        model[1].bias.data.add_(1)  # through .data (no version bump): restored all the same
        model.train()
        model.extra = nn.ReLU()
        raise KeyboardInterrupt
    assert_same(before, fingerprint(model))
    assert not hasattr(model, "extra")


def test_transaction_names_tensors_it_could_not_restore():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(RuntimeError) as info, transaction(model):
        with torch.no_grad():
            model[0].weight.zero_()  # no copy was asked for
        raise RuntimeError("boom")
    assert "0.weight" in info.value.__notes__[0]


# -- nothing lost: models decouple_ must not misread --------------------------------------------


class Doubling(nn.Conv2d):
    def forward(self, x):
        return 2 * super().forward(x)


class Masked(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, weight.tril(), bias)


class Renamed(nn.Conv2d):
    """A subclass that computes what nn.Conv2d computes."""


def test_conv_subclasses_with_their_own_forward_are_kept():
    model = nn.Sequential(Doubling(3, 4, 3), Masked(4, 4, 3), Renamed(4, 4, 3)).double()
    x = images(2)
    ref = model(x)
    records = decouple_(model, DecoupleConfig(rank=9, include_stem=True))
    assert [r.reason for r in records[:2]] == [
        "kept: custom forward (Doubling)",
        "kept: custom forward (Masked)",
    ]
    assert type(model[0]) is Doubling and type(model[1]) is Masked
    assert records[2].action == "decoupled" and isinstance(model[2], DecoupledConv2d)
    assert torch.allclose(model(x), ref, atol=1e-10)  # full rank: exact
    with pytest.raises(ValueError, match="custom forward"):
        apply_recipe_(
            nn.Sequential(Doubling(3, 4, 3)),
            {"format": "decouple-recipe", "version": 1, "layers": {"0": {"rank": 2}}},
        )


@pytest.mark.parametrize("method,rank", [("nd", 2), ("cp", 3), ("tucker", 2)])
def test_requires_grad_is_carried_over(method, rank):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, bias=False))
    model[0].weight.requires_grad_(False)  # a frozen weight with a trainable bias
    model[1].requires_grad_(False)
    decouple_(model, DecoupleConfig(rank=rank, method=method, include_stem=True))
    assert isinstance(model[0], (DecoupledConv2d, CPConv2d, TuckerConv2d))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    bias = {"0.pointwise.bias", "0.depthwise.bias", "0.pointwise_out.bias"}
    assert all(flag == (n in bias) for n, flag in flags.items()), flags


@pytest.mark.parametrize(
    "model,match",
    [
        (
            nn.Sequential(
                nn.ConvTranspose2d(3, 3, 3), nn.ConvTranspose2d(3, 3, 3), nn.Conv1d(3, 3, 3)
            ),
            r"no nn.Conv2d or nn.Linear in the model \(found ConvTranspose2d x2, Conv1d x1\)",
        ),
        (nn.Sequential(nn.Conv3d(3, 3, 3)), r"found Conv3d x1"),
        (nn.Sequential(nn.ReLU()), r"nothing to decouple: no nn.Conv2d .*no convolution"),
    ],
)
def test_models_without_conv2d_are_refused(model, match):
    with pytest.raises(ValueError, match=match):
        decouple_(model, DecoupleConfig(rank=2))


def test_torchscript_and_non_modules_are_refused():
    scripted = torch.jit.trace(nn.Sequential(nn.Conv2d(3, 4, 3)), torch.zeros(1, 3, 8, 8))
    with pytest.raises(TypeError, match="TorchScript .* pass the nn.Module"):
        decouple_(scripted, DecoupleConfig(rank=2))
    with pytest.raises(TypeError, match="must be an nn.Module; got str"):
        decouple_("model.pt", DecoupleConfig(rank=2))
    with pytest.raises(TypeError, match="config must be a DecoupleConfig; got dict"):
        decouple_(toy(), {"rank": 2})


def test_auto_method_needs_a_budget_and_is_refused_up_front():
    model = toy()
    before = fingerprint(model)
    for config in (
        DecoupleConfig(rank=2, overrides={"conv3": {"method": "auto"}}),
        DecoupleConfig(method="auto", overrides={"conv3": 2}),
    ):
        with pytest.raises(ValueError, match="layer 'conv3': method 'auto' .* budget"):
            decouple_(model, config)
        assert_same(before, fingerprint(model))

"""Full-kernel CP: each term's spatial filter any ``kh×kw`` kernel, not an outer product.

It is CP of the kernel read as ``N × C × (kh·kw)``: it must recover a planted kernel that
separable CP cannot, be exactly the conv of its reconstruction in every geometry, run only as
``square``, survive a recipe and an ONNX export, and never be switched to ``separable``.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from decouple import DecoupleConfig, apply_recipe_, decouple_, make_recipe
from decouple.factor.cp import cp_weight
from decouple.factor.cp_full import cp_full_weight
from decouple.nn.factorized import CPConv2d
from decouple.runtime.latency import Latency
from decouple.runtime.realize import (
    ORIGINAL,
    RealizationChoice,
    confirm_on_model_,
    realization_names,
)
from decouple.surgery.methods import recipe_entry
from decouple.surgery.recipe_check import check_recipe


def planted(n=8, c=6, kh=3, kw=3, rank=5, seed=0) -> torch.Tensor:
    """A kernel that is exactly ``rank`` terms with random (non-separable) 2-D filters."""
    g = torch.Generator().manual_seed(seed)
    out, inp = torch.randn(n, rank, generator=g), torch.randn(c, rank, generator=g)
    k = torch.randn(kh * kw, rank, generator=g)
    return torch.einsum("nr,cr,pr->ncp", out, inp, k).reshape(n, c, kh, kw).double()


@pytest.mark.parametrize("shape", [(8, 6, 3, 3), (10, 7, 3, 5)])
def test_planted_full_kernel_rank_is_recovered_where_separable_cp_cannot(shape):
    w = planted(*shape)
    full = cp_full_weight(w, 5)
    assert full.spatial == "full" and full.rank == 5
    assert full.relative_error(w) < 1e-4
    assert cp_weight(w, 5).relative_error(w) > 0.05  # outer products cannot make these filters
    assert cp_weight(w, 5).spatial == "separable"


def test_full_kernels_fit_a_trained_like_kernel_at_least_as_well_at_every_rank():
    torch.manual_seed(0)
    w = nn.Conv2d(16, 16, 3).weight.detach().double()
    for rank in (4, 8, 16, 32):
        assert cp_full_weight(w, rank).relative_error(w) <= cp_weight(w, rank).relative_error(w)


@settings(max_examples=30, deadline=None)
@given(
    rank=st.integers(1, 5),
    kernel=st.sampled_from([3, (3, 2), (5, 3)]),
    stride=st.sampled_from([1, 2, (2, 1)]),
    padding=st.sampled_from([0, 1, (1, 2), "valid"]),
    dilation=st.sampled_from([1, 2]),
    groups=st.sampled_from([1, 2]),
    padding_mode=st.sampled_from(["zeros", "reflect", "circular"]),
    bias=st.booleans(),
)
def test_full_layer_is_the_conv_of_its_reconstruction(
    rank, kernel, stride, padding, dilation, groups, padding_mode, bias
):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, kernel, stride, padding, dilation, groups, bias, padding_mode).double()
    layer = CPConv2d.from_factors(conv, cp_full_weight(conv.weight, rank, groups))
    assert layer.spatial == "full" and layer.realization == "square" and layer.horizontal is None
    twin = nn.Conv2d(4, 6, kernel, stride, padding, dilation, groups, bias, padding_mode).double()
    with torch.no_grad():
        twin.weight.copy_(layer.reconstructed_weight())
        if bias:
            twin.bias.copy_(conv.bias)
    x = torch.randn(2, 4, 11, 10, dtype=torch.float64)
    torch.testing.assert_close(layer(x), twin(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.factors().reconstruct(), layer.reconstructed_weight())


def test_making_a_layer_full_keeps_its_function_and_factors():
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1, padding_mode="reflect").double()
    layer = CPConv2d.from_conv(conv, 4).double()
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    before, kernel = layer(x), layer.reconstructed_weight()
    assert layer.make_full_() is layer and layer.spatial == "full"
    torch.testing.assert_close(layer(x), before, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.reconstructed_weight(), kernel)
    assert "horizontal" not in dict(layer.named_children()) and "spatial='full'" in repr(layer)


def test_a_full_layer_runs_only_as_square():
    layer = CPConv2d(4, 4, 3, 2, padding=1, spatial="full")
    assert realization_names(layer) == ()  # nothing to choose between
    layer.set_realization("square")
    with pytest.raises(ValueError, match="only as 'square'"):
        layer.set_realization("separable")
    with pytest.raises(ValueError, match="spatial must be one of separable, full"):
        CPConv2d(4, 4, 3, 2, spatial="square")
    separable = cp_weight(planted(4, 4, rank=2), 2)
    with pytest.raises(ValueError, match="factors are separable"):
        layer.load_factors(separable)


def _plain():
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))


def _full_toy():
    torch.manual_seed(0)
    model = _plain()
    decouple_(model, DecoupleConfig(method="cp", rank=4, fold_bn=False, include_stem=True))
    model[2].set_realization("square").make_full_()
    return model.eval()


def test_the_whole_model_check_never_switches_a_full_layer(monkeypatch):
    import decouple.runtime.realize as realize

    model = _full_toy()
    choices = {  # separable would beat square on layer 2's table, were it a separable layer
        "0": RealizationChoice("0", "separable", {ORIGINAL: 1.0, "separable": 0.5, "square": 0.4}, 0.05),
        "2": RealizationChoice("2", "square", {ORIGINAL: 1.0, "separable": 0.3, "square": 0.4}, 0.05),
    }  # fmt: skip

    def clock(models, *a, **k):  # whole models: the separable configuration is fastest
        ms = {key: 1.0 if key == "separable where faster" else 2.0 for key in models}
        return {key: Latency(v, 0.0, 1, "eager", "cpu", 1, 2) for key, v in ms.items()}

    monkeypatch.setattr(realize, "side_by_side", clock)
    times = confirm_on_model_(model, choices, torch.randn(2, 4, 6, 6))
    assert "square where faster" in times  # layer 0 may still switch
    assert model[2].spatial == "full" and choices["2"].chosen == "square"


def test_recipe_replays_full_kernels():
    model = _full_toy()
    entry = recipe_entry(model[2])
    assert entry == {"method": "cp", "rank": 4, "realization": "square", "spatial": "full"}
    layers = {n: recipe_entry(model[int(n)]) for n in ("0", "2")}
    recipe = json.loads(json.dumps({**make_recipe([]), "layers": layers}))
    fresh = _plain()
    apply_recipe_(fresh, recipe)
    fresh.load_state_dict(model.state_dict())
    assert fresh[0].spatial == "separable" and fresh[2].spatial == "full"
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(fresh.eval()(x), model(x))
    for bad, match in (({"spatial": "round"}, "spatial"), ({"realization": "separable"}, "only")):
        wrong = json.loads(json.dumps(recipe))
        wrong["layers"]["2"].update(bad)
        with pytest.raises(ValueError, match=match):
            check_recipe(_plain(), wrong)


def test_full_layer_exports_to_onnx_as_three_convs():
    pytest.importorskip("onnxruntime")
    import onnx
    import onnxruntime as ort

    from decouple.runtime.export import onnx_bytes

    torch.manual_seed(3)
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1)
    layer = CPConv2d.from_factors(conv, cp_full_weight(conv.weight, 5)).float().eval()
    x = torch.randn(2, 6, 9, 9)
    data = onnx_bytes(layer, x)
    assert [n.op_type for n in onnx.load_from_string(data).graph.node] == ["Conv"] * 3
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), layer(x), rtol=1e-5, atol=1e-5)

"""A CP layer's two realizations: four ops (``separable``) or three (``square``), same function.

The square realization runs the vertical and horizontal depthwise convs as one ``kh×kw``
depthwise conv whose kernels are their outer products; it must be exact in every geometry the
layer honours, keep the same parameters, be chosen by the realization timer like network
decoupling's graphs, survive a recipe, and export to ONNX as three convs.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from decouple import DecoupleConfig, apply_recipe_, decouple_, make_recipe
from decouple.nn.factorized import CP_REALIZATIONS, CPConv2d
from decouple.runtime.latency import Latency
from decouple.runtime.realize import (
    ORIGINAL,
    RealizationChoice,
    choose_realizations_,
    confirm_on_model_,
    realizations,
)
from decouple.surgery.methods import recipe_entry
from decouple.surgery.recipe_check import check_recipe


@settings(max_examples=40, deadline=None)
@given(
    rank=st.integers(1, 5),
    kernel=st.sampled_from([3, (3, 2), (1, 3), (5, 3)]),
    stride=st.sampled_from([1, 2, (2, 1)]),
    padding=st.sampled_from([0, 1, (1, 2), "same", "valid"]),
    dilation=st.sampled_from([1, 2, (1, 2)]),
    groups=st.sampled_from([1, 2]),
    padding_mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    bias=st.booleans(),
)
def test_square_is_the_separable_function(
    rank, kernel, stride, padding, dilation, groups, padding_mode, bias
):
    if padding == "same":
        stride = 1  # PyTorch refuses 'same' with stride
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, kernel, stride, padding, dilation, groups, bias, padding_mode).double()
    layer = CPConv2d.from_conv(conv, rank)
    x = torch.randn(2, 4, 11, 10, dtype=torch.float64)
    reference = layer(x)
    keys = set(layer.state_dict())
    out = layer.set_realization("square")(x)
    assert layer.realization == "square" and out.shape == reference.shape
    torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-10)
    assert set(layer.state_dict()) == keys  # same parameters whatever the graph
    # and the square kernel is the factors' reconstruction, up to the 1x1 convs around it
    torch.testing.assert_close(layer.head(x), layer.set_realization("separable").head(x))


def test_square_is_the_conv_of_the_reconstructed_kernel():
    """Whatever the factors, the square graph convolves with Σ_r out·inp·vertical·horizontal."""
    torch.manual_seed(1)
    layer = CPConv2d(6, 4, (3, 5), 3, stride=(1, 2), padding=(1, 2), groups=2).double()
    for p in layer.parameters():
        nn.init.normal_(p)
    conv = nn.Conv2d(6, 4, (3, 5), stride=(1, 2), padding=(1, 2), groups=2).double()
    with torch.no_grad():
        conv.weight.copy_(layer.reconstructed_weight())
        conv.bias.copy_(layer.bias)
    x = torch.randn(2, 6, 7, 9, dtype=torch.float64)
    torch.testing.assert_close(layer.set_realization("square")(x), conv(x), rtol=1e-10, atol=1e-10)


def test_unknown_realization_names_the_allowed_ones():
    layer = CPConv2d(4, 4, 3, 2)
    assert layer.realization == "separable"
    with pytest.raises(ValueError, match="separable, square for cp; got 'grouped'"):
        layer.set_realization("grouped")
    assert "realization='square'" in repr(layer.set_realization("square"))


def test_realization_copies_share_parameters_and_leave_the_layer_alone():
    layer = CPConv2d(4, 4, 3, 2)
    copies = realizations(layer)
    assert set(copies) == set(CP_REALIZATIONS)
    assert layer.realization == "separable" and copies["square"].realization == "square"
    assert all(c.vertical.weight is layer.vertical.weight for c in copies.values())


def _cp_toy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    originals = {"0": model[0], "2": model[2]}
    decouple_(model, DecoupleConfig(method="cp", rank=4, fold_bn=False, include_stem=True))
    return model.eval(), originals


def test_the_timer_picks_square_where_it_is_faster(monkeypatch):
    import decouple.runtime.realize as realize

    def clock(candidates, *a, **k):  # the original 1 ms, separable 0.6, square 0.4
        return {key: {ORIGINAL: 1.0, "separable": 0.6, "square": 0.4}[key] for key in candidates}

    monkeypatch.setattr(realize, "time_candidates", clock)
    model, originals = _cp_toy()
    choices = choose_realizations_(model, originals, torch.randn(2, 4, 6, 6), min_gain=0.05)
    assert {c.chosen for c in choices.values()} == {"square"}
    assert model[0].realization == model[2].realization == "square"


def test_whole_model_check_can_switch_cp_layers(monkeypatch):
    import decouple.runtime.realize as realize

    model, _ = _cp_toy()
    model[2].set_realization("square")
    choices = {  # square won layer 2 alone; separable beat the original in both
        "0": RealizationChoice("0", "separable", {ORIGINAL: 1.0, "separable": 0.5, "square": 0.6}, 0.05),
        "2": RealizationChoice("2", "square", {ORIGINAL: 1.0, "separable": 0.5, "square": 0.4}, 0.05),
    }  # fmt: skip

    def clock(models, *a, **k):  # whole models: every layer separable is fastest
        ms = {key: 1.0 if key == "separable where faster" else 2.0 for key in models}
        return {key: Latency(v, 0.0, 1, "eager", "cpu", 1, 2) for key, v in ms.items()}

    monkeypatch.setattr(realize, "side_by_side", clock)
    times = confirm_on_model_(model, choices, torch.randn(2, 4, 6, 6))
    assert {"per layer", "separable where faster", "square where faster"} <= set(times)
    assert model[0].realization == model[2].realization == "separable"
    assert choices["2"].chosen == "separable"


def test_recipe_replays_the_square_realization():
    model, _ = _cp_toy()
    model[2].set_realization("square")
    assert recipe_entry(model[0]) == {"method": "cp", "rank": 4}  # the default is not written
    assert recipe_entry(model[2]) == {"method": "cp", "rank": 4, "realization": "square"}
    recipe = {**make_recipe([]), "layers": {n: recipe_entry(model[int(n)]) for n in ("0", "2")}}
    recipe = json.loads(json.dumps(recipe))
    fresh, _ = _cp_toy()
    for i in (0, 2):  # back to plain convs, as a freshly built architecture has them
        fresh[i] = nn.Conv2d(fresh[i].in_channels, 8, 3, padding=1)
    apply_recipe_(fresh, recipe)
    fresh.load_state_dict(model.state_dict())
    assert fresh[0].realization == "separable" and fresh[2].realization == "square"
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(fresh(x), model(x))
    recipe["layers"]["2"]["realization"] = "sum"  # network decoupling's, not CP's
    fresh[2] = nn.Conv2d(8, 8, 3, padding=1)
    with pytest.raises(ValueError, match="realization"):
        check_recipe(fresh, recipe)


def test_square_exports_to_onnx_as_three_convs():
    pytest.importorskip("onnxruntime")
    import onnx
    import onnxruntime as ort

    from decouple.runtime.export import onnx_bytes

    torch.manual_seed(3)
    layer = CPConv2d.from_conv(nn.Conv2d(6, 8, 3, stride=2, padding=1), 5).eval()
    layer.set_realization("square")
    x = torch.randn(2, 6, 9, 9)
    data = onnx_bytes(layer, x)
    graph = onnx.load_from_string(data).graph
    assert [n.op_type for n in graph.node] == ["Conv"] * 3  # the kernel folded into a constant
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), layer(x), rtol=1e-5, atol=1e-5)


def test_square_runs_more_flops_so_a_flops_budget_never_takes_it(fake_clock):
    """The square depthwise conv does kh·kw multiply-adds per term where the separable pair does
    kh + kw: faster, but more FLOPs. Under a FLOPs budget the model must still meet the budget,
    so timing chooses among the separable graph and the original only; with ranks and no
    budget, the faster square graph is kept."""
    from decouple import count_flops
    from decouple.pipeline import compress_
    from decouple.runtime.latency import LatencyConfig

    model, _ = _cp_toy()
    x = torch.randn(1, 4, 6, 6)
    separable = count_flops(model, x)[0]
    model[2].set_realization("square")
    assert count_flops(model, x)[0] > separable
    fake_clock.cost = lambda m: {"separable": 0.6, "square": 0.4}.get(
        getattr(m, "realization", None), 1.0 if type(m) is nn.Conv2d else 0.0
    )
    quick = LatencyConfig(layer_rounds=1, layer_min_run_time=0.002, min_run_time=0.02)

    def build():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)
        )

    config = DecoupleConfig(method="cp", fold_bn=False, include_stem=True)
    budgeted = build()
    result = compress_(budgeted, config, (4, 8, 8), target_flops=0.5, realize=True, latency=quick)
    factored = [n for n, c in result.realizations.items() if c.chosen != ORIGINAL]
    assert factored and all("square" not in result.realizations[n].times_ms for n in factored)
    assert all(budgeted.get_submodule(n).realization == "separable" for n in factored)
    x = torch.randn(1, 4, 8, 8)
    assert count_flops(budgeted, x)[0] <= 0.5 * count_flops(build(), x)[0]
    ranked = build()
    result = compress_(ranked, DecoupleConfig(method="cp", rank=4, fold_bn=False, include_stem=True),
                       (4, 8, 8), realize=True, latency=quick)  # fmt: skip
    assert {c.chosen for c in result.realizations.values()} == {"square"}

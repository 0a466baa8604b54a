"""The report's FLOPs agree with the closed forms; totals, output error and renderings hold up."""

import copy
import json

import pytest
import torch
from torch import nn

from decouple import DecoupleConfig, build_report, count_flops, decouple_


@pytest.mark.parametrize("t", [1, 2, 5])
@pytest.mark.parametrize("stride", [1, 2])
def test_layer_flops_match_closed_forms(t, stride):
    c, n, k, h, w = 6, 10, 3, 12, 9
    model = nn.Sequential(nn.Conv2d(c, n, k, stride=stride, padding=1, bias=False))
    original = copy.deepcopy(model)
    ho, wo = (h + 2 - k) // stride + 1, (w + 2 - k) // stride + 1
    for order in ("dw-pw", "pw-dw"):
        model = copy.deepcopy(original)
        records = decouple_(model, DecoupleConfig(rank=t, order=order))
        report = build_report(original, model, records, (c, h, w))
        r = report.layers[0]
        assert r.flops_before == 2 * ho * wo * n * c * k * k
        if order == "dw-pw":
            assert r.flops_after == 2 * t * ho * wo * c * (k * k + n)
        else:
            assert r.flops_after == 2 * t * (h * w * c * n + ho * wo * n * k * k)
        assert report.flops_after == r.flops_after
        assert r.params_after == (
            c * t * k * k + c * t * n if order == "dw-pw" else c * n * t + n * t * k * k
        )


def test_count_flops_per_module_names():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.Conv2d(4, 4, 1)))
    total, per = count_flops(model, torch.zeros(1, 3, 6, 6))
    assert per["0"] == 2 * 16 * 4 * 27 and per["1.0"] == 2 * 16 * 4 * 4
    assert total == per["0"] + per["1.0"]


def test_report_totals_renderings_and_output_error():
    torch.manual_seed(0)
    original = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.Flatten(1)
    )
    model = copy.deepcopy(original)
    records = decouple_(model, DecoupleConfig(rank=1, include_stem=True))
    report = build_report(original, model, records, (3, 8, 8), extra={"note": "x"})
    totals = report.totals()
    assert totals["layers_decoupled"] == 2
    assert totals["flops_ratio"] == pytest.approx(report.flops_before / report.flops_after)
    assert totals["params_before"] == sum(p.numel() for p in original.parameters())
    assert 0 < report.output["rel_error"] < 1.5
    data = json.loads(report.to_json())
    assert data["note"] == "x" and data["layers"][1]["rank"] == 1
    text, md = report.to_text(), report.to_markdown()
    for name in ("0", "2"):
        assert any(line.startswith(name + " ") for line in text.splitlines())
    assert md.count("\n|") == 1 + 1 + len(records)  # header, rule, rows
    # A full-rank decoupling has no output error.
    full = copy.deepcopy(original).double()
    recs = decouple_(full, DecoupleConfig(rank=9, include_stem=True))
    assert build_report(original.double(), full, recs, (3, 8, 8)).output["rel_error"] < 1e-10


def test_the_output_check_says_which_inputs_it_used():
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(8, 8, 3), nn.Flatten(1), nn.Linear(8 * 36, 10)).eval()
    model = copy.deepcopy(original)
    records = decouple_(model, DecoupleConfig(rank=1))
    shape = (8, 8, 8)
    random = build_report(original, model, records, shape)
    line = next(x for x in random.summary_lines() if x.startswith("output:"))
    assert "on 8 random Gaussian inputs (no images given; the agreement on real images" in line
    assert "top-1 agreement" in line
    assert json.loads(random.to_json())["output"]["inputs"].startswith("8 random Gaussian")
    assert "random Gaussian inputs" in random.to_markdown()
    x = torch.randn(12, *shape)
    named = build_report(original, model, records, shape, inputs=x, inputs_name="--data images")
    assert "relative error" in named.summary_lines()[3]
    assert named.summary_lines()[3].split(", top-1")[0].endswith("on 12 --data images")
    assert named.output["inputs"] == "12 --data images" and named.output["batch"] == 12
    extra = {"output_check_inputs": "--calib images"}
    cli = build_report(original, model, records, shape, inputs=x, extra=extra)
    assert cli.output["inputs"] == "12 --calib images"
    assert "on 12 --calib images" in cli.to_markdown()

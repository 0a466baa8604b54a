"""The report's FLOPs agree with the closed forms; totals, output error and renderings hold up."""

import copy
import json
from collections import OrderedDict

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


class DictNet(nn.Module):
    """Returns a segmentation-like ``{"out": (B, 4, H, W), "aux": (B, 4)}``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = self.head(torch.relu(self.body(x)))
        return OrderedDict(out=y, aux=y.mean((2, 3)))


class TinyDetector(nn.Module):
    """A ``backbone`` conv net, then per image the positions whose mean feature passes a
    threshold as boxes: how many depends on the data, as a real detector's do."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)
        )

    def forward(self, x):
        found = []
        for f in self.backbone(x):
            score = f.mean(0).sigmoid()
            keep = (score > 0.5).nonzero()
            xy = keep.flip(1).to(f.dtype) * 2
            found.append(
                {
                    "boxes": torch.cat([xy, xy + 4], 1),
                    "scores": score[keep[:, 0], keep[:, 1]],
                    "labels": f.argmax(0)[keep[:, 0], keep[:, 1]],
                }
            )
        return found


def test_a_dict_output_is_compared_leaf_by_leaf_and_the_report_names_the_leaves():
    torch.manual_seed(0)
    original = DictNet().eval()
    model = copy.deepcopy(original)
    records = decouple_(model, DecoupleConfig(rank=2))
    assert [r.action for r in records] == ["kept", "decoupled"]  # the 3-channel stem is kept
    report = build_report(original, model, records, (3, 8, 8))
    out = report.output
    assert out["leaves"] == ["out", "aux"] and "not_comparable" not in out
    errors = out["leaf_errors"]
    assert all(e > 0 for e in errors.values())
    assert min(errors.values()) <= out["rel_error"] <= max(errors.values())
    assert 0 < out["pixel_agreement"]["out"] <= 1 and "argmax_agreement" not in out
    line = report.summary_lines()[3]
    assert line.startswith(
        f"output: relative error {out['rel_error']:.4g} over 2 leaves (out, aux)"
    )
    assert "on 8 random Gaussian inputs" in line and "per-pixel argmax agreement" in line
    assert json.loads(report.to_json())["output"]["leaves"] == ["out", "aux"]
    # Exact at full rank, leaf by leaf.
    full = copy.deepcopy(original).double()
    recs = decouple_(full, DecoupleConfig(rank=9))
    exact = build_report(original.double(), full, recs, (3, 8, 8)).output
    assert max(exact["leaf_errors"].values()) < 1e-10 and exact["pixel_agreement"]["out"] == 1


def test_a_detector_is_compared_on_its_backbone_features_and_matched_boxes():
    torch.manual_seed(0)
    original = TinyDetector().eval()
    model = copy.deepcopy(original)
    records = decouple_(model, DecoupleConfig(rank=2))
    report = build_report(original, model, records, (3, 16, 16))
    out = report.output
    # Every output leaf is a detection: none compared element by element.
    assert set(out["not_comparable"]) == {
        f"[{i}].{k}" for i in range(8) for k in ("boxes", "scores", "labels")
    }
    assert out["backbone"]["leaves"] == ["backbone"] and out["leaves"] == ["backbone"]
    x = torch.randn((8, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = original.backbone(x).double(), model.backbone(x).double()
    assert out["rel_error"] == pytest.approx(float((a - b).norm() / a.norm()), rel=1e-6)
    det = out["detections"]
    counts = [len(d["boxes"]) for d in original(x)], [len(d["boxes"]) for d in model(x)]
    assert (det["before"], det["after"]) == (sum(counts[0]), sum(counts[1]))
    assert len(set(counts[0])) > 1  # the number of boxes does depend on the image
    assert det["sets"] == 8 and 0 < det["matched"] <= min(det["before"], det["after"])
    lines = report.summary_lines()
    assert lines[3].startswith(
        "output: detections are data-dependent; compared the backbone features (1 leaf) and "
        "matched boxes on 8 random Gaussian inputs"
    )
    assert lines[4].startswith(f"detections: {det['before']:,} -> {det['after']:,} boxes")
    # Exact at full rank: the same boxes, all matched, the same scores.
    full = copy.deepcopy(original).double()
    recs = decouple_(full, DecoupleConfig(rank=9))
    exact = build_report(original.double(), full, recs, (3, 16, 16)).output
    assert exact["rel_error"] < 1e-10 and exact["detections"]["matched_fraction"] == 1.0
    assert exact["detections"]["mean_score_diff"] < 1e-10


def _block(zero_bn: bool) -> nn.Module:
    """A residual block, conv → BN → ReLU → conv → BN plus the identity: with the last BN's scale
    at zero (timm's and torchvision's ``zero_init_residual``) the convs cannot move the output."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
            if zero_bn:
                nn.init.zeros_(self.bn2.weight)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            return self.head((x + y).mean((2, 3)))

    torch.manual_seed(0)
    return Block().eval()


@pytest.mark.parametrize("zero_bn", [True, False])
def test_an_output_that_ignores_the_decoupled_layers_is_flagged(zero_bn):
    original = _block(zero_bn)
    model = copy.deepcopy(original)
    records = decouple_(model, DecoupleConfig(rank=1))  # BN folded: conv2's kernel is zero
    report = build_report(original, model, records, (8, 6, 6))
    assert max(r.rel_error for r in report.decoupled) > 0.1
    note = report.output.get("insensitive")
    if zero_bn:
        assert note and "does not depend on the decoupled layers" in note
        assert note in report.to_text() and json.loads(report.to_json())["output"]["insensitive"]
    else:
        assert note is None and report.output["rel_error"] > 1e-3

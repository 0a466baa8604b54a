"""Any output structure: flattened into named leaves, compared leaf by leaf, classifiers and
detections recognised, and every consumer of a model's output taking any structure."""

from __future__ import annotations

import copy
import dataclasses
from collections import OrderedDict, namedtuple

import pytest
import torch
import torch.utils._pytree as pytree
from torch import nn

from decouple.agreement import top1
from decouple.io.evaluate import evaluate
from decouple.nn.output_diff import OutputDiff, squared_change, summary_lines
from decouple.nn.outputs import (
    box_iou,
    class_logits,
    describe_output,
    detection_sets,
    flatten_output,
    match_detections,
)
from decouple.plan.losses import output_sensitivity

Pair = namedtuple("Pair", "logits hidden")


@dataclasses.dataclass
class Result:  # a dataclass output, as HuggingFace's ModelOutput is
    last: torch.Tensor
    count: int = 3
    extra: torch.Tensor | None = None


class Holder:  # a plain object holding tensors as attributes
    def __init__(self, t: torch.Tensor) -> None:
        self.features = {"0": t, "1": t + 1}
        self.name = "x"
        self._private = t


def t(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_nested_structures_flatten_with_exact_paths_and_non_tensors_ignored():
    a, b, c, d, e = (t(2, 3, seed=i) for i in range(5))
    out = (
        {"out": [a, None, "label", 7], "aux": b},
        Pair(c, d),
        Result(e),
        OrderedDict(z=a, y=(b,)),
        Holder(c),
    )
    leaves = flatten_output(out)
    assert list(leaves) == [
        "[0].out[0]", "[0].aux", "[1].logits", "[1].hidden", "[2].last", "[3].z", "[3].y[0]",
        "[4].features.0", "[4].features.1",
    ]  # fmt: skip
    assert leaves["[0].out[0]"] is a and leaves["[1].hidden"] is d and leaves["[2].last"] is e
    assert flatten_output(a) == {"output": a}
    assert list(flatten_output({"out": a}, prefix="backbone")) == ["backbone.out"]
    assert flatten_output(("text", 3, None)) == {}


def test_the_order_is_the_exporters_order():
    # torch.export flattens outputs with pytree: dicts by insertion order, depth first.
    out = OrderedDict(b=[t(1, seed=0), {"y": t(1, seed=1), "x": t(1, seed=2)}], a=t(1, seed=3))
    ours = list(flatten_output(out).values())
    theirs = pytree.tree_leaves(out)
    assert len(ours) == len(theirs) and all(x is y for x, y in zip(ours, theirs, strict=True))


def test_cycles_and_excessive_nesting():
    looped: list = [t(2)]
    looped.append(looped)
    assert list(flatten_output(looped)) == ["[0]"]
    deep: object = t(1)
    for _ in range(70):
        deep = [deep]
    with pytest.raises(ValueError, match="nested"):
        flatten_output(deep)


def test_describe_output():
    assert describe_output(t(1, 10)) == "a Tensor of shape (1, 10)"
    out = OrderedDict(out=t(1), aux=t(1))
    assert describe_output(out) == "an OrderedDict of 2 tensors (out, aux)"
    assert describe_output("x") == "a str, with no tensor"


@pytest.mark.parametrize(
    ("out", "is_logits"),
    [
        (t(4, 10), True),
        ((t(4, 10), 3, None), True),  # non-tensor leaves do not count
        ({"logits": t(4, 10)}, True),
        (t(4, 1), False),  # one class: a score, not logits
        (t(4, 10).long(), False),
        (t(4, 10, 2), False),
        (t(4, 10, 8, 8), False),
        ((t(4, 10), t(4, 10)), False),  # two leaves: which would be the classes?
        ([{"boxes": t(3, 4), "scores": t(3)}], False),
    ],
)
def test_class_logits_predicate(out, is_logits):
    assert (class_logits(out) is not None) == is_logits


def test_identical_outputs_have_zero_error_and_every_leaf_is_compared():
    out = {"out": t(2, 3, 4, 4), "aux": (t(2, 5, seed=1), t(2, seed=2))}
    diff = OutputDiff()
    diff.add(out, copy.deepcopy(out))
    d = diff.to_dict()
    assert d["rel_error"] == 0.0 and d["leaves"] == ["out", "aux[0]", "aux[1]"]
    assert d["leaf_errors"] == dict.fromkeys(d["leaves"], 0.0) and "not_comparable" not in d


def test_perturbing_one_leaf_moves_only_that_leafs_error():
    a = {"out": t(2, 3, 4, 4), "aux": t(2, 5, seed=1), "n": 3}
    b = copy.deepcopy(a)
    delta = 0.01 * t(2, 5, seed=9)
    b["aux"] = b["aux"] + delta
    diff = OutputDiff()
    diff.add(a, b)
    errors = diff.to_dict()["leaf_errors"]
    assert errors["out"] == 0.0
    assert errors["aux"] == pytest.approx(float(delta.norm() / a["aux"].norm()), rel=1e-5)
    overall = float(delta.norm() / torch.cat([a["out"].flatten(), a["aux"].flatten()]).norm())
    assert diff.rel_error() == pytest.approx(overall, rel=1e-5)
    assert 0 < diff.rel_error() < errors["aux"]  # the unchanged leaf dilutes it
    moved, size = squared_change(a, b)
    assert moved == pytest.approx(float(delta.norm()) ** 2, rel=1e-5)
    assert size == pytest.approx(float(a["out"].norm() ** 2 + a["aux"].norm() ** 2), rel=1e-5)


def test_leaves_whose_shape_or_presence_differs_are_not_comparable():
    a = {"fixed": t(2, 3), "found": t(5, 4), "gone": t(2)}
    b = {"fixed": t(2, 3), "found": t(7, 4), "new": t(2)}
    diff = OutputDiff()
    diff.add(a, b)
    d = diff.to_dict()
    assert d["leaves"] == ["fixed"]
    assert d["not_comparable"] == {
        "found": "shapes differ ((5, 4) vs (7, 4))",
        "gone": "only in the original's output",
        "new": "only in the decoupled model's output",
    }
    # Comparable in one mini-batch, not in the next: not comparable at all, its sums dropped.
    diff.add({**a, "fixed": t(3, 3)}, b)
    assert diff.leaves == [] and diff.rel_error() is None
    line = summary_lines({**diff.to_dict(), "batch": 2})[0]
    assert line.startswith("output: nothing comparable (4 leaves not comparable: ")


def test_class_logits_get_top1_agreement_and_dense_scores_per_pixel_agreement():
    logits = t(6, 4)
    flipped = logits.clone()
    flipped[0] = -flipped[0]  # the top class of image 0 changes
    diff = OutputDiff()
    diff.add(logits, flipped)
    assert diff.to_dict()["argmax_agreement"] == pytest.approx(5 / 6)
    seg = t(2, 3, 4, 4)
    other = seg.clone()
    other[0, :, 0, 0] = -other[0, :, 0, 0]
    diff = OutputDiff()
    diff.add({"out": seg, "feat": t(2, 3, 2, 2)}, {"out": other, "feat": t(2, 3, 2, 2)}, (4, 4))
    d = diff.to_dict()
    assert d["pixel_agreement"] == {"out": pytest.approx(31 / 32)}  # feat is not at 4x4
    assert "argmax_agreement" not in d


def test_box_iou_and_matching():
    boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]])
    assert box_iou(boxes, boxes + torch.tensor([5.0, 0, 5, 0])).tolist() == [
        [pytest.approx(50 / 150), 0.0],
        [0.0, pytest.approx(50 / 150)],
    ]
    a = {"boxes": boxes, "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 2])}
    shifted = {**a, "boxes": boxes + 1, "scores": torch.tensor([0.85, 0.8])}
    assert match_detections(a, shifted) == [pytest.approx(0.05), 0.0]
    relabelled = {**shifted, "labels": torch.tensor([2, 2])}
    assert match_detections(a, relabelled) == [0.0]  # box 0 has no partner of its class
    extra = {k: torch.cat([v, v[:1]]) for k, v in a.items()}
    assert len(match_detections(a, extra)) == 2  # one partner each, at most
    assert match_detections(a, {k: v[:0] for k, v in a.items()}) == []


def test_detections_are_matched_not_compared_element_by_element():
    def image(n: int, seed: int) -> dict:
        xy = torch.rand(n, 2, generator=torch.Generator().manual_seed(seed)) * 50
        return {
            "boxes": torch.cat([xy, xy + 10], 1),
            "scores": torch.rand(n),
            "labels": torch.ones(n),
        }

    a = [image(3, 0), image(2, 1)]
    b = [copy.deepcopy(a[0]), {k: v[:1] for k, v in a[1].items()}]  # image 1 lost a box
    assert list(detection_sets(a)) == ["[0]", "[1]"]
    diff = OutputDiff()
    diff.add(a, b)
    d = diff.to_dict()
    assert d["leaves"] == [] and set(d["not_comparable"]) == {
        f"[{i}].{k}" for i in range(2) for k in ("boxes", "scores", "labels")
    }  # even image 0, whose shapes happen to agree: a set has no element order
    det = d["detections"]
    assert (det["sets"], det["before"], det["after"], det["matched"]) == (2, 5, 4, 4)
    assert det["matched_fraction"] == 0.8 and det["mean_score_diff"] == 0.0


def tiny_dict_model() -> nn.Module:
    class DictNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Conv2d(3, 6, 3, padding=1)
            self.head = nn.Conv2d(6, 4, 3, padding=1)

        def forward(self, x):
            y = self.head(torch.relu(self.body(x)))
            return OrderedDict(out=y, aux=y.mean((2, 3)))

    torch.manual_seed(0)
    return DictNet().eval()


def test_check_onnx_and_torch_export_compare_a_dict_output_leaf_by_leaf():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from decouple.runtime.export import export_program, onnx_bytes
    from decouple.runtime.onnx_check import check_onnx

    model, x = tiny_dict_model(), t(2, 3, 6, 6)
    check = check_onnx(model, x, onnx_bytes(model, x))
    assert check["ok"] and set(check["leaves"]) == {"out", "aux"}
    assert max(check["leaves"].values()) < 1e-5
    program = export_program(model, x)
    assert program["ok"] and list(program["leaves"]) == ["out", "aux"]


def test_consumers_that_need_class_logits_say_so():
    model = tiny_dict_model()
    with pytest.raises(ValueError, match=r"max_change needs a classifier.*OrderedDict of 2"):
        top1(model, [t(2, 3, 6, 6)])
    with pytest.raises(ValueError, match="accuracy needs a classifier"):
        evaluate(model, t(2, 3, 6, 6), torch.tensor([0, 1]))


def test_output_sensitivity_sums_over_the_leaves_of_any_structure():
    model = tiny_dict_model()
    weights = output_sensitivity(model, ["body", "head"], t(4, 3, 6, 6), max_images=4)
    assert set(weights) == {"body", "head"}
    assert all(w > 0 and w == w for w in weights.values())  # finite, not the flat fallback 1.0
    assert weights["head"] != 1.0

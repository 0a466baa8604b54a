"""Two models' outputs of the same inputs, compared leaf by leaf, and what the report says of it.

The rule, for any output structure (:mod:`decouple.nn.outputs` names the leaves):

- a leaf both outputs hold with the same shape is compared element by element: its relative
  Frobenius error, and over all such leaves together the overall relative error;
- a leaf only one output holds (the structure differs) or whose shapes differ (an output whose
  size depends on the data) is *not comparable*, and the report says which and why;
- detections (a mapping with ``boxes`` and ``scores``, e.g. each image's dict from a torchvision
  detector) are a set whose size and order depend on the data: never compared element by
  element, they are matched by IoU ≥ 0.5 with the same label instead (count before and after,
  matched fraction, mean |score difference| of the matched boxes);
- when some leaves are not comparable and the model has a submodule named ``backbone``, its
  output, captured by a forward hook during the same forward pass, is compared as well: for a
  detector, the backbone/FPN features are what can be compared exactly.

Class logits (one (batch, classes) leaf) also get the top-1 agreement; leaves of shape
(batch, classes > 1, H, W) at the input's H×W (a segmentation's ``out``) the per-pixel argmax
agreement.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .outputs import (
    ROOT,
    captured_output,
    class_logits,
    count_leaves,
    detection_sets,
    flatten_output,
    match_detections,
    under,
)

IOU = 0.5  # the usual threshold at which two boxes are the same detection
BACKBONE = "backbone"
DETECTIONS = "detections (a data-dependent set: matched by IoU instead)"
LEAVES = ("leaf", "leaves")


def _why_not(a: torch.Tensor | None, b: torch.Tensor | None) -> str | None:
    if a is None:
        return "only in the decoupled model's output"
    if b is None:
        return "only in the original's output"
    if a.shape != b.shape:
        return f"shapes differ ({tuple(a.shape)} vs {tuple(b.shape)})"
    return None


@dataclass
class OutputDiff:
    """Two outputs compared leaf by leaf, summed over the mini-batches given to :meth:`add`."""

    sq_diff: dict[str, float] = field(default_factory=dict)  # Σ‖a − b‖² per compared leaf
    sq_norm: dict[str, float] = field(default_factory=dict)  # Σ‖a‖²
    not_comparable: dict[str, str] = field(default_factory=dict)  # path -> why
    pixels: dict[str, list[int]] = field(default_factory=dict)  # path -> [agreeing, pixels]
    top1: list[int] = field(default_factory=lambda: [0, 0])  # [agreeing, images]
    boxes: dict = field(
        default_factory=lambda: {"sets": 0, "before": 0, "after": 0, "matched": 0, "diff": 0.0}
    )

    def add(self, reference, other, spatial: tuple[int, ...] | None = None, prefix: str = ""):
        """Add one mini-batch: ``reference`` (the original's output) against ``other``.

        ``spatial`` is the input's H×W (dense class scores at that size get the per-pixel
        argmax agreement); ``prefix`` goes before every path.
        """
        a, b = flatten_output(reference, prefix), flatten_output(other, prefix)
        sets_a, sets_b = detection_sets(reference, prefix), detection_sets(other, prefix)
        sets = [*sets_a, *(p for p in sets_b if p not in sets_a)]
        for path in [*a, *(p for p in b if p not in a)]:
            if any(under(path, s) for s in sets):
                why = DETECTIONS
            else:
                why = _why_not(a.get(path), b.get(path))
            if why is not None:
                self.not_comparable.setdefault(path, why)
                for held in (self.sq_diff, self.sq_norm, self.pixels):
                    held.pop(path, None)  # comparable in an earlier batch only: not comparable
            elif path not in self.not_comparable:
                self._add_leaf(path, a[path].detach(), b[path].detach(), spatial)
        la, lb = class_logits(reference), class_logits(other)
        if la is not None and lb is not None and la.shape == lb.shape:
            self.top1[0] += int((la.argmax(1) == lb.argmax(1)).sum())
            self.top1[1] += len(la)
        for path in sets:
            self.boxes["sets"] += 1
            self.boxes["before"] += len(sets_a[path]["boxes"]) if path in sets_a else 0
            self.boxes["after"] += len(sets_b[path]["boxes"]) if path in sets_b else 0
            if path in sets_a and path in sets_b:
                diffs = match_detections(sets_a[path], sets_b[path], IOU)
                self.boxes["matched"] += len(diffs)
                self.boxes["diff"] += sum(diffs)

    def _add_leaf(self, path: str, a: torch.Tensor, b: torch.Tensor, spatial) -> None:
        if not a.is_floating_point():  # integer and boolean leaves: compared as numbers
            a, b = a.double(), b.double()
        d = torch.linalg.vector_norm(a - b.to(a.dtype), dtype=torch.float64)
        n = torch.linalg.vector_norm(a, dtype=torch.float64)
        self.sq_diff[path] = self.sq_diff.get(path, 0.0) + float(d) ** 2
        self.sq_norm[path] = self.sq_norm.get(path, 0.0) + float(n) ** 2
        dense = a.dim() == 4 and a.shape[1] > 1 and tuple(a.shape[2:]) == tuple(spatial or ())
        if dense and a.is_floating_point():  # class scores per pixel: a segmentation's output
            agree = int((a.argmax(1) == b.argmax(1)).sum())
            held = self.pixels.setdefault(path, [0, 0])
            held[0], held[1] = held[0] + agree, held[1] + a[:, 0].numel()

    @property
    def leaves(self) -> list[str]:
        """The leaves compared element by element, in output order."""
        return list(self.sq_diff)

    def rel_error(self, paths: list[str] | None = None) -> float | None:
        """‖a − b‖ / ‖a‖ over ``paths`` (default: every compared leaf); None when none."""
        paths = self.leaves if paths is None else paths
        if not paths:
            return None
        d = sum(self.sq_diff[p] for p in paths) ** 0.5
        n = sum(self.sq_norm[p] for p in paths) ** 0.5
        return d / n if n > 0 else d

    def to_dict(self) -> dict:
        """``rel_error``, ``leaves``, ``leaf_errors`` and, where they apply,
        ``not_comparable``, ``argmax_agreement``, ``pixel_agreement`` and ``detections``."""
        out = {
            "rel_error": self.rel_error(),
            "leaves": self.leaves,
            "leaf_errors": {p: self.rel_error([p]) for p in self.leaves},
        }
        if self.not_comparable:
            out["not_comparable"] = dict(self.not_comparable)
        if self.top1[1]:
            out["argmax_agreement"] = self.top1[0] / self.top1[1]
        if self.pixels:
            out["pixel_agreement"] = {p: n / total for p, (n, total) in self.pixels.items()}
        if self.boxes["sets"]:
            k = self.boxes
            out["detections"] = {
                "sets": k["sets"],
                "before": k["before"],
                "after": k["after"],
                "matched": k["matched"],
                "iou": IOU,
                "matched_fraction": k["matched"] / k["before"] if k["before"] else None,
                "mean_score_diff": k["diff"] / k["matched"] if k["matched"] else None,
            }
        return out


@torch.no_grad()
def compare_models(
    original: nn.Module, decoupled: nn.Module, inputs: torch.Tensor, batch_size: int = 32
) -> dict:
    """Run both models on ``inputs`` in mini-batches and compare their outputs leaf by leaf.

    Returns
    -------
    dict
        :meth:`OutputDiff.to_dict` of the outputs, and ``batch`` (the number of inputs). When
        some leaves were not comparable and both models have a ``backbone`` submodule, its
        outputs (paths ``backbone.*``) join ``leaves`` and ``leaf_errors``, and ``backbone``
        holds their ``rel_error`` and ``leaves``; ``rel_error`` is the compared output leaves'
        error, or the backbone's when no output leaf was comparable.
    """
    main, features = OutputDiff(), OutputDiff()
    for i in range(0, len(inputs), batch_size):
        x = inputs[i : i + batch_size]
        with captured_output(original, BACKBONE) as fa:
            a = original(x)
        with captured_output(decoupled, BACKBONE) as fb:
            b = decoupled(x)
        main.add(a, b, spatial=tuple(x.shape[2:]))
        if fa and fb:  # a backbone called more than once per pass: every call, in order
            features.add(
                fa[0] if len(fa) == 1 else fa, fb[0] if len(fb) == 1 else fb, None, BACKBONE
            )
        del a, b, fa, fb  # a detector's features at 800 px are hundreds of MB per batch
    out = main.to_dict()
    if main.not_comparable and features.leaves:
        out["backbone"] = {"rel_error": features.rel_error(), "leaves": features.leaves}
        out["leaves"] = out["leaves"] + features.leaves
        out["leaf_errors"].update({p: features.rel_error([p]) for p in features.leaves})
        if out["rel_error"] is None:
            out["rel_error"] = features.rel_error()
    out["batch"] = int(len(inputs))
    return out


def _reasons(bad: dict[str, str]) -> str:
    """``3 leaves not comparable: shapes differ`` (the kinds counted when mixed)."""
    kinds: dict[str, int] = {}
    for why in bad.values():
        kind = why.split(" (")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    text = ", ".join(k if len(kinds) == 1 else f"{n} {k}" for k, n in kinds.items())
    return f"{len(bad)} {LEAVES[len(bad) != 1]} not comparable: {text}"


def summary_lines(o: dict) -> list[str]:
    """The report's lines on the output check of ``o`` (:func:`compare_models` with ``inputs``).

    One tensor keeps the line it always had: ``output: relative error 0.0123 on 8 random
    Gaussian inputs, top-1 agreement 99.6 %``. Otherwise the line names the leaves compared
    (``over 2 leaves (out, aux)``) and those that were not; a detector's says
    ``detections are data-dependent; compared the backbone features (5 leaves) and matched
    boxes`` and a second line gives the matching.
    """
    inputs = o.get("inputs", f"a batch of {o['batch']}")
    agree = ""
    if "argmax_agreement" in o:
        agree = f", top-1 agreement {100 * o['argmax_agreement']:.1f} %"
    bb, bad, det = o.get("backbone"), o.get("not_comparable", {}), o.get("detections")
    own = [p for p in o.get("leaves", [ROOT]) if not bb or p not in bb["leaves"]]
    if own == [ROOT] and not bad and not bb:  # one tensor: the line it always was
        return [f"output: relative error {o['rel_error']:.4g} on {inputs}{agree}"]
    pixels = o.get("pixel_agreement", {})
    if pixels:
        agree += ", per-pixel argmax agreement " + ", ".join(
            f"{100 * v:.1f} % ({p})" for p, v in pixels.items()
        )
    why = "detections are data-dependent" if det else _reasons(bad)
    if own:
        line = (
            f"output: relative error {o['rel_error']:.4g} over {count_leaves(own, LEAVES)} "
            f"on {inputs}{agree}" + (f"; {why}" if bad else "")
        )
        if bb:
            line += (
                f"; backbone features ({count_leaves(bb['leaves'], LEAVES)}): relative error "
                f"{bb['rel_error']:.4g}"
            )
    elif bb:
        line = (
            f"output: {why}; compared the backbone features ({len(bb['leaves'])} "
            f"{LEAVES[len(bb['leaves']) != 1]}){' and matched boxes' if det else ''} on "
            f"{inputs}: features' relative error {bb['rel_error']:.4g}"
        )
    else:
        line = f"output: nothing comparable ({why}) on {inputs}"
    lines = [line]
    if det:
        frac, diff = det["matched_fraction"], det["mean_score_diff"]
        lines.append(
            f"detections: {det['before']:,} -> {det['after']:,} boxes over {det['sets']} "
            f"image(s); {det['matched']:,} matched at IoU >= {det['iou']:g} with the same label"
            + (f" ({100 * frac:.1f} % of the original's)" if frac is not None else "")
            + (f", mean |score difference| {diff:.3g}" if diff is not None else "")
        )
    return lines


def squared_change(reference, other) -> tuple[float, float]:
    """``(Σ‖a − b‖², Σ‖a‖²)`` over the leaves of two outputs comparable element by element
    (:class:`OutputDiff`'s rule: leaves whose shapes differ and detections are left out)."""
    diff = OutputDiff()
    diff.add(reference, other)
    return sum(diff.sq_diff.values()), sum(diff.sq_norm.values())


# An output that moves by less than this many float epsilons while a decoupled layer's kernel
# moved by more than INSENSITIVE_KERNEL does not depend on the decoupled layers.
INSENSITIVE_EPS, INSENSITIVE_KERNEL = 100, 1e-3


def insensitive_note(o: dict, kernel_error: float, dtype: torch.dtype) -> str | None:
    """A note when the output of ``o`` (:func:`compare_models`) moved by float noise only though
    a decoupled kernel moved by ``kernel_error`` (e.g. a zero-initialised last BatchNorm in
    every block): the check then says nothing about the decoupled layers."""
    err = o.get("rel_error")
    noise = INSENSITIVE_EPS * torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    if err is None or kernel_error <= INSENSITIVE_KERNEL or err >= noise:
        return None
    return (
        f"output check: the output moved by {err:.2g} (float noise) although a decoupled "
        f"layer's kernel moved by {kernel_error:.2g}: the output does not depend on the "
        "decoupled layers on these inputs (a zero-initialised BatchNorm?), so this check says "
        "nothing about their accuracy"
    )

"""What a decoupling gained and lost: per-layer error, params, FLOPs, and the model's output error.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one forward pass of a single
input of the given shape (batch 1), so they are what PyTorch actually dispatches, per module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from torch import nn

from .calibrate.bn_bias import bias_correction_line
from .calibrate.head_distill import head_line
from .calibrate.synthetic import synthetic_line
from .io.paired_change import accuracy_line
from .nn.flops import count_flops
from .nn.output_diff import compare_models, insensitive_note, summary_lines
from .nn.stopwatch import timings_line
from .predicted_speed import faster, predicted_line
from .surgery.rewrite import LayerRecord

RANDOM_INPUTS = "random Gaussian inputs (no images given; the agreement on real images can differ)"
_TABLES = {"measured": "timings", "predicted": "predictions of the cost model"}
# A plan is said to wreck the model when its output check, on real images, keeps fewer top-1
# predictions than this, or (on any inputs) its output error is as large as the output itself.
WRECK_AGREEMENT, WRECK_ERROR = 0.5, 1.0


def output_error(
    original: nn.Module, decoupled: nn.Module, inputs: torch.Tensor, batch_size: int = 32
) -> dict:
    """Compare the two models' outputs on ``inputs``, leaf by leaf, whatever their structure.

    ``rel_error`` is the relative Frobenius error over the leaves compared (``leaves``; each
    one's in ``leaf_errors``); leaves that cannot be compared (``not_comparable``: shapes that
    depend on the data, a structure that differs, detections) are named with the reason, and
    then a ``backbone`` submodule's outputs are compared too. Class logits add
    ``argmax_agreement``; see :mod:`decouple.nn.output_diff` for the whole rule. The inputs go
    through in mini-batches: 256 ImageNet-size images at once would take gigabytes.
    """
    return compare_models(original, decoupled, inputs, batch_size)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class Report:
    """Everything a decoupling run measured; serialises to JSON and Markdown."""

    layers: list[LayerRecord]
    input_shape: tuple[int, ...]
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    output: dict
    extra: dict = field(default_factory=dict)

    @property
    def decoupled(self) -> list[LayerRecord]:
        return [r for r in self.layers if r.action == "decoupled"]

    def totals(self) -> dict:
        dec = self.decoupled
        conv_before = sum(r.flops_before or 0 for r in dec)
        conv_after = sum(r.flops_after or 0 for r in dec)
        pruned = sum(r.action == "pruned" for r in self.layers)
        return {
            "layers_decoupled": len(dec),
            "layers_pruned": pruned,
            "layers_kept": len(self.layers) - len(dec) - pruned,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "params_ratio": _ratio(self.params_before, self.params_after),
            "flops_before": self.flops_before,
            "flops_after": self.flops_after,
            "flops_ratio": _ratio(self.flops_before, self.flops_after),
            "decoupled_layers_flops_before": conv_before,
            "decoupled_layers_flops_after": conv_after,
            "decoupled_layers_flops_ratio": _ratio(conv_before, conv_after),
        }

    def wrecked(self) -> str | None:
        """Why the output check says this plan wrecks the model, or None."""
        o = self.output
        agree = o.get("argmax_agreement")
        if agree is not None and RANDOM_INPUTS not in o["inputs"] and agree < WRECK_AGREEMENT:
            return f"top-1 agrees with the original's on only {100 * agree:.1f} % of {o['inputs']}"
        if o.get("rel_error") is not None and o["rel_error"] >= WRECK_ERROR:
            return f"the output's relative error is {o['rel_error']:.3g} on {o['inputs']}"
        return None

    def to_dict(self) -> dict:
        return {
            "input_shape": list(self.input_shape),
            "totals": self.totals(),
            "output": self.output,
            **self.extra,
            "layers": [r.to_dict() for r in self.layers],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table_rows(self) -> list[list[str]]:
        timed = any(r.latency_before_ms is not None for r in self.layers)
        rows = [["layer", "shape", "method", "rank", "rel err", "params", "MFLOPs", "note"]]
        if timed:
            rows[0].insert(7, "ms (alone)")
        for r in self.layers:
            k = "linear" if r.kind == "linear" else "x".join(map(str, r.kernel_size))
            shape = f"{r.in_channels}->{r.out_channels} {k}" + (
                f" s{r.stride[0]}" if r.stride[0] > 1 else ""
            )
            if r.groups > 1:
                shape += f" g{r.groups}"
            dec = r.action in ("decoupled", "pruned")
            resized = dec or r.params_after != r.params_before  # a pruned chain's consumer
            note = r.reason + (f"; BN {r.bn_folded} folded" if r.bn_folded else "")
            if r.fused:  # its shape is the fused conv's: the pair it replaced had one more layer
                note += "; exactly fused with " + ", ".join(r.fused) + " (linear 1x1 pair)"
            if dec and r.realization and r.realization not in r.reason:
                note += f"; runs as {r.realization}"
            row = [
                r.name,
                shape,
                _method_text(r) if dec else "-",
                (r.rank_text or f"{r.rank}/{r.max_rank}") if dec else "-",
                f"{r.rel_error:.4f}" if dec and r.rel_error is not None else "-",
                f"{r.params_before:,} -> {r.params_after:,}" if resized else f"{r.params_before:,}",
                _mflops(r.flops_before, r.flops_after) if resized else _mflops(r.flops_before),
                note,
            ]
            if timed:
                row.insert(7, _ms(r.latency_before_ms, r.latency_after_ms if dec else None))
            rows.append(row)
        return rows

    def summary_lines(self) -> list[str]:
        t = self.totals()
        what = "layers" if any(r.kind == "linear" for r in self.layers) else "convs"
        lines = [
            f"decoupled {t['layers_decoupled']} of {len(self.layers)} {what}"
            + (f", pruned the channels of {t['layers_pruned']}" if t["layers_pruned"] else "")
            + f" (FLOPs at input {tuple(self.input_shape)}, batch 1)",
            f"params: {t['params_before']:,} -> {t['params_after']:,} ({_fewer(t['params_ratio'])})",
            f"FLOPs:  {t['flops_before']:,} -> {t['flops_after']:,} ({_fewer(t['flops_ratio'])}"
            + (
                f"; decoupled layers alone {_fewer(t['decoupled_layers_flops_ratio'])})"
                if t["layers_decoupled"]
                else ")"
            ),
            *summary_lines(self.output),
            *([self.output["insensitive"]] if self.output.get("insensitive") else []),
        ]
        if acc := self.extra.get("accuracy"):
            n = _counted(acc["before"]["n"], acc.get("data", "images"))
            lines.append(accuracy_line(acc, n))
        lat = self.extra.get("latency")
        if lat:
            b, a = lat["before"], lat["after"]
            device = lat["device"]
            if device == "cpu" and lat.get("processor"):
                device += f" ({lat['processor']})"
            lines.append(
                f"latency: {b['median_ms']:.2f} ms -> {a['median_ms']:.2f} ms "
                f"({faster(lat['speedup'])}; {lat['runtime']} on {device}, "
                f"{lat['threads']} threads, batch {lat['batch']}; medians, IQR "
                f"{b['iqr_ms']:.2f} / {a['iqr_ms']:.2f} ms)"
            )
        pred = self.extra.get("predicted_speed")
        if pred:
            lines.append(predicted_line(pred, measured=bool(lat)))
        lalloc = self.extra.get("latency_allocation")
        if lalloc:
            if lalloc["reached"]:
                state = "reached"
            elif any(m != "keep" for m in lalloc["methods"].values()):
                state = "NOT reached; the fastest plan kept"
            else:
                state = "NOT reached; no plan ran faster than the original, so nothing changed"
            tries = len(lalloc.get("steps", [])) or 1
            flops_kept = lalloc.get("priced") == "FLOPs"
            lines.append(
                f"latency budget: {lalloc['target_ms']:.2f} ms of {lalloc['model_ms']:.2f} ms "
                f"({state}): measured {lalloc['measured_ms']:.2f} ms, planned "
                f"{lalloc['planned_ms']:.2f} ms from per-layer "
                f"{_TABLES[lalloc.get('layer_table', 'measured')]} ({tries} plan(s) timed "
                f"whole{'; the one kept was allocated by FLOPs' if flops_kept else ''}"
                f"{_retimed(lalloc)}); ranks chosen by {lalloc['criterion']}"
                + (f", in multiples of {m}" if (m := lalloc.get("rank_multiple", 1)) > 1 else "")
            )
        reals = self.extra.get("realizations")
        if reals:
            counts: dict[str, int] = {}
            for c in reals.values():
                counts[c["chosen"]] = counts.get(c["chosen"], 0) + 1
            kept = counts.pop("original", 0)
            parts = [f"{n} {k}" for k, n in sorted(counts.items())]
            if kept:
                parts.append(f"{kept} layer(s) kept: not faster than the original conv")
            lines.append("realizations: " + "; ".join(parts))
        check = self.extra.get("realization_check")
        if check:
            ms = check["whole_model_ms"]
            others = ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items() if k != check["kept"])
            lines.append(
                f"whole-model check: kept {check['kept']} ({ms[check['kept']]:.2f} ms; {others})"
            )
        alloc = self.extra.get("allocation")
        if alloc:
            state = "reached" if alloc["reached"] else "NOT reachable; cheapest ranks used"
            lines.append(
                f"budget: {alloc['target_flops']:,} FLOPs ({state}); "
                f"planned {alloc['planned_flops']:,} with per-layer ranks chosen by {alloc['criterion']}"
            )
            if uni := alloc.get("uniform_baseline"):  # the obvious baseline, by the same loss
                lines.append(
                    f"uniform baseline: {uni['plan']} has predicted loss {uni['loss']:.4g}; "
                    + ("taken: below the per-layer allocation's" if uni["taken"] else
                       f"not taken: this plan's is {alloc['predicted_loss']:.4g}")
                )  # fmt: skip
        chosen = (alloc or lalloc or {}).get("methods") or {}
        counts: dict[str, int] = {}
        for m in chosen.values():  # "nd dw-pw T=3" -> "nd dw-pw", "cp R=4" -> "cp", "keep"
            kind = "kept" if m == "keep" else m.rsplit(" ", 1)[0]
            counts[kind] = counts.get(kind, 0) + 1
        if len(set(counts) - {"kept"}) > 1:  # only worth a line when methods were mixed
            lines.append(
                "methods chosen per layer: "
                + ", ".join(f"{k} {n}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
                + " (why: each layer's note)"
            )
        change = self.extra.get("max_change")
        if change:
            lines.append(
                f"max change: top-1 differs from the original's on {change['changed_pct']:.2f} % "
                f"of {change['measured_on']} held-out calibration images (allowed "
                f"{change['max_change']:g} %{'; NOT reached, the closest plan kept' if change.get('missed') else ''}) "
                f"at {change['cost']} budget {change['budget']:g} "
                f"({len(change['tries'])} plans tried; chosen and refit on the other "
                f"{change['decided_on']} images)"
            )
        calib = self.extra.get("calibration")
        if calib:
            modes = {}
            for c in calib:
                modes[c["mode"]] = modes.get(c["mode"], 0) + 1
            before = sum(c["error_before"] for c in calib) / len(calib)
            after = sum(c["error_after"] for c in calib) / len(calib)
            kinds = ", ".join(f"{n} {m}" for m, n in sorted(modes.items()))
            lines.append(
                f"calibration: {len(calib)} layers refit on {self.extra.get('calibration_images', '?')} "
                f"images ({kinds}); mean held-out layer error {before:.3f} -> {after:.3f}"
            )
        if head := self.extra.get("head_distillation"):
            lines.append(head_line(head))
        if (bias := self.extra.get("bias_correction")) and self.decoupled:
            lines.append(bias_correction_line(bias))
        made = self.extra.get("synthetic_calibration")
        if made:  # --calib synthetic: no image of the user's was seen
            lines.append(synthetic_line(made))
        stuck = [r.name for r in self.decoupled if r.converged is False]
        if stuck:
            lines.append(
                f"CP-ALS did not converge in {len(stuck)} layer(s) (the rank is used as reached): "
                + ", ".join(stuck)
            )
        if self.extra.get("bn_fold_error"):
            lines.append(f"BatchNorm folding not applied: {self.extra['bn_fold_error']}")
        if self.extra.get("timings"):
            lines.append(timings_line(self.extra["timings"]))
        return lines

    def to_text(self) -> str:
        rows = self.table_rows()
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        left = (0, 1, len(widths) - 1)  # name, shape and note read left to right
        fmt = "  ".join(f"{{:{'<' if i in left else '>'}{w}}}" for i, w in enumerate(widths))
        lines = [fmt.format(*row).rstrip() for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(lines + [""] + self.summary_lines())

    def to_markdown(self) -> str:
        rows = self.table_rows()
        out = ["# Decoupling report", ""]
        out += [f"- {line}" for line in self.summary_lines()]
        out += ["", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows[1:]]
        return "\n".join(out) + "\n"


def _retimed(lalloc: dict) -> str:
    """What timing the picked plan again afresh did (see ``confirmed_pick``)."""
    again, target = lalloc.get("retimed") or [], lalloc["target_ms"]
    over = sum(r["retimed_ms"] > target for r in again)
    return f"; {len(again)} re-timed afresh before keeping, {over} over the target" if again else ""


def _method_text(r: LayerRecord) -> str:
    method = r.method or "nd"
    return f"nd {r.order}" if method == "nd" else method


def _ms(before: float | None, after: float | None) -> str:
    if before is None:
        return "-"
    return f"{before:.3f}" if after is None else f"{before:.3f} -> {after:.3f}"


def _ratio(before: int, after: int) -> float:
    return before / after if after else float("inf")


def _fewer(ratio: float) -> str:
    return f"{ratio:.2f}x fewer" if ratio >= 1 else f"{1 / ratio:.2f}x more"


def _mflops(before: int | None, after: int | None = None) -> str:
    if before is None:
        return "-"
    if after is None:
        return f"{before / 1e6:.2f}"
    return f"{before / 1e6:.2f} -> {after / 1e6:.2f}"


def build_report(
    original: nn.Module,
    decoupled: nn.Module,
    records: list[LayerRecord],
    input_shape: tuple[int, ...],
    inputs: torch.Tensor | None = None,
    extra: dict | None = None,
    inputs_name: str | None = None,
) -> Report:
    """Measure ``decoupled`` against ``original`` and fill the FLOPs of ``records``.

    Parameters
    ----------
    original, decoupled : nn.Module
        The model before and after :func:`decouple.decouple_` (both in eval mode).
    records : list of LayerRecord
        As returned by :func:`decouple.decouple_`; updated in place with per-layer FLOPs.
    input_shape : tuple of int
        One sample's shape ``(C, H, W)``; FLOPs are for a batch of one.
    inputs : torch.Tensor, optional
        Batch on which the outputs are compared; default 8 standard-normal samples (seed 0),
        which the report says (``output.inputs``): the agreement on real images can differ.
        The outputs may have any structure: compared leaf by leaf (:func:`output_error`).
    extra : dict, optional
        Added to the report as it is; ``extra["output_check_inputs"]`` names ``inputs`` when
        ``inputs_name`` is not given.
    inputs_name : str, optional
        What ``inputs`` are, e.g. ``"--data images"``: the report says "on 256 --data images".
    """
    device = next(original.parameters()).device
    dtype = next(original.parameters()).dtype
    example = torch.zeros((1, *input_shape), device=device, dtype=dtype)
    flops_before, per_before = count_flops(original, example)
    flops_after, per_after = count_flops(decoupled, example)
    for r in records:
        r.flops_before = per_before.get(r.name)
        r.flops_after = per_after.get(r.name)
    extra = dict(extra or {})
    if inputs is None:
        gen = torch.Generator().manual_seed(0)
        inputs = torch.randn((8, *input_shape), generator=gen, dtype=dtype).to(device)
        source = f"{len(inputs)} {RANDOM_INPUTS}"
    else:
        name = inputs_name or extra.get("output_check_inputs") or "given inputs"
        source = _counted(len(inputs), str(name))
    output = {**output_error(original, decoupled, inputs), "inputs": source}
    kernel = max((r.rel_error or 0.0 for r in records if r.action == "decoupled"), default=0.0)
    note = insensitive_note(output, kernel, dtype)
    if note:
        output["insensitive"] = note
    return Report(
        layers=records,
        input_shape=tuple(input_shape),
        params_before=_n_params(original),
        params_after=_n_params(decoupled),
        flops_before=flops_before,
        flops_after=flops_after,
        output=output,
        extra=extra,
    )


def _counted(n: int, name: str) -> str:
    """``16 images from x.pt`` as it is; ``CIFAR-10 test images`` as ``1017 CIFAR-10 ...``."""
    return name if str(n) in name.split() else f"{n} {name}"  # "the first 256 ..." has it

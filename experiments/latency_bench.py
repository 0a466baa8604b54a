"""Measured speedup of decoupled torchvision models against their FLOPs ratio.

For each model (``weights=None``: speed does not depend on the weights' values), batch size and
runtime, the BN-folded original is timed, then every k×k conv but the stem is decoupled at
``T = 1..4`` in both orders and timed twice:

* ``naive``: every layer in the two-conv ``grouped`` realization;
* ``aware``: every layer in its fastest realization on this runtime and input shape, and the
  original conv back wherever nothing beat it by 5 % (``decouple.runtime.realize.choose_realizations_``),
  then the choice checked on the whole model against one realization throughout
  (``confirm_on_model_``; ``whole_model_check`` says which was kept).

After the choice, each layer that stayed decoupled is timed once more against its original conv
(``recheck_slower``: how many came out slower than their conv on that second look;
``recheck_worst``: the largest ratio of a layer's time to its conv's). The FLOPs ratio (``FlopCounterMode``, batch 1) is the physical
reference: a speedup equal to it would mean the runtime turns every saved FLOP into time.

Writes ``results/latency.csv`` (one row per model, batch, runtime, order, T), the plot
``results/latency_vs_flops.png`` and ``results/latency.md``. Rows are appended as they are
measured and an interrupted run resumes where it stopped (``--fresh`` starts over).

Run (about three and a half hours on 2 cores, most of it VGG-16 at batch 8; ``--quick``:
ResNet-18, batch 1, T=2, dw-pw, about a minute, into a new temporary folder, never results/;
``--runtimes channels-last`` adds that runtime's rows to the same table)::

    pip install -e '.[dev,vision]' && python experiments/latency_bench.py
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import onnxruntime
import torch
import torchvision
from experiment_io import output_folder, progress

from decouple import DecoupleConfig, decouple_
from decouple.nn.flops import count_flops
from decouple.runtime.latency import LatencyConfig, capture_inputs, cpu_name, fastest, prepare
from decouple.runtime.realize import (
    ORIGINAL,
    choose_realizations_,
    confirm_on_model_,
    factored_names,
    time_candidates,
)
from decouple.surgery.bn_fold import fold_batchnorm_

STEMS = {"resnet18": "conv1", "resnet50": "conv1", "vgg16": "features.0"}
FIELDS = [
    "model", "batch", "runtime", "order", "rank", "threads", "flops_before", "flops_naive",
    "flops_aware", "flops_ratio_naive", "flops_ratio_aware", "ms_before", "ms_naive", "ms_aware",
    "speedup_naive", "speedup_aware", "frac_of_flops_naive", "frac_of_flops_aware",
    "layers_decoupled", "layers_kept_not_faster", "realizations", "recheck_slower", "recheck_worst",
    "whole_model_check", "seconds",
]  # fmt: skip


def key_of(row: dict) -> tuple:
    return (row["model"], str(row["batch"]), row["runtime"], row["order"], str(row["rank"]))


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: list[dict]) -> None:
    """Atomically: a temp file beside ``path``, then a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def build(name: str) -> torch.nn.Module:
    model = getattr(torchvision.models, name)(weights=None).eval()
    fold_batchnorm_(model)  # the baseline gets the same free BN folding as the decoupled model
    return model


def recheck(model, originals, example, cfg: LatencyConfig) -> tuple[int, float]:
    """Layers still decoupled that time slower than their original conv on a second look, and
    the worst ratio of a layer's time to its conv's (0 when no layer is decoupled)."""
    names = factored_names(model)
    inputs = capture_inputs(model, names, example)
    ratios = []
    for n in names:
        times = time_candidates(
            {"layer": model.get_submodule(n), ORIGINAL: originals[n]},
            inputs[n], cfg.runtime, cfg.layer_rounds, cfg.layer_min_run_time, cfg.threads,
        )  # fmt: skip
        ratios.append(times["layer"] / times[ORIGINAL])
    return sum(r > 1 for r in ratios), max(ratios, default=0.0)


def run_one(model_name, base, base_prep, batch, runtime, order, rank, cfg) -> dict:
    t0 = time.time()
    example = cfg.example((3, 224, 224))
    one = example[:1]
    stem = STEMS[model_name]
    naive = copy.deepcopy(base)
    originals = {n: m for n, m in naive.named_modules() if isinstance(m, torch.nn.Conv2d)}
    records = decouple_(naive, DecoupleConfig(rank=rank, order=order, overrides={stem: "skip"}))
    aware = copy.deepcopy(naive)
    aware_originals = {n: originals[n] for n in factored_names(aware)}
    choices = choose_realizations_(
        aware, aware_originals, example, runtime, cfg.layer_rounds, cfg.layer_min_run_time,
        min_gain=cfg.min_gain,
    )  # fmt: skip
    whole = confirm_on_model_(aware, choices, example, runtime, 2, cfg.min_run_time)
    # The three models side by side, interleaved over rounds, each keeping its best median.
    prepared = {
        "base": base_prep,
        "naive": prepare(naive, example, runtime),
        "aware": prepare(aware, example, runtime),
    }
    ms = fastest(prepared, rounds=2, min_run_time=cfg.min_run_time)
    base_ms, ms_naive, ms_aware = ms["base"], ms["naive"], ms["aware"]
    f0, fn, fa = (count_flops(m, one)[0] for m in (base, naive, aware))
    counts = Counter(c.chosen for c in choices.values())
    slower, worst = recheck(aware, aware_originals, example, cfg)
    row = {
        "model": model_name, "batch": batch, "runtime": runtime, "order": order, "rank": rank,
        "threads": torch.get_num_threads(), "flops_before": f0, "flops_naive": fn,
        "flops_aware": fa, "flops_ratio_naive": round(f0 / fn, 3),
        "flops_ratio_aware": round(f0 / fa, 3), "ms_before": round(base_ms, 3),
        "ms_naive": round(ms_naive, 3), "ms_aware": round(ms_aware, 3),
        "speedup_naive": round(base_ms / ms_naive, 3), "speedup_aware": round(base_ms / ms_aware, 3),
        "frac_of_flops_naive": round((base_ms / ms_naive) / (f0 / fn), 3),
        "frac_of_flops_aware": round((base_ms / ms_aware) / (f0 / fa), 3),
        "layers_decoupled": sum(r.action == "decoupled" for r in records) - counts[ORIGINAL],
        "layers_kept_not_faster": counts[ORIGINAL],
        "realizations": " ".join(f"{k}:{v}" for k, v in sorted(counts.items()) if k != ORIGINAL),
        "recheck_slower": slower, "recheck_worst": round(worst, 3),
        "whole_model_check": min(whole, key=whole.get) if whole else "", "seconds": round(time.time() - t0, 1),
    }  # fmt: skip
    return row


def plot(rows: list[dict], path: Path) -> None:
    """Measured speedup against the FLOPs ratio: one panel per batch size and runtime."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runtimes = sorted({r["runtime"] for r in rows})
    batches = sorted({int(r["batch"]) for r in rows})
    fig, axes = plt.subplots(
        len(batches), len(runtimes), figsize=(5.5 * len(runtimes), 4.4 * len(batches)),
        squeeze=False,
    )  # fmt: skip
    marks = {"resnet18": "o", "resnet50": "s", "vgg16": "^"}
    top = max(float(r["flops_ratio_naive"]) for r in rows) * 1.05
    for axrow, batch in zip(axes, batches, strict=True):
        for ax, rt in zip(axrow, runtimes, strict=True):
            mine = [r for r in rows if r["runtime"] == rt and int(r["batch"]) == batch]
            ax.plot([1, top], [1, top], "k-", lw=1, label="speedup = FLOPs ratio (reference)")
            ax.plot([1, top], [0.7, 0.7 * top], "k:", lw=1, label="0.7 x FLOPs ratio")
            ax.axhline(1, color="grey", lw=0.6)
            for variant in ("naive", "aware"):
                for m, mk in marks.items():
                    pts = [r for r in mine if r["model"] == m]
                    if not pts:
                        continue
                    x = [float(r[f"flops_ratio_{variant}"]) for r in pts]
                    y = [float(r[f"speedup_{variant}"]) for r in pts]
                    style = (
                        {"facecolors": "none", "edgecolors": "C0"}
                        if variant == "naive"
                        else {"c": "C1"}
                    )
                    ax.scatter(x, y, marker=mk, label=f"{m} {variant}", **style)
            ax.set_title(f"{rt}, batch {batch} (T=1..4, both orders)")
            ax.set_xlabel("FLOPs ratio (original / decoupled)")
            ax.set_ylabel("measured speedup")
            ax.set_xlim(0.9, top)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(rows: list[dict]) -> list[str]:
    """The issue's two checks, from the rows: batch 1, T=2 and 3, ResNet-18 and VGG-16."""
    out = [
        "## At batch 1, T=2 and 3: the best runtime per model, T and order",
        "",
        "`aware / FLOPs` is the measured speedup of the latency-aware model over the FLOPs ratio "
        "of that same model (layers kept as their original conv save no FLOPs); `aware / asked` "
        "divides by the FLOPs ratio of decoupling every layer as asked.",
        "",
        "| model | T | order | best runtime | speedup | FLOPs ratio (aware) | aware / FLOPs "
        "| FLOPs ratio (asked) | aware / asked | ≥ 0.7 of both |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model in ("resnet18", "vgg16", "resnet50"):
        for t in ("2", "3"):
            for order in ("dw-pw", "pw-dw"):
                mine = [
                    r
                    for r in rows
                    if (r["model"], str(r["batch"]), str(r["rank"]), r["order"])
                    == (model, "1", t, order)
                ]
                if not mine:
                    continue
                best = max(mine, key=lambda r: float(r["speedup_aware"]))
                frac = float(best["frac_of_flops_aware"])
                asked = float(best["speedup_aware"]) / float(best["flops_ratio_naive"])
                out.append(
                    f"| {model} | {t} | {order} | {best['runtime']} "
                    f"| {float(best['speedup_aware']):.2f} | {float(best['flops_ratio_aware']):.2f} "
                    f"| {frac:.2f} | {float(best['flops_ratio_naive']):.2f} | {asked:.2f} "
                    f"| {'yes' if min(frac, asked) >= 0.7 else 'no'} |"
                )
    layers = sum(int(r["layers_decoupled"]) for r in rows)
    slower = sum(int(r["recheck_slower"]) for r in rows)
    worst = max((float(r["recheck_worst"]) for r in rows if r.get("recheck_worst")), default=0)
    out += [
        "",
        f"Layers left decoupled by the latency-aware choice, over all rows: {layers}. Timed again "
        f"against their original conv after the choice, {slower} of them came out slower; the "
        f"largest ratio of a decoupled layer's time to its conv's was {worst:.2f}.",
    ]
    return out


def markdown(rows: list[dict]) -> str:
    out = [
        "# Latency of decoupled torchvision models",
        "",
        "Written by `experiments/latency_bench.py`; do not edit by hand. "
        f"Machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}. Speedups are "
        "against the BN-folded original in the same runtime, all three models timed side by "
        "side in interleaved rounds; FLOPs ratios at batch 1 (FlopCounterMode). `naive`: every "
        "layer as two plain convs; `aware`: every layer in its fastest realization, or its "
        "original conv where nothing was faster.",
        "",
        *summary(rows),
        "",
        "![speedup vs FLOPs ratio](latency_vs_flops.png)",
        "",
        "## Every run",
        "",
        "| model | batch | runtime | order | T | ms before | FLOPs ratio | speedup naive "
        "| FLOPs ratio aware | speedup aware | aware / FLOPs | kept: not faster | realizations |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    models = list(STEMS)
    for r in sorted(rows, key=lambda r: (models.index(r["model"]), int(r["batch"]), r["runtime"],
                                         r["order"], int(r["rank"]))):  # fmt: skip
        out.append(
            f"| {r['model']} | {r['batch']} | {r['runtime']} | {r['order']} | {r['rank']} "
            f"| {float(r['ms_before']):.1f} "
            f"| {float(r['flops_ratio_naive']):.2f} | {float(r['speedup_naive']):.2f} "
            f"| {float(r['flops_ratio_aware']):.2f} | {float(r['speedup_aware']):.2f} "
            f"| {float(r['frac_of_flops_aware']):.2f} | {r['layers_kept_not_faster']} "
            f"| {r['realizations']} |"
        )
    return "\n".join(out) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; ``--quick`` writes into a new temp folder unless ``--out`` is given."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,vgg16,resnet50")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--ranks", default="1,2,3,4")
    ap.add_argument("--orders", default="dw-pw,pw-dw")
    ap.add_argument("--runtimes", default="eager,onnxruntime")
    ap.add_argument("--out", default=None, help="default results/ (--quick: a new temp dir)")
    ap.add_argument("--quick", action="store_true", help="resnet18, batch 1, T=2, dw-pw, temp dir")
    ap.add_argument("--fresh", action="store_true", help="ignore rows already measured")
    ap.add_argument(
        "--report-only", action="store_true", help="redraw the plot and table from the CSV"
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.batches, args.ranks, args.orders = "resnet18", "1", "2", "dw-pw"
    args.out = output_folder(ap, args.out, "--quick" if args.quick else None, "latency_bench-")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "latency.csv"
    rows = [] if args.fresh else read_rows(csv_path)
    done = {key_of(r) for r in rows}
    quick = args.quick
    for model_name in [] if args.report_only else args.models.split(","):
        base = build(model_name)
        for runtime in args.runtimes.split(","):
            for batch in map(int, args.batches.split(",")):
                # At batch 8 a VGG-16 layer takes up to 0.4 s a call: one round of per-layer
                # timings there (the whole-model check and the recheck still follow).
                cfg = LatencyConfig(
                    runtime=runtime, batch=batch, min_run_time=0.2 if quick else 0.5,
                    layer_rounds=2 if batch == 1 else 1, layer_min_run_time=0.02 if quick else 0.04,
                )  # fmt: skip
                todo = [
                    (o, t)
                    for o in args.orders.split(",")
                    for t in map(int, args.ranks.split(","))
                    if (model_name, str(batch), runtime, o, str(t)) not in done
                ]
                if not todo:
                    continue
                base_prep = prepare(base, cfg.example((3, 224, 224)), runtime)
                for order, rank in progress(todo, f"{model_name} b{batch} {runtime}"):
                    row = run_one(model_name, base, base_prep, batch, runtime, order, rank, cfg)
                    rows.append(row)
                    write_rows(csv_path, rows)
                    print(
                        f"{model_name} b{batch} {runtime} {order} T={rank}: FLOPs "
                        f"{row['flops_ratio_naive']:.2f}x, naive {row['speedup_naive']:.2f}x, "
                        f"aware {row['speedup_aware']:.2f}x at FLOPs {row['flops_ratio_aware']:.2f}x "
                        f"({row['frac_of_flops_aware']:.2f} of it; kept {row['layers_kept_not_faster']}, "
                        f"slower on recheck {row['recheck_slower']}) [{row['seconds']} s]",
                        flush=True,
                    )
    rows = read_rows(csv_path)
    plot(rows, out / "latency_vs_flops.png")
    (out / "latency.md").write_text(markdown(rows))
    print(f"wrote {csv_path}, latency_vs_flops.png, latency.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

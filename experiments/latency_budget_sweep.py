"""Latency budgets on the real pretrained CIFAR-10 ResNets: measured speedup and top-1 together.

``--target-latency R`` chooses each layer's T and realization from per-layer latency tables
measured on the target runtime and batch, with the same energy criterion and greedy allocator as
``--target-flops``; calibration then refits every decoupled layer. For the shared ResNet-20 and
ResNet-32, each runtime (ONNX Runtime, eager PyTorch), batch size (1 and 32) and budget (0.6 of the
measured latency by default; ``--targets 0.7,0.5`` for others) this records

* the latency the plan expected and the latency measured afterwards, side by side with the
  BN-folded original in the same runtime (``decouple.runtime.latency.compare``);
* the FLOPs ratio (``FlopCounterMode``, one 3×32×32 image) and how many layers stayed exact;
* top-1 on the 1,017 exact-pixel test images before and after (calibration: 512 JPEG test images
  of index ≥ 1017, never the evaluation images).

Writes ``results/latency_budget.csv`` and ``results/latency_budget.md``. Needs ../shared/assets.

Run (about 20 minutes on 2 cores)::

    pip install -e '.[dev]' && python experiments/latency_budget_sweep.py
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from accuracy_sweep import SHAPE, SHARED, load_sets, write_csv  # the same data, the same split

from decouple import DecoupleConfig, count_flops
from decouple.io.checkpoint import load_model
from decouple.io.evaluate import evaluate
from decouple.models import get_model_info
from decouple.pipeline import compress_
from decouple.runtime.latency import LatencyConfig, compare, cpu_name
from decouple.surgery.bn_fold import fold_batchnorm_

ROOT = Path(__file__).resolve().parent.parent


def run_one(base, arch, runtime, batch, target, calib, images, labels, top1_before) -> dict:
    model = copy.deepcopy(base)
    latency = LatencyConfig(
        runtime=runtime,
        batch=batch,
        min_run_time=0.5,
        layer_rounds=2,
        layer_min_run_time=0.02,
        layer_table="measured",  # every layer timed, as when the results were written
    )
    start = time.perf_counter()
    result = compress_(
        model, DecoupleConfig(order="dw-pw", fold_bn=True), SHAPE, target_latency=target,
        latency=latency, calib_images=calib, refit="auto",
    )  # fmt: skip
    seconds = time.perf_counter() - start
    baseline = copy.deepcopy(base)
    fold_batchnorm_(baseline)  # the same free folding, so the speedup is the decoupling's
    measured = compare(baseline, model, latency.example(SHAPE), latency)
    plan = result.latency_plan.to_dict()
    f0, _ = count_flops(baseline, torch.zeros(1, *SHAPE))
    f1, _ = count_flops(model, torch.zeros(1, *SHAPE))
    top1 = 100 * evaluate(model, images, labels)["top1"]
    counts: dict[str, int] = {}
    for c in result.realizations.values():
        counts[c.chosen] = counts.get(c.chosen, 0) + 1
    decoupled = sum(r.action == "decoupled" for r in result.records)
    ms_before, ms_after = measured["before"]["median_ms"], measured["after"]["median_ms"]
    return {
        "model": arch.replace("cifar_", ""), "runtime": runtime, "batch": batch, "target": target,
        "ms_before": round(ms_before, 3), "ms_planned": round(plan["planned_ms"], 3),
        "ms_after": round(ms_after, 3), "speedup": round(measured["speedup"], 3),
        "table_planned_ms": round(plan["steps"][0]["planned_ms"], 3),
        "table_measured_ms": round(plan["steps"][0]["measured_ms"], 3),
        "tries": len(plan["steps"]),
        "within_budget": ms_after <= target * ms_before, "flops_ratio": round(f0 / f1, 3),
        "layers_decoupled": decoupled, "layers_exact": len(result.records) - decoupled,
        "realizations": " ".join(f"{k}:{v}" for k, v in sorted(counts.items())),
        "top1_before": round(top1_before, 2), "top1_after": round(top1, 2),
        "drop": round(top1 - top1_before, 2), "seconds": round(seconds, 1),
    }  # fmt: skip


def markdown(rows: list[dict]) -> str:
    out = [
        "# Latency budgets on the pretrained CIFAR-10 ResNets",
        "",
        "Written by `experiments/latency_budget_sweep.py`; do not edit by hand. Machine: "
        f"{cpu_name()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}. `--target-latency` with the energy criterion, dw-pw, "
        "calibrated on 512 JPEG test images; top-1 on the 1,017 exact-pixel test images. "
        "`ms before` is the BN-folded original, `ms after` the result, timed side by side in "
        "the same runtime. `first plan`: what the per-layer tables predicted for the first "
        "allocation and what it measured whole; `tries`: allocations timed whole; `kept plan`: "
        "the table's prediction for the plan kept (calibration changes weights, not speed).",
        "",
        "| model | runtime | batch | budget | ms before | first plan: table / measured | tries "
        "| kept plan | ms after | speedup | within budget | FLOPs ratio | exact layers "
        "| top-1 before | top-1 after | drop |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['model']} | {r['runtime']} | {r['batch']} | {r['target']} "
            f"| {float(r['ms_before']):.3f} | {float(r['table_planned_ms']):.3f} / "
            f"{float(r['table_measured_ms']):.3f} | {r['tries']} | {float(r['ms_planned']):.3f} "
            f"| {float(r['ms_after']):.3f} | {float(r['speedup']):.2f} | {r['within_budget']} "
            f"| {float(r['flops_ratio']):.2f} | {r['layers_exact']} | {r['top1_before']} "
            f"| {r['top1_after']} | {r['drop']} |"
        )
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", type=Path, default=None, help="the shared cifar10 folder")
    ap.add_argument("--runtimes", default="onnxruntime,eager")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--targets", default="0.6")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args(argv)
    assets, test, calib_set = load_sets(args.assets, 512)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for file, arch in SHARED:
        meta = get_model_info(arch).meta
        images = test.as_float(meta["mean"], meta["std"])
        calib = calib_set.as_float(meta["mean"], meta["std"])
        base, _, _ = load_model(str(assets / file), arch)
        top1_before = 100 * evaluate(base, images, test.labels)["top1"]
        for runtime in args.runtimes.split(","):
            for batch in map(int, args.batches.split(",")):
                for target in map(float, args.targets.split(",")):
                    row = run_one(
                        base, arch, runtime, batch, target, calib, images, test.labels,
                        top1_before,
                    )  # fmt: skip
                    rows.append(row)
                    print(
                        f"{row['model']} {runtime} b{batch} budget {target}: "
                        f"{row['ms_before']} -> {row['ms_after']} ms ({row['speedup']}x, planned "
                        f"{row['ms_planned']}), FLOPs {row['flops_ratio']}x, top-1 "
                        f"{row['top1_before']} -> {row['top1_after']} [{row['seconds']} s]",
                        flush=True,
                    )
    write_csv(rows, args.out / "latency_budget.csv")
    (args.out / "latency_budget.md").write_text(markdown(rows))
    print(f"wrote {args.out / 'latency_budget.csv'} and latency_budget.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Accuracy against FLOPs and measured ONNX Runtime speed: every method alone and ``auto``.

Run (needs ../shared/assets; about an hour on 2 cores):

    pip install -e '.[dev]' && python experiments/pareto_sweep.py

For the shared pretrained CIFAR-10 ResNet-20 and ResNet-32, every method alone (nd dw-pw, nd
pw-dw, cp, tucker) and ``auto`` (every method priced per layer, one allocation) under FLOPs
budgets, data-free (energy criterion) and calibrated (``--calib-sizes``, default 512 JPEG test
images of index >= 1017, a seeded draw; the ``output`` criterion). ``--models mbv2``: the shared
MobileNetV2-style network, whose only regular k×k conv is its stem (kept), so ``auto`` (``svd``
on the 1×1 convs and linear layers, and channel pruning when calibrated) and ``svd`` alone.
``--calib-sizes 2048 --methods auto --resume`` adds calibrated rows on 2,048 images beside
the others. Each result: top-1 on the 1,017 exact-pixel test images, FLOPs, and ONNX
Runtime latency at batch 1 and 32 timed side by side with the BN-folded original. Then ``auto``
under ``--target-latency 0.6`` in ONNX Runtime (batch 1 and 32) and ``--max-change 1``.

The rank correlation (Spearman) of each criterion's predicted loss (the sum of the chosen
options' per-layer losses) with top-1, over the calibrated and over the data-free plans, says
which loss ranks plans as their accuracy does.

Writes results/pareto.csv, results/pareto_rank_correlation.csv, results/pareto.md and
results/pareto_*.png. ``--quick`` (ResNet-20, budget 0.5, 64 calibration images, no latency
budget runs) writes into a new temporary folder unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import copy
import csv
import sys
import time
from pathlib import Path

import torch
from accuracy_sweep import SHAPE, SHARED, load_sets, write_csv
from experiment_io import output_folder, progress
from mbv2_accuracy import mbv2
from scipy.stats import spearmanr

from decouple import DecoupleConfig, count_flops
from decouple.agreement import compress_within_change_
from decouple.io.checkpoint import load_model
from decouple.io.evaluate import evaluate
from decouple.models import get_model_info
from decouple.pipeline import compress_
from decouple.plan.losses import CRITERIA
from decouple.plan.options import rank_options
from decouple.runtime.latency import LatencyConfig, compare, cpu_name
from decouple.runtime.realize import choose_realizations_
from decouple.surgery.bn_fold import fold_batchnorm_
from decouple.surgery.methods import FactorCache

ROOT = Path(__file__).resolve().parent.parent
# auto first: its plans and the targets after them answer the question; the rest compare.
METHODS = [
    ("auto", "dw-pw"),
    ("nd", "dw-pw"),
    ("nd", "pw-dw"),
    ("cp", "dw-pw"),
    ("tucker", "dw-pw"),
]
# The MobileNetV2-style network: its regular k×k conv is the stem, so the k×k methods alone
# change nothing; svd alone is the baseline auto is measured against.
MBV2_METHODS = [("auto", "dw-pw"), ("svd", "dw-pw")]
MODELS = {"20": "cifar_resnet20", "32": "cifar_resnet32", "mbv2": "cifar_mbv2"}
COLORS = {"auto": "C3", "cp": "C1", "nd dw-pw": "C0", "nd pw-dw": "C2", "tucker": "C4",
          "svd": "C5"}  # fmt: skip
STYLES = {0: ":x", 512: "-o", 2048: "--s"}  # data-free, and each calibration size
# every layer timed, as when the results were written (the default now predicts the table)
TIMING = {
    "min_run_time": 0.5,
    "layer_rounds": 2,
    "layer_min_run_time": 0.02,
    "layer_table": "measured",
}


def label(method: str, order: str) -> str:
    return f"nd {order}" if method == "nd" else method


def ort_speedups(baseline, model, batches=(1, 32)) -> dict:
    """ONNX Runtime speedup of ``model`` over ``baseline`` at each batch, timed side by side,
    every network-decoupled layer in its fastest realization there (no layer reverted)."""
    out = {}
    for b in batches:
        cfg = LatencyConfig(runtime="onnxruntime", batch=b, **TIMING)
        twin = copy.deepcopy(model)
        example = cfg.example(SHAPE)
        choose_realizations_(twin, {}, example, "onnxruntime", 2, TIMING["layer_min_run_time"])
        side = compare(baseline, twin, example, cfg)
        out[f"ms_b{b}"] = round(side["after"]["median_ms"], 3)
        out[f"ms_before_b{b}"] = round(side["before"]["median_ms"], 3)
        out[f"speedup_b{b}"] = round(side["speedup"], 3)
    return out


def calib_images(row: dict) -> int:
    """Calibration images of a row (0: data-free); rows written before the column had 512."""
    n = row.get("calib_images")
    if n not in (None, ""):
        return int(n)
    return 512 if row["calibrated"] else 0


def refit_label(row: dict) -> str:
    n = calib_images(row)
    return f"calibrated ({n})" if n else "data-free"


def predicted(choice, losses) -> dict:
    """Each criterion's predicted loss of a plan: the sum of its chosen options' losses (nan
    where an option is not among those priced per layer: a pruned chain's)."""
    out = {}
    for crit, options in losses.items():
        total = 0.0
        for name, o in choice.items():
            if o.rank:
                match = [
                    x
                    for x in options[name]
                    if (x.method, x.order, x.rank) == (o.method, o.order, o.rank)
                ]
                total += match[0].loss if match else float("nan")
        out[f"loss_{crit}"] = total
    return out


def run_plan(base, baseline, method, order, budget, calib, images, labels, flops0, cache, losses):
    model = copy.deepcopy(base)
    config = DecoupleConfig(order=order, method=method, fold_bn=True)
    start = time.perf_counter()
    result = compress_(
        model, config, SHAPE, target_flops=budget, criterion="output" if calib is not None else "energy",
        calib_images=calib, cache=cache,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    flops, _ = count_flops(model, torch.zeros(1, *SHAPE))
    kinds: dict[str, int] = {}
    for lbl in result.allocation.methods().values():
        k = "keep" if lbl == "keep" else lbl.rsplit(" ", 1)[0]
        kinds[k] = kinds.get(k, 0) + 1
    return {
        "flops": flops,
        "flops_ratio": round(flops0 / flops, 3),
        "top1": round(100 * evaluate(model, images, labels)["top1"], 2),
        "seconds": round(seconds, 1),
        "chosen": " ".join(f"{k}:{n}" for k, n in sorted(kinds.items())),
        **predicted(result.allocation.choice, losses),
        **ort_speedups(baseline, model),
    }


def spearman_rows(rows) -> list[dict]:
    """Per model and calibration size with at least 3 plans: each criterion's rank correlation
    with top-1, over the plans it priced (a pruned plan has no per-layer sum: left out)."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for n in sorted({calib_images(r) for r in rows if r["model"] == model}):
            pts = [r for r in rows if r["model"] == model and calib_images(r) == n
                   and r["scheme"] == "budget"]  # fmt: skip
            if len(pts) < 3:
                continue
            row = {"model": model, "calibrated": n > 0, "calib_images": n, "plans": len(pts)}
            for crit in CRITERIA:
                got = [r for r in pts if r[f"loss_{crit}"] == r[f"loss_{crit}"]]  # not nan
                if len(got) < 3:
                    row[f"rho_{crit}"] = ""
                    continue
                rho = spearmanr([r[f"loss_{crit}"] for r in got], [r["top1"] for r in got])[0]
                row[f"rho_{crit}"] = round(-float(rho), 3)  # higher loss, lower top-1: sign flipped
            if any(row[f"rho_{c}"] != "" for c in CRITERIA):
                out.append(row)
    return out


def plot(rows, out: Path, targets=()) -> None:
    """Top-1 against FLOPs and each ORT speedup; the latency-target runs as stars where their
    batch is the axis's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for x, name in (("flops_ratio", "flops"), ("speedup_b1", "ort_b1"), ("speedup_b32", "ort_b32")):
        models = list(dict.fromkeys(r["model"] for r in rows))
        fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
        for ax, model in zip(axes[0], models, strict=True):
            base = next(r for r in rows if r["model"] == model and r["scheme"] == "original")
            for n in sorted({calib_images(r) for r in rows}, reverse=True):
                for m in dict.fromkeys(r["method"] for r in rows if r["scheme"] == "budget"):
                    pts = sorted((float(r[x]), float(r["top1"])) for r in rows
                                 if r["model"] == model and r["method"] == m and r["scheme"] == "budget"
                                 and calib_images(r) == n)  # fmt: skip
                    if pts:
                        ax.plot(*zip(*pts, strict=True), STYLES.get(n, "-."), color=COLORS.get(m),
                                label=f"{m} ({f'{n} images' if n else 'data-free'})")  # fmt: skip
            batch = {"speedup_b1": "batch 1", "speedup_b32": "batch 32"}.get(x)
            stars = [(float(t["speedup"]), float(t["top1"])) for t in targets
                     if t["model"] == model and batch and t["run"].endswith(batch)]  # fmt: skip
            if stars:
                ax.plot(*zip(*stars, strict=True), "*", ms=14, color=COLORS["auto"],
                        label="auto --target-latency 0.6 (512 images)")  # fmt: skip
            ax.axhline(
                float(base["top1"]) - 1, color="grey", lw=0.8, ls="--", label="original - 1 pt"
            )
            ax.set_title(model)
            ax.set_xlabel({"flops_ratio": "FLOPs reduction (x)", "speedup_b1": "ONNX Runtime speedup, batch 1",
                           "speedup_b32": "ONNX Runtime speedup, batch 32"}[x])  # fmt: skip
            ax.set_ylabel("top-1 (%)")
            ax.set_ylim(max(0, float(base["top1"]) - 25), float(base["top1"]) + 2)
            ax.grid(alpha=0.3)
        seen = {}  # one legend for every panel's series (the methods differ by network)
        for ax in axes[0]:
            for h, lbl in zip(*ax.get_legend_handles_labels(), strict=True):
                seen.setdefault(lbl, h)
        axes[0][-1].legend(seen.values(), seen.keys(), fontsize=7, loc="lower left")
        fig.tight_layout()
        fig.savefig(out / f"pareto_{name}.png", dpi=110)
        plt.close(fig)


def machines(rows) -> str:
    """Each machine the rows were measured on, with its models (rows of runs before the CSVs
    kept the machine say so)."""
    by: dict[str, dict] = {}
    for r in (r for r in rows if r.get("scheme") != "original"):  # the original is not timed
        by.setdefault(r.get("machine") or "not recorded in the rows", {})[r["model"]] = None
    return "; ".join(f"{m} ({', '.join(models)})" for m, models in by.items())


def markdown(rows, rho, command: str) -> str:
    out = [
        "# Accuracy against FLOPs and measured speed: every method alone and `auto`",
        "",
        f"Written by `experiments/pareto_sweep.py`; do not edit by hand. Reproduce with `{command}`. "
        "These figures: `--models 20 --threads 1` and `--models 32 --threads 1` run at the same "
        "time (one core each), then `--calib-sizes 2048 --methods auto --resume` for each, "
        "`--models mbv2 --calib-sizes 512,2048 --threads 1` alone, then `--report-only`; timings are ratios measured side by side "
        f"in one process, so both sides shared the same load. Machines: {machines(rows)}, "
        f"torch {torch.__version__}. "
        "Top-1 on the first 1,017 exact-pixel CIFAR-10 test images; calibration on a seeded draw "
        "of 512 (or 2,048: *calibrated (2048)*) JPEG test images of index >= 1017. The "
        "MobileNetV2-style network (*mbv2*): `auto` and `svd` alone, since its only regular "
        "k×k conv is the stem. Data-free plans use the energy criterion, calibrated ones the "
        "output criterion. The stem (3 input channels) is kept, the default, so each network has "
        "one layer fewer to plan. Speedups: ONNX Runtime (CPU), each plan (its network-decoupled "
        "layers in their fastest realization there) timed side by side with the BN-folded "
        "original.",
        "",
        "| model | method | budget | refit | FLOPs | top-1 | drop | ORT b1 | ORT b32 | chosen per layer |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["scheme"] == "original":
            continue
        out.append(
            f"| {r['model']} | {r['method']} | {r['target']} | "
            f"{refit_label(r)} | {float(r['flops_ratio']):.2f}x | "
            f"{r['top1']} | {r['drop']} | {r.get('speedup_b1', '')} | {r.get('speedup_b32', '')} | "
            f"{r.get('chosen', '')} |"
        )
    out += ["", "## Where `auto` wins", "", *wins(rows)]
    out += ["", "## Does the summed loss rank plans as top-1 does?", "",
            "Spearman correlation of minus each criterion's predicted loss with top-1 over the "
            "budget plans above (1: same order). None on the MobileNetV2-style network: its plans "
            "prune, or fuse the last block's projection into the tail first, so their layers are "
            "not the ones priced one by one.", "",
            "| model | refit | plans | " + " | ".join(CRITERIA) + " |",
            "|---|---|---|" + "---|" * len(CRITERIA)]  # fmt: skip
    for r in rho:
        out.append(f"| {r['model']} | {refit_label(r)} | {r['plans']} | "
                   + " | ".join(str(r[f"rho_{c}"]) for c in CRITERIA) + " |")  # fmt: skip
    out += ["", "![top-1 vs FLOPs](pareto_flops.png)", "",
            "![top-1 vs ONNX Runtime speedup, batch 1](pareto_ort_b1.png)", "",
            "![top-1 vs ONNX Runtime speedup, batch 32](pareto_ort_b32.png)", ""]  # fmt: skip
    return "\n".join(out)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; ``--quick`` writes into a new temp folder unless ``--out`` is given."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", type=Path, default=None, help="the shared cifar10 folder")
    ap.add_argument("--budgets", default="0.5,0.4")
    ap.add_argument("--models", default="20,32",
                    help="comma list of 20, 32 (the shared ResNets' depths) and mbv2")  # fmt: skip
    ap.add_argument("--calib-sizes", default="512",
                    help="comma list: calibrated runs on each many images (default 512)")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="ResNet-20, budget 0.5, 64 images")
    ap.add_argument("--out", type=Path, default=None, help="default results/ (--quick: a temp dir)")
    ap.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --out's CSVs")
    ap.add_argument("--methods", default=None,
                    help="comma list of auto, nd-dw-pw, nd-pw-dw, cp, tucker, svd (default: all, auto first)")  # fmt: skip
    ap.add_argument("--report-only", action="store_true",
                    help="only rebuild pareto.md and the plots from the per-model CSVs in --out")  # fmt: skip
    args = ap.parse_args(argv)
    args.out = output_folder(ap, args.out, "--quick" if args.quick else None, "pareto-")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [64] if args.quick else [int(n) for n in args.calib_sizes.split(",")]
    budgets = [0.5] if args.quick else [float(b) for b in args.budgets.split(",")]
    models = ["20"] if args.quick else args.models.split(",")
    if unknown := [m for m in models if m not in MODELS]:
        sys.exit(f"pareto_sweep: unknown --models {','.join(unknown)} (known: {', '.join(MODELS)})")
    command = "python experiments/pareto_sweep.py" + (" --quick" if args.quick else "")
    if args.report_only:
        return report(args.out, command)
    # each size a seeded draw of its own (as the CLI's --calib-size takes), read once for every model
    drawn = {n: load_sets(args.assets, n) for n in sizes}
    assets, test, _ = drawn[sizes[0]]
    args.out.mkdir(parents=True, exist_ok=True)
    files = {arch: file for file, arch in SHARED}
    for arch in (MODELS[m] for m in models):
        meta = get_model_info(arch).meta
        images = test.as_float(meta["mean"], meta["std"])
        calibs = {n: d[2].as_float(meta["mean"], meta["std"]) for n, d in drawn.items()}
        calib = calibs[sizes[0]]  # pricing for the predicted losses, and the target runs
        if arch == "cifar_mbv2":
            base = mbv2(assets)
        else:
            base, _, _ = load_model(str(assets / files[arch]), arch)
        baseline = copy.deepcopy(base)
        fold_batchnorm_(baseline)  # the same free folding, so speedups are the decoupling's
        flops0, _ = count_flops(base, torch.zeros(1, *SHAPE))
        top0 = round(100 * evaluate(base, images, test.labels)["top1"], 2)
        name = arch.replace("cifar_", "")
        done_path, targets_path = (
            args.out / f"pareto_{name}.csv",
            args.out / f"pareto_targets_{name}.csv",
        )
        rows = read_csv(done_path) if args.resume and done_path.exists() else []
        extra_rows = read_csv(targets_path) if args.resume and targets_path.exists() else []
        if not rows:
            rows.append({"model": name, "scheme": "original", "method": "", "target": "",
                         "calibrated": False, "flops": flops0, "flops_ratio": 1.0, "top1": top0,
                         "drop": 0.0})  # fmt: skip
        done = {
            (r["method"], float(r["target"]), calib_images(r))
            for r in rows
            if r["scheme"] == "budget"
        }
        cache = FactorCache()
        start = time.perf_counter()
        losses = {c: rank_options(baseline, DecoupleConfig(method="auto"), SHAPE, c,
                                  None if c == "energy" else calib, cache=cache)[0]
                  for c in CRITERIA}  # fmt: skip
        print(
            f"{name}: top-1 {top0}; every option priced in {time.perf_counter() - start:.0f} s",
            flush=True,
        )
        wanted = args.methods.split(",") if args.methods else None
        for method, order in MBV2_METHODS if arch == "cifar_mbv2" else METHODS:
            if wanted and label(method, order).replace(" ", "-") not in wanted:
                continue
            grid = [(b, n) for b in budgets for n in (0, *sizes)]
            for budget, n in progress(grid, f"{name} {label(method, order)}"):
                if (label(method, order), budget, n) in done:
                    continue
                r = run_plan(base, baseline, method, order, budget, calibs[n] if n else None,
                             images, test.labels, flops0, cache, losses)  # fmt: skip
                row = {"model": name, "scheme": "budget", "method": label(method, order),
                       "target": budget, "calibrated": n > 0, "calib_images": n, **r,
                       "drop": round(r["top1"] - top0, 2), "machine": cpu_name()}  # fmt: skip
                rows.append(row)
                print(f"  {row['method']:9s} {budget} {n or 'free'} "
                      f"{row['flops_ratio']}x top-1 {row['top1']} ({row['drop']:+}) ORT b1 "
                      f"{row['speedup_b1']}x b32 {row['speedup_b32']}x [{row['seconds']} s] "
                      f"{row['chosen']}", flush=True)  # fmt: skip
                write_csv(rows, done_path)
            if method == "auto" and not args.quick and sizes[0] == 512:  # the targets next
                runs = {r["run"] for r in extra_rows}
                for batch in (32, 1):
                    if f"--target-latency 0.6 ORT batch {batch}" not in runs:
                        extra_rows.append({**latency_run(base, baseline, name, batch, calib,
                                                         images, test.labels, top0, cache),
                                           "machine": cpu_name()})  # fmt: skip
                        write_csv(extra_rows, targets_path)
                if "--max-change 1" not in runs:
                    extra_rows.append({
                        **change_run(base, name, calib, images, test.labels, top0, flops0, cache),
                        "machine": cpu_name(),
                    })  # fmt: skip
                    write_csv(extra_rows, targets_path)
    return report(args.out, command)


def read_csv(path: Path) -> list[dict]:
    def value(v: str):
        if v in ("True", "False"):
            return v == "True"
        try:
            return int(v)
        except ValueError:
            try:
                return float(v)
            except ValueError:
                return v

    with open(path, newline="") as f:
        return [{k: value(v) for k, v in r.items()} for r in csv.DictReader(f)]


def report(out: Path, command: str) -> int:
    """pareto.md, the rank correlations and the plots, from every per-model CSV in ``out``."""
    names = [f"pareto_{a.replace('cifar_', '')}.csv" for a in MODELS.values()]
    rows = [r for p in (out / n for n in names) if p.exists() for r in read_csv(p)]
    extra = [r for p in sorted(out.glob("pareto_targets_*.csv")) for r in read_csv(p)]
    if not rows:
        print(f"no {', '.join(names)} in {out}", file=sys.stderr)
        return 1
    rho = spearman_rows(rows)
    write_csv(rho, out / "pareto_rank_correlation.csv")
    plot(rows, out, extra)
    (out / "pareto.md").write_text(markdown(rows, rho, command) + targets_md(extra))
    print(f"wrote {out}/pareto.md, pareto*.csv and pareto_*.png", file=sys.stderr)
    return 0


def latency_run(base, baseline, name, batch, calib, images, labels, top0, cache) -> dict:
    """``auto`` calibrated under --target-latency 0.6 in ONNX Runtime at ``batch``."""
    model = copy.deepcopy(base)
    latency = LatencyConfig(runtime="onnxruntime", batch=batch, **TIMING)
    start = time.perf_counter()
    result = compress_(model, DecoupleConfig(method="auto", fold_bn=True), SHAPE, target_latency=0.6,
                       criterion="output", calib_images=calib, latency=latency, cache=cache)  # fmt: skip
    seconds = time.perf_counter() - start
    side = compare(
        baseline, model, latency.example(SHAPE), LatencyConfig(runtime="onnxruntime", batch=batch)
    )
    plan = result.latency_plan
    top1 = round(100 * evaluate(model, images, labels)["top1"], 2)
    f0, _ = count_flops(baseline, torch.zeros(1, *SHAPE))
    f1, _ = count_flops(model, torch.zeros(1, *SHAPE))
    row = {"model": name, "run": f"--target-latency 0.6 ORT batch {batch}", "top1": top1,
           "drop": round(top1 - top0, 2), "speedup": round(side["speedup"], 3),
           "flops_ratio": round(f0 / f1, 3), "table_passes": plan.table_passes,
           "plans_timed": len(plan.steps), "kept": f"priced by {plan.priced}",
           "seconds": round(seconds, 1)}  # fmt: skip
    print(
        f"  {row['run']}: {row['speedup']}x, top-1 {top1} ({row['drop']:+}) [{row['seconds']} s]",
        flush=True,
    )
    return row


def change_run(base, name, calib, images, labels, top0, flops0, cache) -> dict:
    """``auto`` calibrated under --max-change 1 (FLOPs), with the labelled top-1 beside it."""
    model = copy.deepcopy(base)
    start = time.perf_counter()
    config = DecoupleConfig(method="auto", fold_bn=True)
    _, search = compress_within_change_(
        model, config, SHAPE, 1.0, calib, criterion="output", cache=cache
    )
    seconds = time.perf_counter() - start
    top1 = round(100 * evaluate(model, images, labels)["top1"], 2)
    flops, _ = count_flops(model, torch.zeros(1, *SHAPE))
    row = {"model": name, "run": "--max-change 1", "top1": top1, "drop": round(top1 - top0, 2),
           "flops_ratio": round(flops0 / flops, 3), "changed_pct": search.changed_pct,
           "measured_on": search.measured_on, "tries": len(search.tries), "seconds": round(seconds, 1)}  # fmt: skip
    print(
        f"  --max-change 1: {row['flops_ratio']}x, changed {row['changed_pct']} %, top-1 {top1} [{row['seconds']} s]",
        flush=True,
    )
    return row


def wins(rows) -> list[str]:
    """Per model, budget and refit: auto's top-1 against the best single method's."""
    lines = []
    keys = dict.fromkeys(
        (r["model"], r["target"], calib_images(r)) for r in rows if r["scheme"] == "budget"
    )
    for model, budget, n in keys:
        pts = {r["method"]: r for r in rows if r["scheme"] == "budget" and r["model"] == model
               and r["target"] == budget and calib_images(r) == n}  # fmt: skip
        if "auto" not in pts or len(pts) < 2:
            continue
        best = max((m for m in pts if m != "auto"), key=lambda m: float(pts[m]["top1"]))
        a, b = float(pts["auto"]["top1"]), float(pts[best]["top1"])
        verdict = "wins" if a > b else ("ties" if a == b else "loses")
        lines.append(
            f"- {model}, budget {budget}, {refit_label(pts['auto'])}: auto "
            f"{verdict} ({a:.2f} % vs {best} {b:.2f} %; ORT batch 32 "
            f"{pts['auto'].get('speedup_b32', '')}x vs {pts[best].get('speedup_b32', '')}x)"
        )
    return lines


def targets_md(rows) -> str:
    if not rows:
        return ""
    out = ["## Targets: `auto`, calibrated", "",
           "| model | run | FLOPs | ORT speedup (side by side) | top-1 | drop | changed top-1 (held-out) | notes |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        kept = f"; kept a plan {r['kept']}" if r.get("kept") else ""
        notes = (f"{r['table_passes']} timing pass(es), {r['plans_timed']} plan(s) timed whole{kept}"
                 if "table_passes" in r and r.get("table_passes") not in ("", None)
                 else f"{r.get('tries', '')} budgets tried, measured on {r.get('measured_on', '')} images")  # fmt: skip
        out.append(f"| {r['model']} | `{r['run']}` | {float(r['flops_ratio']):.2f}x | {r.get('speedup', '') or ''} | "
                   f"{r['top1']} | {r['drop']} | {r.get('changed_pct', '') if r.get('changed_pct') is not None else ''} | {notes} |")  # fmt: skip
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())

"""Accuracy without retraining on the real pretrained CIFAR-10 ResNets: every figure of results/.

Run (needs ../shared/assets; about 20 minutes on 2 cores):

    pip install -e '.[dev]' && python experiments/accuracy_sweep.py

For every checkpoint (default: the shared ResNet-20 and ResNet-32; any CIFAR ResNet depth in the
same format works with ``--model PATH:cifar_resnetN``) it measures top-1 on the 1,017 exact-pixel
test images, before and after decoupling:

* uniform T (every 3×3 conv but the stem), both orders, data-free and calibrated;
* FLOPs budgets (``target_flops``), both orders, data-free and calibrated, energy and data criteria.

Calibration uses 512 JPEG test images whose test index is ≥ 1017, never the evaluation images.
FLOPs are the whole model's, as ``FlopCounterMode`` counts them for one 3×32×32 image.
It also times the calibration of a ResNet-56 (random weights: timing only).

Writes results/accuracy.csv, results/calibration_time.csv, results/accuracy_vs_flops.png and
results/README.md. ``--quick`` (one T, one budget) writes the same files into a new temporary
folder instead, and never into results/.
"""

from __future__ import annotations

import argparse
import copy
import csv
import platform
import sys
import time
from pathlib import Path

import torch
from experiment_io import output_folder, progress

from decouple import DecoupleConfig, count_flops
from decouple.io.checkpoint import load_model
from decouple.io.evaluate import evaluate
from decouple.io.images import load_cifar10_exact, load_cifar10_jpeg, shared_assets_dir
from decouple.models import build_model, get_model_info
from decouple.pipeline import compress_

ROOT = Path(__file__).resolve().parent.parent
SHARED = [("resnet20-12fca82f.th", "cifar_resnet20"), ("resnet32-d509ac18.th", "cifar_resnet32")]
SHAPE = (3, 32, 32)


def settings(quick: bool) -> list[dict]:
    """The grid: one dict of ``compress_`` arguments (plus labels) per run."""
    ranks = [3] if quick else [2, 3, 4, 5]
    budgets = [0.5] if quick else [0.6, 0.5, 0.45, 0.4]
    runs = []
    for order in ("dw-pw", "pw-dw"):
        for t in ranks:
            for calibrated in (False, True):
                runs.append(
                    dict(
                        scheme="uniform",
                        order=order,
                        rank=t,
                        target=None,
                        criterion="",
                        calibrated=calibrated,
                    )
                )
        for r in budgets:
            for criterion, calibrated in (("energy", False), ("energy", True), ("data", True)):
                if quick and criterion == "data":
                    continue
                if order == "pw-dw" and criterion == "data":  # keep the sweep under half an hour
                    continue
                runs.append(
                    dict(
                        scheme="budget",
                        order=order,
                        rank=None,
                        target=r,
                        criterion=criterion,
                        calibrated=calibrated,
                    )
                )
    return runs


def load_sets(assets: Path | None, calib_size: int):
    """The 1,017 exact-pixel test images and ``calib_size`` JPEG images with test index >= 1017."""
    assets = assets or shared_assets_dir()
    if assets is None:
        sys.exit("the shared CIFAR-10 assets were not found (../shared/assets/cifar10)")
    batch = assets / "test_batch.truncated_first_3145728_bytes"
    test = load_cifar10_exact(batch)
    calib_set = load_cifar10_jpeg(
        assets / "cifar10_test_jpeg_q75_YoongiKim.tar",
        batch,
        min_index=len(test),
        limit=calib_size,
        seed=0,
    )
    assert int(calib_set.indices.min()) >= len(test), "calibration must not touch evaluation images"
    return assets, test, calib_set


def run_one(base, spec, calib, images, labels, flops0) -> dict:
    model = copy.deepcopy(base)
    overrides = {"conv1": "skip"} if spec["scheme"] == "uniform" else {}
    config = DecoupleConfig(
        rank=spec["rank"], order=spec["order"], fold_bn=True, overrides=overrides
    )
    start = time.perf_counter()
    result = compress_(
        model,
        config,
        SHAPE,
        target_flops=spec["target"],
        criterion=spec["criterion"] or None,
        calib_images=calib if spec["calibrated"] else None,
        refit="auto",
    )
    seconds = time.perf_counter() - start
    flops, _ = count_flops(model, torch.zeros(1, *SHAPE))
    acc = evaluate(model, images, labels)
    modes = {}
    for c in result.calibration:
        modes[c.mode] = modes.get(c.mode, 0) + 1
    ranks = [r.rank if r.action == "decoupled" else 0 for r in result.records]
    return {
        "flops": flops,
        "flops_ratio": round(flops0 / flops, 4),
        "top1": round(100 * acc["top1"], 2),
        "top5": round(100 * acc["top5"], 2),
        "loss": round(acc["loss"], 4),
        "seconds": round(seconds, 1),
        "refit_modes": " ".join(f"{k}:{v}" for k, v in sorted(modes.items())),
        "ranks": " ".join(map(str, ranks)),
    }


def time_calibration(depth: int, calib: torch.Tensor) -> dict:
    """Seconds to decouple (T=3) and calibrate a CIFAR ResNet of ``depth`` on ``calib``."""
    torch.manual_seed(0)
    model = build_model(f"cifar_resnet{depth}").eval()
    start = time.perf_counter()
    result = compress_(model, DecoupleConfig(rank=3, fold_bn=True), SHAPE, calib_images=calib)
    return {
        "depth": depth,
        "layers": len(result.calibration),
        "images": len(calib),
        "seconds": round(time.perf_counter() - start, 1),
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    styles = {False: ("o", "--"), True: ("s", "-")}
    for ax, name in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r["model"] == name]
        base = next(r for r in mine if r["scheme"] == "original")
        ax.axhline(base["top1"], color="k", lw=1, label=f"original {base['top1']:.2f} %")
        ax.axhline(base["top1"] - 1, color="k", lw=0.8, ls=":", label="original − 1 point")
        ax.axvline(2.0, color="grey", lw=0.8, ls=":")
        groups = {}
        for r in mine:
            if r["scheme"] == "original":
                continue
            key = (r["scheme"], r["order"], r["criterion"], r["calibrated"])
            groups.setdefault(key, []).append(r)
        for (scheme, order, criterion, calibrated), pts in sorted(groups.items(), key=str):
            pts = sorted(pts, key=lambda r: r["flops_ratio"])
            marker, ls = styles[calibrated]
            label = f"{scheme} {order}" + (f" {criterion}" if criterion else "")
            label += " calibrated" if calibrated else " data-free"
            ax.plot(
                [p["flops_ratio"] for p in pts],
                [p["top1"] for p in pts],
                marker=marker,
                ls=ls,
                label=label,
            )
        ax.set_title(f"{name}: top-1 on 1,017 exact CIFAR-10 test images")
        ax.set_xlabel("FLOPs reduction of the whole model (x, FlopCounterMode)")
        ax.set_ylabel("top-1 (%)")
        ax.set_ylim(max(0, base["top1"] - 25), base["top1"] + 2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def best_at(rows, name, ratio, calibrated):
    ok = [
        r
        for r in rows
        if r["model"] == name
        and r["scheme"] != "original"
        and r["calibrated"] == calibrated
        and r["flops_ratio"] >= ratio
    ]
    return max(ok, key=lambda r: r["top1"]) if ok else None


def write_readme(rows, timing, path: Path, command: str) -> None:
    cols = [
        "model",
        "scheme",
        "order",
        "rank",
        "target",
        "criterion",
        "calibrated",
        "flops_ratio",
        "top1",
        "drop",
        "top5",
        "seconds",
        "refit_modes",
    ]
    lines = [
        "# Results: accuracy without retraining",
        "",
        "Written by `experiments/accuracy_sweep.py`; do not edit by hand. Reproduce with:",
        "",
        f"    {command}",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}.",
        "Top-1 is measured on the 1,017 exact-pixel CIFAR-10 test images; calibration uses 512",
        "JPEG test images with test index ≥ 1017. FLOPs are the whole model's (FlopCounterMode,",
        "one 3×32×32 image). `drop` is in points of top-1 against the original.",
        "",
        "## Best operating points at ≥ 2.0× fewer FLOPs",
        "",
        "| model | original | best data-free (ratio, top-1, drop) | best calibrated (ratio, top-1, drop) |",
        "|---|---:|---|---|",
    ]
    for name in sorted({r["model"] for r in rows}):
        base = next(r for r in rows if r["model"] == name and r["scheme"] == "original")
        cells = []
        for calibrated in (False, True):
            b = best_at(rows, name, 2.0, calibrated)
            if b is None:
                cells.append("none")
            else:
                how = (
                    f"T={b['rank']}"
                    if b["scheme"] == "uniform"
                    else f"budget {b['target']} {b['criterion']}"
                )
                cells.append(
                    f"{how} {b['order']}: {b['flops_ratio']:.2f}×, {b['top1']:.2f} %, "
                    f"{b['drop']:+.2f}"
                )
        lines.append(f"| {name} | {base['top1']:.2f} % | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        "![accuracy vs FLOPs](accuracy_vs_flops.png)",
        "",
        "## Every run",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    if timing:
        lines += [
            "",
            "## Calibration time (decouple at T=3 and refit, 512 images)",
            "",
            "| depth | layers | images | seconds |",
            "|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {t['depth']} | {t['layers']} | {t['images']} | {t['seconds']} |" for t in timing
        ]
        lines += ["", "ResNet-56 has random weights here (only the time is measured)."]
    path.write_text("\n".join(lines) + "\n")


def write_csv(rows: list[dict], path: Path) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``--quick`` writes into a new temp folder unless ``--out`` is given."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", type=Path, default=None, help="the shared cifar10 folder")
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="PATH:ARCH",
        help="checkpoint and architecture (repeatable); default: the shared ones",
    )
    parser.add_argument("--calib-size", type=int, default=512)
    parser.add_argument("--quick", action="store_true", help="a small grid, into a temp dir")
    parser.add_argument("--out", type=Path, default=None,
                        help="default results/ (--quick: a new temp dir)")  # fmt: skip
    parser.add_argument("--no-timing", action="store_true", help="skip the ResNet-56 timing")
    args = parser.parse_args(argv)
    args.out = output_folder(parser, args.out, "--quick" if args.quick else None, "accuracy_sweep-")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    assets, test, calib_set = load_sets(args.assets, args.calib_size)
    models = [m.rsplit(":", 1) for m in args.model] or [[str(assets / f), a] for f, a in SHARED]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for path, arch in models:
        meta = get_model_info(arch).meta
        images = test.as_float(meta["mean"], meta["std"])
        calib = calib_set.as_float(meta["mean"], meta["std"])
        base, _, _ = load_model(path, arch)
        flops0, _ = count_flops(base, torch.zeros(1, *SHAPE))
        acc = evaluate(base, images, test.labels)
        name = arch.replace("cifar_", "")
        original = {
            "model": name,
            "scheme": "original",
            "order": "",
            "rank": "",
            "target": "",
            "criterion": "",
            "calibrated": False,
            "flops": flops0,
            "flops_ratio": 1.0,
            "top1": round(100 * acc["top1"], 2),
            "top5": round(100 * acc["top5"], 2),
            "loss": round(acc["loss"], 4),
            "drop": 0.0,
        }
        rows.append(original)
        print(f"{name}: original top-1 {original['top1']:.2f} %, {flops0:,} FLOPs", flush=True)
        for spec in progress(settings(args.quick), f"{name} runs"):
            row = {"model": name, **spec, **run_one(base, spec, calib, images, test.labels, flops0)}
            row["target"] = "" if row["target"] is None else row["target"]
            row["rank"] = "" if row["rank"] is None else row["rank"]
            row["drop"] = round(row["top1"] - original["top1"], 2)
            rows.append(row)
            print(
                f"  {spec['scheme']:7s} {spec['order']} T={row['rank'] or '-':<2} R={row['target'] or '-':<4} "
                f"{spec['criterion'] or '-':6s} {'calibrated' if spec['calibrated'] else 'data-free '} "
                f"{row['flops_ratio']:.2f}x  top-1 {row['top1']:6.2f} ({row['drop']:+.2f})  {row['seconds']}s",
                flush=True,
            )
    timing = [] if args.no_timing else [time_calibration(d, calib) for d in (20, 56)]
    for t in timing:
        print(
            f"calibration time: ResNet-{t['depth']}, {t['layers']} layers, {t['images']} images: "
            f"{t['seconds']} s",
            flush=True,
        )
    write_csv(rows, args.out / "accuracy.csv")
    if timing:
        write_csv(timing, args.out / "calibration_time.csv")
    plot(rows, args.out / "accuracy_vs_flops.png")
    command = "pip install -e '.[dev]' && python experiments/accuracy_sweep.py"
    if args.quick:
        command += " --quick"
    write_readme(rows, timing, args.out / "README.md", command)
    print(f"wrote {args.out}/accuracy.csv, accuracy_vs_flops.png, README.md")


if __name__ == "__main__":
    main()

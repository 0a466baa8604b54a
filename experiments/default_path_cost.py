"""What the default path costs, stage by stage, and what the moments' sampling buys.

Two tables, both on the real networks of ``../shared/assets`` (top-1 on the 1,017 exact-pixel
CIFAR-10 test images; calibration on JPEG test images of index ≥ 1017, a seeded sample):

* **Stages**: ``compress_`` with the CLI's defaults for ``--target-flops 0.5 --calib`` (``auto``,
  the ``output`` criterion, ``--refit auto``) under :func:`decouple.recording`, at 512 and 2,048
  calibration images: seconds per stage (the report's ``timings``), top-1 and FLOPs. ResNet-56
  has no shared weights: its row is timed on a seeded random initialisation (time does not
  depend much on the weights; accuracy is not reported for it).
* **Moment samples**: the same runs with the moments reading ``SAMPLES_PER_FEATURE`` samples per
  patch feature with no floor (``MIN_SAMPLES`` off, so that the count per feature decides even on
  these small layers, as it does on ImageNet-size ones: 4, 16 = the default, 64) or every pixel
  of every image (the former rule), so the default is chosen from what it buys per second.

Run (needs ../shared/assets; about 25 minutes on 2 cores)::

    pip install -e '.[dev,vision]' && python experiments/default_path_cost.py

→ ``results/default_path_cost.md`` and ``.csv``. ``--quick``: one small run, a temporary folder.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from experiment_io import output_folder, write_csv
from mbv2_accuracy import MEAN, ONNX, STD, calib_images, mbv2

from decouple import DecoupleConfig, count_flops, recording
from decouple.calibrate import moments
from decouple.io.checkpoint import load_model
from decouple.io.evaluate import evaluate
from decouple.io.images import load_cifar10_exact, shared_assets_dir
from decouple.models import build_model
from decouple.pipeline import compress_

EVERY_PIXEL = 1 << 30  # samples per feature so large that every pixel of a 32×32 layer is read
FIELDS = ["model", "calib", "samples_per_feature", "min_samples", "top1", "drop", "flops_ratio",
          "seconds", "stages"]  # fmt: skip
NO_FLOOR = 1  # MIN_SAMPLES for the sample-size runs: the count per feature alone decides


def models(assets: Path) -> dict:
    nets = {
        "resnet20": load_model(assets / "resnet20-12fca82f.th", "cifar_resnet20")[0],
        "resnet32": load_model(assets / "resnet32-d509ac18.th", "cifar_resnet32")[0],
        "mbv2": mbv2(assets),
    }
    torch.manual_seed(0)
    nets["resnet56 (random init)"] = build_model("cifar_resnet56").eval()
    return nets


def run(base, calib, per_feature: int, floor: int, test) -> dict:
    model = copy.deepcopy(base)
    old = moments.SAMPLES_PER_FEATURE, moments.MIN_SAMPLES
    moments.SAMPLES_PER_FEATURE, moments.MIN_SAMPLES = per_feature, floor
    try:
        start = time.perf_counter()
        with recording() as t:
            compress_(
                model, DecoupleConfig(method="auto"), (3, 32, 32), target_flops=0.5,
                criterion="output", calib_images=calib,
            )  # fmt: skip
        seconds = time.perf_counter() - start
    finally:
        moments.SAMPLES_PER_FEATURE, moments.MIN_SAMPLES = old
    x, y = test
    f0, f1 = count_flops(base, x[:1])[0], count_flops(model, x[:1])[0]
    return {
        "top1": 100 * evaluate(model, x, y)["top1"],
        "flops_ratio": f0 / f1,
        "seconds": seconds,
        "stages": t.to_dict()["stages"],
    }


def plan_runs(quick: bool) -> list[tuple[str, int, int, int]]:
    """(model, calibration images, samples per feature, floor) of every run."""
    default = (moments.SAMPLES_PER_FEATURE, moments.MIN_SAMPLES)
    if quick:
        return [("mbv2", 128, *default)]
    runs = []
    for name in ("resnet20", "resnet32", "mbv2", "resnet56 (random init)"):
        for n in (512, 2048):
            runs.append((name, n, *default))
    for name in ("resnet20", "resnet32", "mbv2"):
        for per in (4, 16, 64, EVERY_PIXEL):
            runs.append((name, 512, per, NO_FLOOR))
    return runs


def stage_text(stages: dict) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in stages.items() if v >= 0.05)


def write(rows: list[dict], out: Path, originals: dict) -> None:
    write_csv(
        out / "default_path_cost.csv",
        FIELDS,
        [{**r, "stages": stage_text(r["stages"])} for r in rows],
    )
    default = moments.SAMPLES_PER_FEATURE, moments.MIN_SAMPLES

    def per(r) -> str:
        if r["samples_per_feature"] == EVERY_PIXEL:
            return "every pixel"
        return f"{r['samples_per_feature']}" + (
            ", no floor" if r["min_samples"] == NO_FLOOR else ""
        )

    def acc(r) -> str:
        if r["model"] not in originals:
            return "– | –"
        return f"{r['top1']:.2f} % | {r['drop']:+.2f}"

    lines = [
        "# What the default path costs",
        "",
        "Written by `python experiments/default_path_cost.py`: `compress_` with the CLI's "
        "defaults for `--target-flops 0.5 --calib` (method `auto`, criterion `output`, refit "
        "`auto`), on 2 CPU cores; top-1 on the 1,017 exact-pixel CIFAR-10 test images "
        "(originals: " + ", ".join(f"{k} {v:.2f} %" for k, v in originals.items()) + "). "
        "ResNet-56 has no shared weights: it is timed on a random initialisation.",
        "",
        f"## Seconds per stage (moments: {default[0]} samples per feature, at least "
        f"{default[1]:,}: the defaults)",
        "",
        "| model | calibration images | top-1 | drop | FLOPs | seconds | stages (s) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if (r["samples_per_feature"], r["min_samples"]) == default:
            lines.append(
                f"| {r['model']} | {r['calib']} | {acc(r)} | {r['flops_ratio']:.2f}× | "
                f"{r['seconds']:.0f} | {stage_text(r['stages'])} |"
            )
    lines += [
        "",
        "## What the moments' sample size buys (512 calibration images, no floor)",
        "",
        "| model | samples per feature | top-1 | drop | seconds | layer moments + calibration (s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["calib"] == 512 and r["model"] in originals and r["min_samples"] == NO_FLOOR:
            spent = r["stages"].get("layer moments", 0) + r["stages"].get("calibration", 0)
            lines.append(
                f"| {r['model']} | {per(r)} | {acc(r)} | {r['seconds']:.0f} | {spent:.1f} |"
            )
    (out / "default_path_cost.md").write_text("\n".join(lines) + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one run, a temporary folder")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.out = output_folder(p, args.out, "--quick" if args.quick else None, "cost-")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    assets = shared_assets_dir()
    if assets is None or not (assets / ONNX).is_file():
        sys.exit("default_path_cost: the shared CIFAR-10 assets are not found")
    torch.set_num_threads(2)
    exact = load_cifar10_exact(assets / "test_batch.truncated_first_3145728_bytes")
    test = (exact.as_float(MEAN, STD), exact.labels)
    bases = models(assets)
    originals = {n: 100 * evaluate(m, *test)["top1"] for n, m in bases.items() if "random" not in n}
    rows = []
    for name, n, per, floor in plan_runs(args.quick):
        row = run(bases[name], calib_images(assets, n, 0), per, floor, test)
        row.update(model=name, calib=n, samples_per_feature=per, min_samples=floor)
        row["drop"] = row["top1"] - originals[name] if name in originals else float("nan")
        rows.append(row)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        write(rows, Path(args.out), originals)
    print(f"wrote {args.out}/default_path_cost.md and .csv")


if __name__ == "__main__":
    main()

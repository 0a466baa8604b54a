"""FLOPs plans whose ranks suit the runtime's blocked layout: ``--rank-multiple`` as a user runs it.

ONNX Runtime runs convs in a blocked layout (NCHWc: 16 channels per block with AVX-512, 8 with
AVX2) that takes channel counts in multiples of 4 and pads them to whole blocks; a conv with
any other count runs unblocked, with reorders around it. CP and Tucker ranks chosen by FLOPs
alone (27, 59, 123, ...) land there, which is why the CP-heavy ``--target-flops`` plans ran
slower than the original (``results/cli_targets.md``). Here the README's command with
``--target-flops R --calib`` (512 images) runs as is and with ``--rank-multiple M``, each with
``--latency --runtime onnxruntime --batch 32`` so that its report measures the written model
side by side with the BN-folded original, and gives the cost model's predicted speed.

On the shared ResNet-20/32 and the MobileNetV2-style network (its weights written as a
state_dict from the ONNX file first, as ``experiments/mbv2_from_onnx.py`` does).

Run (needs ../shared/assets; about 15 minutes on 2 cores, nothing else running)::

    pip install -e '.[dev,vision]' && python experiments/aligned_ranks.py

→ ``results/aligned_ranks.md``, ``results/aligned_ranks.csv``. ``--models ARCH ...`` reruns those
models only, keeping the other rows of the csv. ``--quick``: one run into a
temporary folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from experiment_io import output_folder, write_csv
from mbv2_from_onnx import convert

from decouple.io.images import shared_assets_dir

ARCH = {
    "cifar_resnet20": "resnet20-12fca82f.th",
    "cifar_resnet32": "resnet32-d509ac18.th",
    "cifar_mbv2": "mbv2_tinymlperf_alibaba_cifar10.onnx",  # written as a state_dict first
}
DATA = "test_batch.truncated_first_3145728_bytes"
CALIB = "cifar10_test_jpeg_q75_YoongiKim.tar"
FIELDS = ["model", "target", "rank_multiple", "flops_ratio", "top1_before", "top1_after", "drop",
          "measured_speedup", "predicted_speedup", "methods", "seconds"]  # fmt: skip


def run_one(arch: str, target: float, multiple: int, assets: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "m.decoupled.pt"
        weights = assets / ARCH[arch]
        if weights.suffix == ".onnx":  # the CLI reads a state_dict: as a user would make it
            weights = Path(tmp) / "mbv2.pt"
            convert(assets / ARCH[arch], weights)
        argv = [sys.executable, "-m", "decouple", str(weights), "--arch", arch,
                "--target-flops", str(target), "--calib", str(assets / CALIB),
                "--calib-size", "512", "--data", str(assets / DATA), "--latency",
                "--runtime", "onnxruntime", "--batch", "32", "--out", str(out), "--quiet"]  # fmt: skip
        if multiple > 1:
            argv += ["--rank-multiple", str(multiple)]
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{' '.join(argv)} failed: {done.stderr.strip()}")
        report = json.loads(Path(tmp, "m.decoupled.report.json").read_text())
    acc = report["accuracy"]  # the report's extra sections sit at its top level
    methods = Counter(
        (r["method"] or "nd") if r["action"] == "decoupled" else r["action"]
        for r in report["layers"]
    )
    return {
        "model": arch, "target": target, "rank_multiple": multiple,
        "flops_ratio": report["totals"]["flops_ratio"],
        "top1_before": 100 * acc["before"]["top1"], "top1_after": 100 * acc["after"]["top1"],
        "drop": 100 * (acc["after"]["top1"] - acc["before"]["top1"]),
        "measured_speedup": report["latency"]["speedup"],
        "predicted_speedup": report["predicted_speed"]["speedup"],
        "methods": ", ".join(f"{k} {v}" for k, v in sorted(methods.items())),
        "seconds": report["timings"]["total"],
    }  # fmt: skip


def write(rows: list[dict], out: Path) -> None:
    write_csv(out / "aligned_ranks.csv", FIELDS, rows, extra="ignore")
    lines = [
        "# FLOPs plans with ranks in multiples of the runtime's block",
        "",
        "Written by `python experiments/aligned_ranks.py`: the README's command, `decouple MODEL "
        "--arch ARCH --target-flops R --calib ... --calib-size 512 --data ... --latency --runtime "
        "onnxruntime --batch 32`, as is (multiple 1) and with `--rank-multiple M`; every figure "
        "is the run's own report. *measured*: the written model in ONNX Runtime, batch 32, timed "
        "side by side with the BN-folded original; *predicted*: the cost model's figure in the "
        "same report (`decouple/runtime/cost_model.py`); top-1 on the 1,017 exact-pixel test "
        "images, which calibration never uses.",
        "",
        "| model | `--target-flops` | `--rank-multiple` | FLOPs | top-1 | drop | measured speed | "
        "predicted speed | layers | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['target']:g} | {r['rank_multiple']} | {r['flops_ratio']:.2f}× "
            f"| {r['top1_after']:.2f} % | {r['drop']:+.2f} | {r['measured_speedup']:.2f}× | "
            f"{r['predicted_speedup']:.2f}× | {r['methods']} | {r['seconds']:.0f} |"
        )
    (out / "aligned_ranks.md").write_text("\n".join(lines) + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one small run, a temporary folder")
    p.add_argument("--out", help="output folder (default results/; --quick: a temporary one)")
    p.add_argument("--models", nargs="+", choices=list(ARCH), default=None,
                   help="run these models only; the other rows stay as the csv in --out has "
                        "them")  # fmt: skip
    args = p.parse_args(argv)
    args.out = output_folder(p, args.out, "--quick" if args.quick else None, "aligned_ranks-")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    out = args.out
    assets = shared_assets_dir()
    if assets is None or not (assets / DATA).is_file():
        sys.exit("aligned_ranks: the shared CIFAR-10 assets are not found (../shared/assets)")
    runs = [("cifar_resnet20", 0.5, 8)] if args.quick else [
        (arch, target, m) for arch in ARCH for target in (0.5, 0.4) for m in (1, 8, 16)
    ]  # fmt: skip
    if args.models:
        runs = [r for r in runs if r[0] in args.models]
    kept = [] if not args.models else [
        r for r in read_rows(Path(out) / "aligned_ranks.csv") if r["model"] not in args.models
    ]  # fmt: skip
    rows = []
    for arch, target, m in runs:
        rows.append(run_one(arch, target, m, assets))
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()},
              flush=True)  # fmt: skip
        order = {a: i for i, a in enumerate(ARCH)}
        write(sorted(kept + rows, key=lambda r: order[r["model"]]), Path(out))
    print(f"wrote {out}/aligned_ranks.md and aligned_ranks.csv")


def read_rows(path: Path) -> list[dict]:
    """The rows of an earlier run's csv, numbers as numbers."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("target", "flops_ratio", "top1_before", "top1_after", "drop", "measured_speedup",
                  "predicted_speedup", "seconds"):  # fmt: skip
            r[k] = float(r[k])
        r["rank_multiple"] = int(r["rank_multiple"])
    return rows


if __name__ == "__main__":
    main()

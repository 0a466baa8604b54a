"""The latency target as a user runs it: the CLI's ``--target-latency 0.6 --runtime onnxruntime
--batch 32 --onnx`` with ``--calib`` on the shared pretrained CIFAR ResNets, at two calibration
sizes, each run's report read back → ``results/latency_target.md`` and ``.csv``.

    python experiments/latency_target.py --runs 20:2048,20:512 &   # one core each,
    python experiments/latency_target.py --runs 32:2048,32:512 &   # side by side
    wait; python experiments/latency_target.py --report-only

Each run is the README's command, in a subprocess, writing into a temporary folder; the speedup is
the CLI's own measurement (the decoupled model in ONNX Runtime timed side by side with the
BN-folded original, one thread, batch 32) and top-1 is on the 1,017 exact-pixel test images
(``--data``), which calibration never uses. One JSON per run is kept under
``results/latency_target/`` so that runs made in separate processes can be merged.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
ARCH = {
    "20": ("resnet20-12fca82f.th", "cifar_resnet20"),
    "32": ("resnet32-d509ac18.th", "cifar_resnet32"),
}
DATA = "test_batch.truncated_first_3145728_bytes"
CALIB = "cifar10_test_jpeg_q75_YoongiKim.tar"
FLAGS = ["--target-latency", "0.6", "--runtime", "onnxruntime", "--batch", "32", "--onnx",
         "--threads", "1"]  # fmt: skip


def assets_dir() -> Path:
    sys.path.insert(0, str(ROOT))
    from decouple.io.images import shared_assets_dir

    found = shared_assets_dir()
    if found is None:
        sys.exit("latency_target: the shared CIFAR-10 assets are not beside the repository")
    return found


def run_one(depth: str, calib_size: int, assets: Path, out: Path) -> dict:
    file, arch = ARCH[depth]
    with tempfile.TemporaryDirectory() as tmp:
        argv = [sys.executable, "-m", "decouple", str(assets / file), "--arch", arch, *FLAGS,
                "--data", str(assets / DATA), "--calib", str(assets / CALIB),
                "--calib-size", str(calib_size), "--out", "r.pt", "--quiet"]  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.run(argv, cwd=tmp, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        if proc.returncode != 0:
            sys.exit(f"latency_target: {arch} failed: {proc.stderr.strip()}")
        report = json.loads((Path(tmp) / "r.report.json").read_text())
    acc, lat, plan = report["accuracy"], report["latency"], report["latency_allocation"]
    row = {
        "model": arch.removeprefix("cifar_"),
        "calib_size": calib_size,
        "top1_before": round(100 * acc["before"]["top1"], 2),
        "top1_after": round(100 * acc["after"]["top1"], 2),
        "drop": round(100 * (acc["after"]["top1"] - acc["before"]["top1"]), 2),
        "speedup": round(lat["speedup"], 3),
        "flops_ratio": round(report["totals"]["flops_ratio"], 3),
        "table_passes": plan.get("table_passes"),
        # each whole-model try of the search, as a speedup over the original (the one kept is
        # the least-loss try within the target)
        "tries": " ".join(f"{plan['model_ms'] / t['measured_ms']:.3f}x" for t in plan["steps"]),
        "seconds": round(time.perf_counter() - start),
        "command": "decouple " + " ".join(a if "/" not in a else Path(a).name for a in argv[3:]),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{row['model']}_{calib_size}.json").write_text(json.dumps(row, indent=1) + "\n")
    print(f"{row['model']} calib {calib_size}: {row['speedup']}x, top-1 {row['top1_after']} "
          f"({row['drop']:+}) [{row['seconds']} s]", flush=True)  # fmt: skip
    return row


def report(runs_dir: Path, results: Path) -> None:
    rows = sorted(
        (json.loads(p.read_text()) for p in runs_dir.glob("*.json")),
        key=lambda r: (r["model"], -r["calib_size"]),
    )
    if not rows:
        sys.exit(f"latency_target: no runs in {runs_dir}")
    with open(results / "latency_target.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [
        "# The latency target as the CLI runs it",
        "",
        "Written by `experiments/latency_target.py` (see its docstring for the commands); do not "
        "edit by hand. `--target-latency 0.6 --runtime onnxruntime --batch 32 --onnx --threads 1` "
        "with `--calib` (the JPEG test images of index >= 1017) and `--data` (the 1,017 exact-pixel "
        "test images); speedup: the CLI's side-by-side ONNX Runtime measurement against the "
        "BN-folded original. Target: >= 1.6x at <= 1.0 point drop.",
        "",
        "| model | calib images | speedup | FLOPs | top-1 before | after | drop | met | timing passes "
        "| plans tried (speedup while planning) | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---|---:|",
    ]
    for r in rows:
        met = "yes" if r["speedup"] >= 1.6 and r["drop"] >= -1.0 else "no"
        lines.append(
            f"| {r['model']} | {r['calib_size']} | {r['speedup']}x | {r['flops_ratio']}x | "
            f"{r['top1_before']} | {r['top1_after']} | {r['drop']:+} | {met} | "
            f"{r['table_passes']} | {r.get('tries', '')} | {r['seconds']} |"
        )
    (results / "latency_target.md").write_text("\n".join(lines) + "\n")
    print((results / "latency_target.md").read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="20:2048,20:512,32:2048,32:512", help="depth:calib-size,...")
    ap.add_argument("--report-only", action="store_true", help="merge the kept runs only")
    args = ap.parse_args(argv)
    runs_dir = RESULTS / "latency_target"
    if not args.report_only:
        assets = assets_dir()
        for item in args.runs.split(","):
            depth, size = item.split(":")
            run_one(depth, int(size), assets, runs_dir)
    report(runs_dir, RESULTS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

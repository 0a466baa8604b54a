"""ImageNet-size models on ImageNet-style folders: peak memory and time of the CLI.

Real ImageNet images are not reachable here, and neither memory nor time depends on the weights,
so this script makes its own ImageNet-like data (seeded):

* ``val/<class>/<n>.jpg``: a labelled ImageFolder tree (``--eval`` images, 10 classes);
* ``calib/<n>.jpg``: a flat folder of unlabelled calibration images (the largest ``--sizes``);

JPEGs of 200 to 500 pixels a side in every aspect, one in ten greyscale. Then, for VGG-16 and
ResNet-50 (torchvision, ``weights=None``, saved as state_dicts), it runs
``python -m decouple CKPT --arch NAME --rank 3 --calib calib --calib-size N`` for every N (and,
for ResNet-50, once more with ``--data val`` at the largest N), each in a child process, and
records:

* the child's peak resident memory (``os.wait4``'s ``ru_maxrss``) and wall seconds;
* the calibration's seconds (from the report) and their ratio to one plain forward pass of the
  original over the same N images through the same input pipeline (timed in another child).

Writes ``results/scale.csv`` after every run (a rerun skips the rows already there),
``results/scale.md`` and ``results/scale.png``. Usage::

    pip install -e '.[dev,vision]' && python experiments/scale_bench.py

It takes about an hour on 2 CPU cores. ``--planner`` runs the default planner's rows instead
(``--target-flops 0.5`` and ``--target-latency 0.6 --runtime onnxruntime``, 512 calibration
images; ``--budgets flops`` for one; ``--device cuda --tag _cuda`` on a GPU, where the latency
budget is timed in eager PyTorch) into
``results/scale_planner*.csv``; every run rewrites ``results/scale.md`` from all the csv files.
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

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIELDS = [
    "model", "calib_images", "eval_images", "peak_rss_gb", "wall_s", "calibration_s",
    "forward_s", "calibration_per_forward", "top1_before", "top1_after", "flops_ratio",
]  # fmt: skip


def skip(name: str) -> list[str]:
    """The 7×7 stem of a torchvision ResNet stays: at T=3 of 49 it would wreck the model."""
    return ["--skip", "conv1"] if name.startswith("resnet") else []


def make_images(root: Path, n_eval: int, n_calib: int, seed: int = 0) -> None:
    """The ImageNet-like folders (kept if already there with as many images)."""
    from PIL import Image

    rng = np.random.default_rng(seed)

    def picture(path: Path) -> None:
        w, h = (int(v) for v in rng.integers(200, 501, size=2))
        # smooth colour fields plus noise: JPEG sizes like photos', cheap to make
        small = rng.integers(0, 256, (max(2, h // 40), max(2, w // 40), 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        noise = rng.integers(-20, 21, (h, w, 3))
        im = Image.fromarray(np.clip(np.asarray(im) + noise, 0, 255).astype(np.uint8))
        if rng.random() < 0.1:
            im = im.convert("L")
        im.save(path, quality=85)

    val = root / "val"
    if len(list(val.rglob("*.jpg"))) != n_eval:
        for k in range(n_eval):
            d = val / f"class{k % 10:02d}"
            d.mkdir(parents=True, exist_ok=True)
            picture(d / f"{k:05d}.jpg")
    calib = root / "calib"
    if len(list(calib.glob("*.jpg"))) != n_calib:
        calib.mkdir(parents=True, exist_ok=True)
        for k in range(n_calib):
            picture(calib / f"{k:05d}.jpg")


def run_child(cmd: list[str], log: Path) -> tuple[int, float, float]:
    """Run ``cmd``; its exit status, wall seconds and peak RSS in GB (its own, from wait4)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - start, usage.ru_maxrss / 1e6  # KB -> GB


def forward_seconds(name: str, calib: Path, n: int, batch: int, device: str = "cpu") -> float:
    """One plain forward pass of the original over the first-``n`` sample, through the same
    pipeline as the CLI's ``--calib`` (decode, resize, crop, normalise), in a child process."""
    code = f"""
import time, torch, torchvision
from decouple.io.datasets import loader, open_images
from decouple.io.preprocess import default_preprocess
model = torchvision.models.get_model({name!r}, weights=None).eval().to({device!r})
data = open_images({str(calib)!r}, default_preprocess({name!r}), labelled=False, limit={n})
start = time.perf_counter()
with torch.no_grad():
    for x, _ in loader(data, {batch}):
        model(x.to({device!r}))
if {device!r} == "cuda":
    torch.cuda.synchronize()
print(time.perf_counter() - start)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1])
    return float(out.stdout.strip().splitlines()[-1])


def read_rows(path: Path, fields=None) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: list[dict], fields=None) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".csv")
    with os.fdopen(fd, "w", newline="") as f:
        w = csv.DictWriter(f, fields or FIELDS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def bench(args) -> list[dict]:
    work = Path(args.work)
    make_images(work, args.eval, max(args.sizes))
    path = args.out / "scale.csv"
    rows = read_rows(path)
    done = {(r["model"], r["calib_images"], r["eval_images"]) for r in rows}
    import torch
    import torchvision

    for name in args.models:
        ckpt = work / f"{name}.pt"
        if not ckpt.exists():
            torch.manual_seed(0)
            torch.save(torchvision.models.get_model(name, weights=None).state_dict(), ckpt)
        plan = [(n, 0) for n in args.sizes]
        if name in args.data_models:
            plan.append((max(args.sizes), args.eval))
        for n, n_eval in plan:
            if (name, str(n), str(n_eval)) in done:
                continue
            out = work / "out" / f"{name}-{n}-{n_eval}.pt"
            out.parent.mkdir(exist_ok=True)
            cmd = [
                sys.executable, "-m", "decouple", str(ckpt), "--arch", name, "--rank", "3",
                *skip(name), "--calib", str(work / "calib"), "--calib-size", str(n),
                "--batch-size", str(args.batch_size), "--out", str(out), "--force",
                "--allow-miss",  # random weights: the output check's verdict says nothing
            ]  # fmt: skip
            if n_eval:
                cmd += ["--data", str(work / "val")]
            log = out.with_suffix(".log")
            status, wall, rss = run_child(cmd, log)
            if status != 0:
                tail = log.read_text().strip().splitlines()[-1:]
                print(f"{name} n={n}: exit {status}: {tail}", flush=True)
                continue
            report = json.loads(out.with_name(out.stem + ".report.json").read_text())
            calib_s = report["calibration_seconds"]
            fwd = forward_seconds(name, work / "calib", n, args.batch_size)
            acc = report.get("accuracy") or {}
            totals = report["totals"]
            row = {
                "model": name, "calib_images": n, "eval_images": n_eval,
                "peak_rss_gb": round(rss, 3), "wall_s": round(wall, 1),
                "calibration_s": round(calib_s, 1), "forward_s": round(fwd, 2),
                "calibration_per_forward": round(calib_s / fwd, 2),
                "top1_before": acc.get("before", {}).get("top1", ""),
                "top1_after": acc.get("after", {}).get("top1", ""),
                "flops_ratio": round(totals["flops_before"] / totals["flops_after"], 3),
            }  # fmt: skip
            rows.append(row)
            write_rows(path, rows)
            print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return rows


PLANNER_FIELDS = [
    "model", "budget", "device", "calib_images", "peak_rss_gb", "wall_s", "calibration_s",
    "forward_s", "calibration_per_forward", "flops_ratio", "stages", "peak_stage",
]  # fmt: skip
PLANNER_RUNS = {  # the default planner (auto, output criterion) at ImageNet size
    "flops": ["--target-flops", "0.5"],
    # every layer timed, as when the results were written (the default now predicts the table)
    "latency": [
        "--target-latency",
        "0.6",
        "--runtime",
        "onnxruntime",
        "--latency-table",
        "measured",
    ],
}


def planner_flags(budget: str, device: str) -> list[str]:
    """The budget's flags; on a GPU latency is timed in eager PyTorch there (onnxruntime
    times the CPU only)."""
    if device == "cuda" and budget == "latency":
        return ["--target-latency", "0.6", "--runtime", "eager"]
    return PLANNER_RUNS[budget]


def bench_planner(args) -> list[dict]:
    """The default path: ``--target-flops 0.5`` and ``--target-latency 0.6 --runtime
    onnxruntime`` with ``--calib-size`` images, per model; wall time, peak RSS and every
    stage's seconds (the report's ``timings``)."""
    work = Path(args.work)
    n = args.planner_calib
    make_images(work, 0, n)
    path = args.out / f"scale_planner{args.tag}.csv"
    rows = read_rows(path, PLANNER_FIELDS)
    done = {(r["model"], r["budget"], r["device"], r["calib_images"]) for r in rows}
    import torch
    import torchvision

    for name in args.models:
        ckpt = work / f"{name}.pt"
        if not ckpt.exists():
            torch.manual_seed(0)
            torch.save(torchvision.models.get_model(name, weights=None).state_dict(), ckpt)
        for budget in args.budgets:
            if (name, budget, args.device, str(n)) in done:
                continue
            out = work / "out" / f"{name}-{budget}-{args.device}.pt"
            out.parent.mkdir(exist_ok=True)
            cmd = [
                sys.executable, "-m", "decouple", str(ckpt), "--arch", name,
                *planner_flags(budget, args.device), "--calib", str(work / "calib"), "--calib-size", str(n),
                "--batch-size", str(args.batch_size), "--device", args.device,
                "--out", str(out), "--force", "--allow-miss",  # random weights, as above
            ]  # fmt: skip
            log = out.with_suffix(".log")
            print(" ".join(cmd), flush=True)
            status, wall, rss = run_child(cmd, log)
            if status != 0:
                tail = log.read_text().strip().splitlines()[-1:]
                print(f"{name} {budget}: exit {status}: {tail}", flush=True)
                continue
            report = json.loads(out.with_name(out.stem + ".report.json").read_text())
            calib_s = report["calibration_seconds"]
            fwd = forward_seconds(name, work / "calib", n, args.batch_size, args.device)
            totals = report["totals"]
            row = {
                "model": name, "budget": budget, "device": args.device, "calib_images": n,
                "peak_rss_gb": round(rss, 3), "wall_s": round(wall, 1),
                "calibration_s": round(calib_s, 1), "forward_s": round(fwd, 2),
                "calibration_per_forward": round(calib_s / fwd, 2),
                "flops_ratio": round(totals["flops_before"] / totals["flops_after"], 3),
                "stages": json.dumps(report["timings"]["stages"]),
                "peak_stage": max(peaks, key=peaks.get) if (peaks := report["timings"].get(
                    "peak_rss_gb")) else "",
            }  # fmt: skip
            rows.append(row)
            write_rows(path, rows, PLANNER_FIELDS)
            print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return rows


def planner_lines(rows: list[dict]) -> list[str]:
    """The planner table and each run's stages, for scale.md."""
    lines = [
        "## The default planner at ImageNet size",
        "",
        "Written by `python experiments/scale_bench.py --planner` (and `--device cuda --tag _cuda`",
        "where a GPU was lent): `auto` with the output criterion, calibration images generated as",
        "above, batch 32. Peak RSS is the CLI child's own; the stages come from the report's",
        "`timings`; the forward pass is one plain pass of the original over the same images.",
        "",
        "| model | budget | device | calibration images | peak RSS (GB) | wall (s) | "
        "calibration (s) | calibration / forward | FLOPs ratio |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {' '.join(planner_flags(r['budget'], r['device']))} | {r['device']} | "
            f"{r['calib_images']} | {r['peak_rss_gb']} | {r['wall_s']} | {r['calibration_s']} | "
            f"{r['calibration_per_forward']} | {r['flops_ratio']} |"
        )
    lines.append("")
    for r in rows:
        stages = json.loads(r["stages"])
        top = sorted(stages.items(), key=lambda kv: -kv[1])
        lines.append(
            f"- {r['model']} `{' '.join(planner_flags(r['budget'], r['device']))}` on {r['device']}: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in top if v >= 1)
            + (f"; peak memory reached in {r['peak_stage']}" if r.get("peak_stage") else "")
            + "."
        )
    return lines + [""]


def linear_fit(xs, ys) -> tuple[float, float, float]:
    """Slope, intercept and R² of a least-squares line."""
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    r2 = 1 - float(resid @ resid) / max(float(((y - y.mean()) ** 2).sum()), 1e-12)
    return float(slope), float(intercept), r2


def summarize(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [
        "# ImageNet-size calibration: memory and time",
        "",
        "Written by `python experiments/scale_bench.py` (2 CPU cores, `weights=None` models,",
        "generated ImageNet-like JPEG folders, `--rank 3`, default `--refit auto`, batch 32).",
        "Peak RSS is the CLI child process's own (`os.wait4`); calibration seconds come from the",
        "report; the forward pass is one plain pass of the original over the same images through",
        "the same input pipeline.",
        "",
        "| model | calibration images | evaluation images | peak RSS (GB) | wall (s) | "
        "calibration (s) | one forward (s) | calibration / forward | FLOPs ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['calib_images']} | {r['eval_images']} | {r['peak_rss_gb']} | "
            f"{r['wall_s']} | {r['calibration_s']} | {r['forward_s']} | "
            f"{r['calibration_per_forward']} | {r['flops_ratio']} |"
        )
    lines += ["", "## Checks", ""]
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    for name in sorted({r["model"] for r in rows}):
        calib_only = sorted(
            (r for r in rows if r["model"] == name and int(r["eval_images"]) == 0),
            key=lambda r: int(r["calib_images"]),
        )
        if len(calib_only) < 2:
            continue
        n = [int(r["calib_images"]) for r in calib_only]
        rss = [float(r["peak_rss_gb"]) for r in calib_only]
        secs = [float(r["calibration_s"]) for r in calib_only]
        ax_mem.plot(n, rss, "o-", label=name)
        ax_time.plot(n, secs, "o-", label=name)
        slope, intercept, r2 = linear_fit(n, secs)
        by_n = dict(zip(n, rss, strict=True))
        growth = by_n[max(n)] / by_n[128] if 128 in by_n else float("nan")
        lines.append(
            f"- {name}: peak RSS {min(rss):.2f} to {max(rss):.2f} GB over {min(n)} to {max(n)} "
            f"images; at {max(n)} it is {growth:.2f}× the peak at 128. Calibration time is "
            f"{intercept:.0f} s + {slope:.2f} s per image (linear fit, R² = {r2:.3f}); "
            f"calibration / forward pass: "
            + ", ".join(
                f"{r['calibration_per_forward']}× at {r['calib_images']}" for r in calib_only
            )
            + "."
        )
    for r in rows:
        if int(r["eval_images"]):
            lines.append(
                f"- {r['model']} with a {r['eval_images']}-image `--data` tree and "
                f"{r['calib_images']} calibration images: peak RSS {r['peak_rss_gb']} GB, "
                f"{r['wall_s']} s in all."
            )
    ax_mem.set(xlabel="calibration images", ylabel="peak RSS (GB)", title="memory")
    ax_time.set(xlabel="calibration images", ylabel="calibration (s)", title="time")
    for ax in (ax_mem, ax_time):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "scale.png", dpi=120)
    lines += ["", "![memory and time against the number of images](scale.png)", ""]
    planner = [r for f in sorted(out.glob("scale_planner*.csv")) for r in read_rows(f)]
    if planner:
        lines += planner_lines(planner)
    (out / "scale.md").write_text("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet50", "vgg16"])
    p.add_argument(
        "--data-models", nargs="*", default=["resnet50"], help="also run these with --data"
    )
    p.add_argument("--sizes", nargs="+", type=int, default=[64, 128, 256, 512])
    p.add_argument("--eval", type=int, default=1000, help="images in the --data tree")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "decouple-scale"))
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument("--planner", action="store_true", help="the default planner's rows instead")
    p.add_argument("--budgets", nargs="+", choices=list(PLANNER_RUNS), default=list(PLANNER_RUNS))
    p.add_argument("--planner-calib", type=int, default=512, help="calibration images (planner)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--tag", default="", help="suffix of the planner's csv (e.g. _cuda)")
    args = p.parse_args()
    if args.planner:
        bench_planner(args)
    else:
        bench(args)
    summarize(read_rows(args.out / "scale.csv"), args.out)
    print(f"wrote {args.out / 'scale.md'}")


if __name__ == "__main__":
    main()

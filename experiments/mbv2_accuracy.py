"""Accuracy of the low-rank method on a real network whose FLOPs are in 1×1 convs: the shared
MobileNetV2-style CIFAR-10 network, at 1.5× and 2× fewer FLOPs, data-free and calibrated, beside
what the k×k methods alone can do on it; and the shared CIFAR ResNets' calibrated 2× plans, which
have no 1×1 conv and must not move.

Every run is ``compress_`` with the CLI's defaults for the flags it names (``--target-flops R``:
``--method auto``; with ``--calib``: the ``output`` criterion, ``--refit auto``, and 2048
calibration images for 32×32 inputs), top-1 on the 1,017 exact-pixel test images, calibration on
JPEG test images of index ≥ 1017 (a seeded sample; seeds 0-2 for the headline row).

Run (needs ../shared/assets; about 20 minutes on 2 cores)::

    pip install -e '.[dev,vision]' && python experiments/mbv2_accuracy.py

→ ``results/mbv2.md``, ``results/mbv2.csv``. ``--quick``: one small run into a temporary folder.
"""

from __future__ import annotations

import argparse
import copy
import csv
import sys
import time
from pathlib import Path

import torch
from experiment_io import output_folder

from decouple import DecoupleConfig, count_flops
from decouple.io.checkpoint import load_model
from decouple.io.evaluate import evaluate
from decouple.io.images import load_cifar10_exact, load_cifar10_jpeg, shared_assets_dir
from decouple.io.onnx_weights import state_dict_from_onnx
from decouple.models import build_model
from decouple.nn.discover import is_plain_conv2d, is_plain_linear
from decouple.pipeline import compress_

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ONNX = "mbv2_tinymlperf_alibaba_cifar10.onnx"
RESNETS = [("resnet20-12fca82f.th", "cifar_resnet20"), ("resnet32-d509ac18.th", "cifar_resnet32")]
FIELDS = ["model", "layers", "target", "calib", "seed", "flops_ratio", "reached", "top1", "drop",
          "seconds", "methods"]  # fmt: skip


def mbv2(assets: Path) -> torch.nn.Module:
    model = build_model("cifar_mbv2")
    model.load_state_dict(state_dict_from_onnx(assets / ONNX))
    return model.eval()


def pointwise_skips(model) -> dict:
    """Every 1×1 conv and linear layer skipped: the k×k methods alone, as before svd."""
    return {
        n: "skip"
        for n, m in model.named_modules()
        if is_plain_linear(m) or (is_plain_conv2d(m) and m.kernel_size == (1, 1))
    }


def calib_images(assets: Path, n: int, seed: int) -> torch.Tensor:
    batch = assets / "test_batch.truncated_first_3145728_bytes"
    tar = assets / "cifar10_test_jpeg_q75_YoongiKim.tar"
    got = load_cifar10_jpeg(tar, batch, min_index=1017, limit=n, seed=seed)
    assert int(got.indices.min()) >= 1017, "calibration must never touch evaluation images"
    return got.as_float(MEAN, STD)


def run(name, base, layers, target, calib, seed, test) -> dict:
    x, y = test
    model = copy.deepcopy(base)
    overrides = pointwise_skips(model) if layers == "k×k methods only" else {}
    start = time.perf_counter()
    result = compress_(
        model, DecoupleConfig(method="auto", overrides=overrides), (3, 32, 32),
        target_flops=target, criterion="output" if calib is not None else "energy",
        calib_images=calib,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    f0, f1 = count_flops(base, x[:1])[0], count_flops(model, x[:1])[0]
    top1 = 100 * evaluate(model, x, y)["top1"]
    kinds: dict[str, int] = {}
    for label in result.allocation.methods().values():
        k = "keep" if label == "keep" else label.rsplit(" ", 1)[0]
        kinds[k] = kinds.get(k, 0) + 1
    return {
        "model": name, "layers": layers, "target": target,
        "calib": 0 if calib is None else len(calib), "seed": seed, "flops_ratio": f0 / f1,
        "reached": result.allocation.total_flops <= result.allocation.target_flops,
        "top1": top1, "seconds": seconds,
        "methods": ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())),
    }  # fmt: skip


def plan_runs(quick: bool) -> list[tuple]:
    """(model, layers, target, calibration images, seed) of every run."""
    if quick:
        return [("mbv2", "every layer", 0.5, 256, 0)]
    runs = []
    for target in (0.67, 0.5):
        for layers in ("every layer", "k×k methods only"):
            runs += [("mbv2", layers, target, 0, 0), ("mbv2", layers, target, 2048, 0)]
        runs.append(("mbv2", "every layer", target, 512, 0))
    runs += [("mbv2", "every layer", 0.5, 2048, s) for s in (1, 2)]
    runs += [(arch, "every layer", 0.5, 512, 0) for _, arch in RESNETS]
    return runs


def write(rows: list[dict], out: Path, originals: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "mbv2.csv", "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        w.writerows(rows)
    lines = [
        "# Low rank on 1×1 convs: the shared MobileNetV2-style CIFAR-10 network",
        "",
        "Written by `python experiments/mbv2_accuracy.py`. Top-1 on the 1,017 exact-pixel "
        "CIFAR-10 test images; original: "
        + ", ".join(f"{k} {v:.2f} %" for k, v in originals.items())
        + ". `--target-flops R` with `--method auto` (k×k convs: every method; 1×1 convs and "
        "linear layers: svd); calibrated runs use the `output` criterion and `--refit auto` on "
        "JPEG test images of index ≥ 1017 (seeded sample).",
        "",
        "| model | layers | target | calibration images (seed) | FLOPs | top-1 | drop | "
        "methods chosen | seconds |",
        "|---|---|---:|---|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        cal = "data-free" if not r["calib"] else f"{r['calib']} ({r['seed']})"
        reach = "" if r["reached"] else " (budget not reached)"
        lines.append(
            f"| {r['model']} | {r['layers']} | {r['target']} | {cal} | "
            f"{r['flops_ratio']:.2f}×{reach} | {r['top1']:.2f} % | {r['drop']:+.2f} | "
            f"{r['methods']} | {r['seconds']:.0f} |"
        )
    (out / "mbv2.md").write_text("\n".join(lines) + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one run, a temporary folder")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.out = output_folder(p, args.out, "--quick" if args.quick else None, "mbv2-")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    assets = shared_assets_dir()
    if assets is None or not (assets / ONNX).is_file():
        sys.exit("mbv2_accuracy: the shared CIFAR-10 assets (with the ONNX network) are not found")
    torch.set_num_threads(2)
    exact = load_cifar10_exact(assets / "test_batch.truncated_first_3145728_bytes")
    test = (exact.as_float(MEAN, STD), exact.labels)
    bases = {"mbv2": mbv2(assets)}
    for f, arch in RESNETS:
        bases[arch] = load_model(assets / f, arch)[0]
    originals = {n: 100 * evaluate(m, *test)["top1"] for n, m in bases.items()}
    rows = []
    for name, layers, target, n_calib, seed in plan_runs(args.quick):
        calib = calib_images(assets, n_calib, seed) if n_calib else None
        row = run(name, bases[name], layers, target, calib, seed, test)
        row["drop"] = row["top1"] - originals[name]
        rows.append(row)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        write(rows, Path(args.out), originals)
    print(f"wrote {args.out}/mbv2.md and mbv2.csv")


if __name__ == "__main__":
    main()

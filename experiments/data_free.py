"""No images at all: our data-free plans, synthetic calibration, and TensorLy-Torch's uniform CP.

On the shared pretrained CIFAR-10 ResNet-20, ResNet-32 and MobileNetV2-style network, at 2× and
2.5× fewer FLOPs (``--target-flops 0.5`` and ``0.4``), top-1 on the 1,017 exact-pixel test images:

* **ours, data-free**: ``compress_`` as the CLI runs it without ``--calib`` (``--method auto``,
  the ``energy`` criterion);
* **ours, synthetic**: ``--calib synthetic`` (256 images made from the model's BatchNorm
  statistics, ZeroQ, :mod:`decouple.calibrate.synthetic`; then the calibrated default path:
  ``output`` criterion, ``--refit auto``, pruning); the seconds include making them;
* **ours, 512 real images**: ``--calib`` with a seeded sample of 512 JPEG test images of index
  ≥ 1017 (the reference synthetic calibration is judged against);
* **TensorLy-Torch uniform CP** (``tltorch.FactorizedConv.from_conv``, ``factorization="CP"``,
  ``implementation="factorized"``, the kernel decomposed): every conv with ``groups=1`` but the
  3-channel stem at one parameter fraction, found by bisection so that the whole model's FLOPs
  (``FlopCounterMode``) meet the target; skipped when ``tensorly-torch`` is not installed
  (the ``peers`` extra, for this experiment only).

Run (needs ../shared/assets; about 15 minutes on 2 cores)::

    pip install -e '.[dev,vision,peers]' && python experiments/data_free.py

→ ``results/data_free.md``, ``results/data_free.csv``. ``--quick``: ResNet-20 at 2× only, 32
synthetic images, into a temporary folder.
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
from mbv2_accuracy import MEAN, ONNX, RESNETS, STD, calib_images, mbv2

from decouple import DecoupleConfig, count_flops
from decouple.calibrate.synthetic import synthesize_images
from decouple.io.checkpoint import load_model
from decouple.io.evaluate import evaluate
from decouple.io.images import load_cifar10_exact, shared_assets_dir
from decouple.nn.discover import is_plain_conv2d
from decouple.pipeline import compress_

FIELDS = [
    "model",
    "target",
    "variant",
    "flops_ratio",
    "reached",
    "top1",
    "drop",
    "seconds",
    "plan_loss",
    "uniform_plan",
    "uniform_loss",
    "uniform_taken",
]
TARGETS = (0.5, 0.4)
SHAPE = (3, 32, 32)


def ours(base, target: float, calib: torch.Tensor | None) -> tuple[torch.nn.Module, bool, dict]:
    """The compressed copy, whether it reached the target, and its plan's loss beside the best
    uniform plan's (the baseline the planner compares it with, by the same loss)."""
    model = copy.deepcopy(base)
    result = compress_(
        model, DecoupleConfig(method="auto"), SHAPE, target_flops=target,
        criterion="output" if calib is not None else "energy", calib_images=calib,
    )  # fmt: skip
    a = result.allocation
    u = a.uniform
    plan = {"plan_loss": a.loss, "uniform_plan": u.get("plan", ""), "uniform_loss": u.get("loss", ""),
            "uniform_taken": u.get("taken", "")}  # fmt: skip
    return model, a.total_flops <= a.target_flops, plan


def _tl_convs(model) -> list[str]:
    return [
        n for n, m in model.named_modules()
        if is_plain_conv2d(m) and m.groups == 1 and m.in_channels > 3
    ]  # fmt: skip


def tltorch_uniform(base, fraction: float, decompose: bool) -> torch.nn.Module:
    import tltorch

    model = copy.deepcopy(base)
    for name in _tl_convs(model):
        parent, _, attr = name.rpartition(".")
        conv = model.get_submodule(name)
        new = tltorch.FactorizedConv.from_conv(
            conv, rank=fraction, factorization="CP", implementation="factorized",
            decompose_weights=decompose,
        )  # fmt: skip
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    return model.eval()


def tltorch_at(base, target: float, x: torch.Tensor) -> tuple[torch.nn.Module, bool]:
    """Uniform CP at the largest parameter fraction whose FLOPs meet ``target`` (bisection on
    layers initialised at random: only their shapes count), then decomposed for real."""
    f0 = count_flops(base, x[:1])[0]
    lo, hi = 0.01, 1.0
    for _ in range(12):
        mid = (lo + hi) / 2
        ratio = count_flops(tltorch_uniform(base, mid, decompose=False), x[:1])[0] / f0
        lo, hi = (mid, hi) if ratio <= target else (lo, mid)
    model = tltorch_uniform(base, lo, decompose=True)
    return model, count_flops(model, x[:1])[0] / f0 <= target * 1.001


def run(name, base, target, variant, test, assets, quick) -> dict:
    x, y = test
    start = time.perf_counter()
    plan: dict = {}
    if variant == "ours, data-free":
        model, reached, plan = ours(base, target, None)
    elif variant == "ours, synthetic":
        made, _ = synthesize_images(base, SHAPE, 32 if quick else 256)
        model, reached, plan = ours(base, target, made)
    elif variant == "ours, 512 real images":
        model, reached, plan = ours(base, target, calib_images(assets, 512, 0))
    else:
        model, reached = tltorch_at(base, target, x)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        ratio = count_flops(base, x[:1])[0] / count_flops(model, x[:1])[0]
        top1 = 100 * evaluate(model, x, y)["top1"]
    return {"model": name, "target": target, "variant": variant, "flops_ratio": ratio,
            "reached": reached, "top1": top1, "seconds": seconds, **plan}  # fmt: skip


def write(rows: list[dict], out: Path, originals: dict, peer: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "data_free.csv", "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        w.writerows(rows)
    lines = [
        "# No images: data-free plans, synthetic calibration and TensorLy-Torch's uniform CP",
        "",
        "Written by `python experiments/data_free.py` (its docstring says how each variant "
        "runs). Top-1 on the 1,017 exact-pixel CIFAR-10 test images; originals: "
        + ", ".join(f"{k} {v:.2f} %" for k, v in originals.items())
        + ". *drop* in points against the original; *seconds*: the whole variant (for "
        "*synthetic*, making the images included)."
        + ("" if peer else " TensorLy-Torch was not installed: its rows are missing."),
        "",
        "*plan loss*: the plan's predicted loss (its criterion: `energy` data-free, else `output`); "
        "*uniform baseline*: the best uniform plan under the same budget and its loss by the same "
        "criterion, which the planner takes instead when lower (`decouple/plan/uniform.py`).",
        "",
        "| model | FLOPs target | variant | FLOPs | top-1 | drop | seconds | plan loss | "
        "uniform baseline (loss) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        reach = "" if r["reached"] else " (not reached)"
        loss = f"{r['plan_loss']:.4g}" if r.get("plan_loss", "") != "" else ""
        uni = ""
        if r.get("uniform_plan"):
            taken = ", taken" if r["uniform_taken"] else ""
            uni = f"{r['uniform_plan']} ({r['uniform_loss']:.4g}{taken})"
        lines.append(
            f"| {r['model']} | {r['target']} | {r['variant']} | {r['flops_ratio']:.2f}×{reach} | "
            f"{r['top1']:.2f} % | {r['drop']:+.2f} | {r['seconds']:.0f} | {loss} | {uni} |"
        )
    (out / "data_free.md").write_text("\n".join(lines) + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="ResNet-20 at 2x, a temporary folder")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.out = output_folder(p, args.out, "--quick" if args.quick else None, "data-free-")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    assets = shared_assets_dir()
    if assets is None or not (assets / ONNX).is_file():
        sys.exit("data_free: the shared CIFAR-10 assets (with the ONNX network) are not found")
    try:
        import tltorch  # noqa: F401
    except ImportError:
        peer = False
    else:
        peer = True
    torch.set_num_threads(2)
    exact = load_cifar10_exact(assets / "test_batch.truncated_first_3145728_bytes")
    test = (exact.as_float(MEAN, STD), exact.labels)
    bases = {arch: load_model(assets / f, arch)[0] for f, arch in RESNETS}
    bases["mbv2"] = mbv2(assets)
    if args.quick:
        bases = {"cifar_resnet20": bases["cifar_resnet20"]}
    originals = {n: 100 * evaluate(m, *test)["top1"] for n, m in bases.items()}
    variants = ["ours, data-free", "ours, synthetic", "ours, 512 real images"]
    variants += ["TensorLy-Torch uniform CP"] if peer else []
    rows = []
    for name, base in bases.items():
        for target in TARGETS[:1] if args.quick else TARGETS:
            for variant in variants:
                row = run(name, base, target, variant, test, assets, args.quick)
                row["drop"] = row["top1"] - originals[name]
                rows.append(row)
                print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()},
                      flush=True)  # fmt: skip
                write(rows, Path(args.out), originals, peer)
    print(f"wrote {args.out}/data_free.md and data_free.csv")


if __name__ == "__main__":
    main()

"""Accuracy of the 1×1-conv methods on a real network whose FLOPs are in 1×1 convs: the shared
MobileNetV2-style CIFAR-10 network, at 1.5× and 2× fewer FLOPs, data-free and calibrated, with
and without channel pruning and head distillation, beside what the k×k methods alone can do on
it; and the shared CIFAR ResNets' calibrated 2× plans, which have no 1×1 conv and must not move.

Every run is ``compress_`` with the CLI's defaults for the flags it names (``--target-flops R``:
``--method auto``; with ``--calib``: the ``output`` criterion, ``--refit auto``, pruning on
unless ``--no-prune``, a pruned head distilled unless ``--no-distill-head``). Two measures of
what a plan loses:

* top-1 on the 1,017 exact-pixel test images (what every other table in ``results/`` uses);
* on the JPEG test images of index ≥ 1017 that the run did not calibrate on (about 7,000 or
  8,500, seven times as many, so a drop is measured to a third of the noise): the change of
  top-1 against the original's on the same images, and the share of images whose predicted class
  did not change (agreement, which needs no label).

Calibration images are a seeded sample of the JPEG images of index ≥ 1017 (seeds 0-2).

Run (needs ../shared/assets; about 13 minutes on 2 cores)::

    pip install -e '.[dev,vision]' && python experiments/mbv2_accuracy.py

→ ``results/mbv2.md``, ``results/mbv2.csv``. ``--quick``: one small run into a temporary folder.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from experiment_io import output_folder, write_csv

from decouple import DecoupleConfig, count_flops
from decouple.io.checkpoint import load_model
from decouple.io.evaluate import evaluate
from decouple.io.images import load_cifar10_exact, load_cifar10_jpeg, shared_assets_dir
from decouple.io.onnx_weights import state_dict_from_onnx
from decouple.io.paired_change import paired_change
from decouple.models import build_model
from decouple.nn.discover import is_plain_conv2d, is_plain_linear
from decouple.pipeline import compress_

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ONNX = "mbv2_tinymlperf_alibaba_cifar10.onnx"
RESNETS = [("resnet20-12fca82f.th", "cifar_resnet20"), ("resnet32-d509ac18.th", "cifar_resnet32")]
FIELDS = ["model", "layers", "target", "calib", "seed", "flops_ratio", "reached", "top1", "drop",
          "drop_low", "drop_high", "jpeg_images", "jpeg_drop", "jpeg_low", "jpeg_high",
          "agreement", "seconds", "methods", "pruned"]  # fmt: skip
LAYERS = (
    "every layer", "every layer, no head distillation", "every layer, no pruning",
    "k×k methods only",
)  # fmt: skip


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


def jpeg_set(assets: Path):
    """Every JPEG test image of index ≥ 1017: (images, labels, indices)."""
    tar = assets / "cifar10_test_jpeg_q75_YoongiKim.tar"
    got = load_cifar10_jpeg(
        tar, assets / "test_batch.truncated_first_3145728_bytes", min_index=1017
    )
    return got.as_float(MEAN, STD), torch.as_tensor(got.labels), torch.as_tensor(got.indices)


def calib_sample(assets: Path, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded sample of ``n`` JPEG images of index ≥ 1017, and their indices."""
    batch = assets / "test_batch.truncated_first_3145728_bytes"
    tar = assets / "cifar10_test_jpeg_q75_YoongiKim.tar"
    got = load_cifar10_jpeg(tar, batch, min_index=1017, limit=n, seed=seed)
    assert int(got.indices.min()) >= 1017, "calibration must never touch evaluation images"
    return got.as_float(MEAN, STD), torch.as_tensor(got.indices)


def calib_images(assets: Path, n: int, seed: int) -> torch.Tensor:
    """The images of :func:`calib_sample`."""
    return calib_sample(assets, n, seed)[0]


@torch.no_grad()
def predictions(model, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])


def paired(mine: torch.Tensor, theirs: torch.Tensor, labels: torch.Tensor):
    """The top-1 change of ``mine`` against ``theirs`` (predictions) and its paired interval."""
    right, was = mine == labels, theirs == labels
    fixed, broken = int((right & ~was).sum()), int((was & ~right).sum())
    return paired_change(len(labels), fixed, broken)


def run(name, base, layers, target, calib, seed, test, jpeg) -> dict:
    x, y, xbase = test  # xbase: the original's predictions on x
    model = copy.deepcopy(base)
    overrides = pointwise_skips(model) if layers == "k×k methods only" else {}
    images = None if calib is None else calib[0]
    start = time.perf_counter()
    result = compress_(
        model, DecoupleConfig(method="auto", overrides=overrides), (3, 32, 32),
        target_flops=target, criterion="output" if images is not None else "energy",
        calib_images=images, prune=layers != "every layer, no pruning",
        distill_head=layers != "every layer, no head distillation",
    )  # fmt: skip
    seconds = time.perf_counter() - start
    f0, f1 = count_flops(base, x[:1])[0], count_flops(model, x[:1])[0]
    top1 = 100 * evaluate(model, x, y)["top1"]
    exact = paired(predictions(model, x), xbase, y)
    jx, jy, jidx, jbase = jpeg
    held = torch.ones(len(jx), dtype=torch.bool) if calib is None else ~torch.isin(jidx, calib[1])
    mine, theirs = predictions(model, jx[held]), jbase[held]
    jp = paired(mine, theirs, jy[held])
    kinds: dict[str, int] = {}
    for label in result.allocation.methods().values():
        k = "keep" if label == "keep" else label.rsplit(" ", 1)[0]
        kinds[k] = kinds.get(k, 0) + 1
    return {
        "model": name, "layers": layers, "target": target,
        "calib": 0 if images is None else len(images), "seed": seed, "flops_ratio": f0 / f1,
        "reached": result.allocation.total_flops <= result.allocation.target_flops,
        "top1": top1, "seconds": seconds,
        "drop_low": 100 * exact.low, "drop_high": 100 * exact.high,
        "jpeg_images": int(held.sum()), "jpeg_drop": 100 * jp.change,
        "jpeg_low": 100 * jp.low, "jpeg_high": 100 * jp.high,
        "agreement": 100 * float((mine == theirs).float().mean()),
        "methods": ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())),
        "pruned": ", ".join(f"{p} {len(keep)}/{chain.width}"
                            for p, (chain, keep) in result.allocation.pruned.items()),
    }  # fmt: skip


def plan_runs(quick: bool) -> list[tuple]:
    """(model, layers, target, calibration images, seed) of every run."""
    if quick:
        return [("mbv2", "every layer", 0.5, 256, 0)]
    runs = []
    for target in (0.67, 0.5):
        runs += [("mbv2", "every layer", target, 0, 0), ("mbv2", "k×k methods only", target, 0, 0)]
        for n in (512, 2048):
            for seed in (0, 1, 2):
                runs += [("mbv2", layers, target, n, seed) for layers in LAYERS[:3]]
    runs += [(arch, "every layer", 0.5, 512, seed) for _, arch in RESNETS for seed in (0, 1, 2)]
    return runs


def summary(rows: list[dict]) -> list[dict]:
    """Per (model, layers, target, calibration size): the mean over its seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["layers"], r["target"], r["calib"]), []).append(r)
    out = []
    for (model, layers, target, calib), rs in groups.items():
        mean = {k: sum(r[k] for r in rs) / len(rs)
                for k in ("flops_ratio", "drop", "jpeg_drop", "agreement")}  # fmt: skip
        for k, lo, hi in (
            ("drop_pm", "drop_low", "drop_high"),
            ("jpeg_pm", "jpeg_low", "jpeg_high"),
        ):
            mean[k] = sum(r[hi] - r[lo] for r in rs) / (2 * len(rs))
        out.append({"model": model, "layers": layers, "target": target, "calib": calib,
                    "seeds": len(rs), "reached": all(r["reached"] for r in rs), **mean})  # fmt: skip
    return out


def write(rows: list[dict], out: Path, originals: dict) -> None:
    write_csv(out / "mbv2.csv", FIELDS, rows)
    lines = [
        "# 1×1 convs: the shared MobileNetV2-style CIFAR-10 network",
        "",
        "Written by `python experiments/mbv2_accuracy.py`. Original top-1 on the 1,017 "
        "exact-pixel CIFAR-10 test images: "
        + ", ".join(f"{k} {v:.2f} %" for k, v in originals.items())
        + ". `--target-flops R` with `--method auto` (k×k convs: every method; 1×1 convs and "
        "linear layers: svd; with calibration also channel pruning, unless *no pruning*, and a "
        "pruned head fit to the original's outputs, unless *no head distillation*; linear "
        "1×1 pairs that are cheaper as one conv fused exactly first, here the last block's "
        "projection into `tail.0`); "
        "calibrated runs use the `output` criterion and `--refit auto` on a seeded sample of the "
        "JPEG test images of index ≥ 1017. *exact drop*: top-1 change on the 1,017 exact-pixel "
        "images; *held-out drop* and *agreement*: top-1 change and unchanged predictions on the "
        "JPEG images of index ≥ 1017 the run did not calibrate on. Beside each drop, its 95 % "
        "paired interval (`decouple.io.paired_change`: exact, from the images only one of the two "
        "models gets right); in the first table ± is half the width of one run's interval "
        "(mean over the samples: they share the test images, so their mean is no surer).",
        "",
        "## Mean over calibration samples",
        "",
        "| model | layers | target | calibration images | samples | FLOPs | exact drop | "
        "held-out drop | agreement |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in summary(rows):
        cal = "data-free" if not r["calib"] else str(r["calib"])
        reach = "" if r["reached"] else " (not reached)"
        lines.append(
            f"| {r['model']} | {r['layers']} | {r['target']} | {cal} | {r['seeds']} | "
            f"{r['flops_ratio']:.2f}×{reach} | {r['drop']:+.2f} (±{r['drop_pm']:.2f}) | "
            f"{r['jpeg_drop']:+.2f} (±{r['jpeg_pm']:.2f}) | {r['agreement']:.2f} % |"
        )
    lines += [
        "",
        "## Every run",
        "",
        "| model | layers | target | calibration images (seed) | FLOPs | top-1 | exact drop | "
        "held-out drop | agreement | methods chosen | channels kept | seconds |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in rows:
        cal = "data-free" if not r["calib"] else f"{r['calib']} ({r['seed']})"
        reach = "" if r["reached"] else " (budget not reached)"
        lines.append(
            f"| {r['model']} | {r['layers']} | {r['target']} | {cal} | "
            f"{r['flops_ratio']:.2f}×{reach} | {r['top1']:.2f} % | {r['drop']:+.2f} "
            f"({r['drop_low']:+.2f} to {r['drop_high']:+.2f}) | {r['jpeg_drop']:+.2f} "
            f"({r['jpeg_low']:+.2f} to {r['jpeg_high']:+.2f}) | {r['agreement']:.2f} % | {r['methods']} | "
            f"{r['pruned'] or '–'} | {r['seconds']:.0f} |"
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
    test = (exact.as_float(MEAN, STD), torch.as_tensor(exact.labels))
    bases = {"mbv2": mbv2(assets)}
    for f, arch in RESNETS:
        bases[arch] = load_model(assets / f, arch)[0]
    originals = {n: 100 * evaluate(m, *test)["top1"] for n, m in bases.items()}
    jx, jy, jidx = jpeg_set(assets)
    jpeg = {n: (jx, jy, jidx, predictions(m, jx)) for n, m in bases.items()}
    tests = {
        n: (*test, predictions(m, test[0])) for n, m in bases.items()
    }  # made once, not per run
    rows = []
    for name, layers, target, n_calib, seed in plan_runs(args.quick):
        calib = calib_sample(assets, n_calib, seed) if n_calib else None
        row = run(name, bases[name], layers, target, calib, seed, tests[name], jpeg[name])
        row["drop"] = row["top1"] - originals[name]
        rows.append(row)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        write(rows, Path(args.out), originals)
    print(f"wrote {args.out}/mbv2.md and mbv2.csv")


if __name__ == "__main__":
    main()

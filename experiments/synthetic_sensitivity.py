"""Why synthetic calibration plans fall short of real-image ones: which of the planner's two
readings of the images misleads it.

With calibration images, the planner (``--target-flops``, ``output`` criterion) prices each option
of each layer by two things it reads from the images (``decouple/plan/losses.py``): the layer's
held-out output error after the refit (from the layer's input moments), and the layer's
*sensitivity*, the size of the network's output Jacobian with respect to that layer's output
(``output_sensitivity``). On the shared CIFAR ResNets, for each of 3 seeds:

* the sensitivity of every conv on 256 ZeroQ images (``--calib synthetic --no-mirror``: the
  made images alone, without the mirrors ``--calib synthetic`` adds since;
  :mod:`decouple.calibrate.synthetic`, the seed's starting noise) against that on 512 real JPEG
  test images of index ≥ 1017 (the seed's draw), as a ratio per layer, averaged per stage;
* the ``--target-flops 0.5`` plan calibrated on the synthetic images (the refit always on them),
  with the planner's two readings taken from the synthetic or the real images: *synthetic* (as
  ``--calib synthetic`` runs), *real sensitivity*, *real moments*, *real both*. Top-1 on the 1,017
  exact-pixel images, with the exact 95 % paired interval of its change against the original.

Run (needs ../shared/assets; about 30 minutes on 2 cores, most of it making the images; they are
cached as ``--calib synthetic`` caches them, so a second run takes about 10)::

    pip install -e '.[dev,vision]' && python experiments/synthetic_sensitivity.py

→ ``results/synthetic_sensitivity.md``, ``results/synthetic_sensitivity.csv`` (the plans),
``results/synthetic_sensitivity_layers.csv`` (every layer's sensitivity). ``--quick``:
ResNet-20, 32 images, one seed, into a temporary folder.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from experiment_io import output_folder, write_csv
from mbv2_accuracy import MEAN, RESNETS, STD, calib_images, paired, predictions

import decouple.plan.options as planner
from decouple import DecoupleConfig
from decouple.calibrate.synthetic import LEARNING_RATE, STEPS, synthesize_images
from decouple.io import synthetic_cache
from decouple.io.checkpoint import load_model
from decouple.io.images import load_cifar10_exact, shared_assets_dir
from decouple.pipeline import compress_
from decouple.plan.losses import output_sensitivity
from decouple.surgery.bn_fold import fold_batchnorm_

SHAPE = (3, 32, 32)
VARIANTS = {  # (sensitivity from, moments from); the refit always reads the synthetic images
    "synthetic": ("synthetic", "synthetic"),
    "real sensitivity": ("real", "synthetic"),
    "real moments": ("synthetic", "real"),
    "real both": ("real", "real"),
}
PLAN_FIELDS = ["model", "seed", "variant", "top1", "drop", "low", "high", "methods"]
RATIO_FIELDS = ["model", "seed", "layer", "stage", "real", "synthetic", "ratio"]


def synthetic(base, count: int, seed: int) -> torch.Tensor:
    """``count`` ZeroQ images of ``seed``, from the cache ``--calib synthetic`` uses or made."""
    settings = {"count": count, "seed": seed, "steps": STEPS, "lr": LEARNING_RATE, "batch": 64}
    path = synthetic_cache.path_for(base, SHAPE, settings)
    hit = synthetic_cache.load(path, count, SHAPE) if path else None
    if hit is not None:
        return hit[0]
    x, made = synthesize_images(base, SHAPE, count, seed=seed, mirror=False)
    if path is not None:
        synthetic_cache.store(path, x, made.to_dict())
    return x


def stage_of(name: str) -> str:
    return name.split(".")[0] if name.startswith("layer") else "stem"


def ratios(name: str, base, seed: int, images: dict) -> list[dict]:
    """Each conv's sensitivity on the real and the synthetic images (BN folded, as planned)."""
    folded = copy.deepcopy(base)
    fold_batchnorm_(folded)
    convs = [n for n, m in folded.named_modules() if isinstance(m, torch.nn.Conv2d)]
    got = {k: output_sensitivity(folded, convs, x) for k, x in images.items()}
    return [
        {"model": name, "seed": seed, "layer": n, "stage": stage_of(n), "real": got["real"][n],
         "synthetic": got["synthetic"][n], "ratio": got["synthetic"][n] / got["real"][n]}
        for n in convs
    ]  # fmt: skip


def plan(name, base, seed, variant, images, test) -> dict:
    """The 2x plan calibrated on the synthetic images, the planner reading ``variant``'s."""
    sens_from, moments_from = VARIANTS[variant]
    sensitivity, moments = planner.output_sensitivity, planner.collect_moments
    planner.output_sensitivity = lambda m, names, _x, *a, **k: sensitivity(
        m, names, images[sens_from], *a, **k
    )
    planner.collect_moments = lambda m, names, _x, *a, **k: moments(
        m, names, images[moments_from], *a, **k
    )
    try:
        model = copy.deepcopy(base)
        result = compress_(
            model, DecoupleConfig(method="auto"), SHAPE, target_flops=0.5,
            criterion="output", calib_images=images["synthetic"],
        )  # fmt: skip
    finally:
        planner.output_sensitivity, planner.collect_moments = sensitivity, moments
    x, y, before = test
    after = predictions(model, x)
    c = paired(after, before, y)
    kinds = Counter(result.allocation.methods().values())
    return {
        "model": name, "seed": seed, "variant": variant, "top1": 100 * float((after == y).float().mean()),
        "drop": 100 * c.change, "low": 100 * c.low, "high": 100 * c.high,
        "methods": ", ".join(f"{k} ×{v}" for k, v in kinds.items()),
    }  # fmt: skip


def write(out: Path, plans: list[dict], ratio_rows: list[dict], counts: tuple[int, int]) -> None:
    write_csv(out / "synthetic_sensitivity.csv", PLAN_FIELDS, plans)
    write_csv(out / "synthetic_sensitivity_layers.csv", RATIO_FIELDS, ratio_rows)
    lines = [
        "# Synthetic calibration: which of the planner's readings of the images misleads it",
        "",
        "Written by `python experiments/synthetic_sensitivity.py` (its docstring says how each "
        f"variant runs). Synthetic: {counts[0]} ZeroQ images per seed; real: {counts[1]} JPEG "
        "test images of index ≥ 1017 per seed. Per-layer figures: "
        "`synthetic_sensitivity_layers.csv`.",
        "",
        "## Sensitivity on synthetic images against real ones, mean ratio per stage",
        "",
        "| model | seed | stem | layer1 | layer2 | layer3 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    keys = sorted({(r["model"], r["seed"]) for r in ratio_rows}, key=str)
    for model, seed in keys:
        rs = [r for r in ratio_rows if (r["model"], r["seed"]) == (model, seed)]
        cells = []
        for st in ("stem", "layer1", "layer2", "layer3"):
            v = [r["ratio"] for r in rs if r["stage"] == st]
            cells.append(f"{sum(v) / len(v):.2f}" if v else "–")
        lines.append(f"| {model} | {seed} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## 2× fewer FLOPs, calibrated on the synthetic images: the planner reading each",
        "",
        "| model | variant | seeds | mean top-1 change | each seed (95 % paired interval) |",
        "|---|---|---:|---:|---|",
    ]
    for model in dict.fromkeys(p["model"] for p in plans):
        for variant in VARIANTS:
            ps = [p for p in plans if p["model"] == model and p["variant"] == variant]
            if not ps:
                continue
            each = "; ".join(f"{p['drop']:+.2f} ({p['low']:+.2f} to {p['high']:+.2f})" for p in ps)
            mean = sum(p["drop"] for p in ps) / len(ps)
            lines.append(f"| {model} | {variant} | {len(ps)} | {mean:+.2f} | {each} |")
    (out / "synthetic_sensitivity.md").write_text("\n".join(lines) + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="ResNet-20, 32 images, one seed")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.out = output_folder(p, args.out, "--quick" if args.quick else None, "synsens-")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    assets = shared_assets_dir()
    if assets is None:
        sys.exit("synthetic_sensitivity: the shared CIFAR-10 assets are not found")
    torch.set_num_threads(2)
    exact = load_cifar10_exact(assets / "test_batch.truncated_first_3145728_bytes")
    x, y = exact.as_float(MEAN, STD), torch.as_tensor(exact.labels)
    nets = RESNETS[:1] if args.quick else RESNETS
    seeds = range(1 if args.quick else args.seeds)
    counts = (32, 64) if args.quick else (256, 512)  # synthetic, real
    plans, ratio_rows = [], []
    for f, arch in nets:
        base = load_model(assets / f, arch)[0].eval()
        test = (x, y, predictions(base, x))
        for seed in seeds:
            start = time.perf_counter()
            images = {
                "synthetic": synthetic(base, counts[0], seed),
                "real": calib_images(assets, counts[1], seed),
            }
            print(f"{arch} seed {seed}: images in {time.perf_counter() - start:.0f} s", flush=True)
            ratio_rows += ratios(arch, base, seed, images)
            for variant in VARIANTS:
                plans.append(plan(arch, base, seed, variant, images, test))
                print(plans[-1], flush=True)
            write(Path(args.out), plans, ratio_rows, counts)
    print(f"wrote {args.out}/synthetic_sensitivity.md")


if __name__ == "__main__":
    main()

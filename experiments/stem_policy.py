"""What keeping the stem (the default) costs or saves, on the real pretrained CIFAR-10 ResNets.

Run (needs ../shared/assets; a few minutes on one core):

    python experiments/stem_policy.py

For the shared ResNet-20 and ResNet-32 it measures top-1 on the 1,017 exact-pixel test images
after ``--rank 2`` and ``--target-flops 0.5`` (network decoupling, dw-pw, BN folded), data-free
and calibrated (128 JPEG test images with index >= 1017, never the evaluation images), once with
the stem kept (``include_stem=False``, the default) and once with it decoupled
(``include_stem=True``); also the whole model's FLOPs ratio for one 3×32×32 image.

Writes results/stem.csv and results/stem.md.
"""

from __future__ import annotations

import argparse
import copy
import csv
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_sweep import SHAPE, SHARED, load_sets  # noqa: E402

from decouple.io.checkpoint import load_model  # noqa: E402
from decouple.io.evaluate import evaluate  # noqa: E402
from decouple.models import get_model_info  # noqa: E402
from decouple.nn.flops import count_flops  # noqa: E402
from decouple.pipeline import compress_  # noqa: E402
from decouple.surgery.config import DecoupleConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = (("rank 2", {"rank": 2}, None), ("target-flops 0.5", {}, 0.5))
COLUMNS = ["model", "setting", "calibrated", "stem", "top1", "drop", "flops_ratio", "stem_rank"]


def run_one(base, config_args, target, include_stem, calib, images, labels, flops0) -> dict:
    """One decoupling of a copy of ``base``: its top-1, FLOPs ratio and the stem's rank."""
    model = copy.deepcopy(base)
    config = DecoupleConfig(**config_args, include_stem=include_stem)
    result = compress_(model, config, SHAPE, target_flops=target, calib_images=calib)
    flops, _ = count_flops(model, torch.zeros(1, *SHAPE))
    stem = next(r for r in result.records if r.name == "conv1")
    return {
        "top1": round(100 * evaluate(model, images, labels)["top1"], 2),
        "flops_ratio": round(flops0 / flops, 3),
        "stem_rank": f"{stem.rank}/{stem.max_rank}" if stem.action == "decoupled" else "kept",
    }


def write_markdown(rows: list[dict], originals: dict[str, float], path: Path, cmd: str) -> None:
    lines = [
        "# Stem policy: keep the stem (default) or decouple it",
        "",
        f"Made by `{cmd}`. Top-1 (%) on the 1,017 exact-pixel CIFAR-10 test images; FLOPs ratio "
        "= original / decoupled for one 3×32×32 image; network decoupling (dw-pw), BN folded; "
        "calibrated runs refit on 128 other test images. Originals: "
        + ", ".join(f"{m} {a:.2f} %" for m, a in originals.items())
        + ".",
        "",
        "| model | setting | calibrated | stem | top-1 | drop | FLOPs ratio | stem rank |",
        "|---|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['setting']} | {'yes' if r['calibrated'] else 'no'} | "
            f"{r['stem']} | {r['top1']:.2f} | {r['drop']:+.2f} | {r['flops_ratio']:.3f} | "
            f"{r['stem_rank']} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", type=Path, default=None, help="the shared cifar10 folder")
    parser.add_argument("--calib-size", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    assets, test, calib_set = load_sets(args.assets, args.calib_size)
    rows, originals = [], {}
    start = time.perf_counter()
    for file, arch in SHARED:
        meta = get_model_info(arch).meta
        images = test.as_float(meta["mean"], meta["std"])
        calib = calib_set.as_float(meta["mean"], meta["std"])
        base, _, _ = load_model(assets / file, arch)
        flops0, _ = count_flops(base, torch.zeros(1, *SHAPE))
        name = arch.replace("cifar_", "")
        originals[name] = 100 * evaluate(base, images, test.labels)["top1"]
        for setting, config_args, target in SETTINGS:
            for calibrated in (False, True):
                for include in (False, True):
                    got = run_one(
                        base, config_args, target, include, calib if calibrated else None,
                        images, test.labels, flops0,
                    )  # fmt: skip
                    row = {
                        "model": name,
                        "setting": setting,
                        "calibrated": calibrated,
                        "stem": "decoupled" if include else "kept",
                        **got,
                        "drop": round(got["top1"] - originals[name], 2),
                    }
                    rows.append(row)
                    print(row, f"({time.perf_counter() - start:.0f} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "stem.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: r[k] for k in COLUMNS} for r in rows)
    write_markdown(rows, originals, args.out / "stem.md", "python experiments/stem_policy.py")


if __name__ == "__main__":
    main()

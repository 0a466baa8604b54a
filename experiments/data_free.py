"""No images at all: our data-free plans, synthetic calibration, and TensorLy-Torch's uniform CP.

On the shared pretrained CIFAR-10 ResNet-20, ResNet-32 and MobileNetV2-style network, at 2× and
2.5× fewer FLOPs (``--target-flops 0.5`` and ``0.4``), top-1 on the 1,017 exact-pixel test images:

* **ours, data-free**: ``compress_`` as the CLI runs it without ``--calib`` (``--method auto``,
  the ``energy`` criterion, each factored layer's bias corrected from the BatchNorm statistics,
  :mod:`decouple.calibrate.bn_bias`); **no bias correction**: the same plan as factored
  (``--no-bias-correction``);
* **ours, synthetic**: ``--calib synthetic`` (256 images made from the model's BatchNorm
  statistics, ZeroQ, :mod:`decouple.calibrate.synthetic`, each also used mirrored left to right,
  512 in all; then the calibrated default path:
  ``output`` criterion, ``--refit auto``, pruning, head distillation), on 3 seeds of the
  starting noise; the images are made once per model and seed and used at both targets (their
  cost apart);
* **ours, synthetic, no mirrors**: the same made images alone (``--calib synthetic
  --no-mirror``), to show what the mirrors add;
* **ours, 512 real images**: ``--calib`` with a seeded sample of 512 JPEG test images of index
  ≥ 1017, 3 seeded draws (the reference synthetic calibration is judged against);
* **TensorLy-Torch uniform CP**, 3 seeds (``tltorch.FactorizedConv.from_conv``, ``factorization="CP"``,
  ``implementation="factorized"``, the kernel decomposed): every conv with ``groups=1`` but the
  3-channel stem at one parameter fraction, found by bisection so that the whole model's FLOPs
  (``FlopCounterMode``) meet the target; skipped when ``tensorly-torch`` is not installed
  (the ``peers`` extra, for this experiment only).

Run (needs ../shared/assets; about 55 minutes on 2 cores, most of it making the synthetic images
and scoring every plan on ~9,000 held-out images)::

    pip install -e '.[dev,vision,peers]' && python experiments/data_free.py

A second table asks whether the data-free loss ranks plans as top-1 does: every data-free plan
of each method (network decoupling in both orders, CP, Tucker-2, ``auto``; on the
MobileNetV2-style network ``svd`` and ``auto``) at 0.7, 0.5 and 0.4 of the FLOPs, with and without
the bias correction, and the Spearman correlation of the plans' predicted loss with their top-1
(``--ranking-only`` runs that table alone).

Every drop is also measured on the JPEG test images of index ≥ 1017 that the run did not
calibrate on (about 9,000, so a drop is known to a third of the noise), with its exact 95 %
paired interval; and each of our variants meets TensorLy-Torch's CP head to head, image by
image, on both sets of images.

→ ``results/data_free.md``, ``results/data_free.csv``, ``results/data_free_vs_peer.csv``,
``results/data_free_ranking.csv``. ``--quick``: ResNet-20 at 2× only, 32 synthetic images, one
seed, into a temporary folder; ``--seeds N`` samples per seeded variant; ``--only VARIANT ...``
reruns those variants, keeping the other rows of the csv (and the head-to-head rows of variants
not rerun, unless the peer is); ``--models NAME ...`` likewise reruns those models only.
"""

from __future__ import annotations

import argparse
import copy
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch
from experiment_io import output_folder, write_csv
from mbv2_accuracy import (
    MEAN,
    ONNX,
    RESNETS,
    STD,
    calib_sample,
    jpeg_set,
    mbv2,
    paired,
    predictions,
)
from scipy.stats import spearmanr

from decouple import DecoupleConfig, count_flops
from decouple.calibrate.synthetic import synthesize_images
from decouple.io.checkpoint import load_model
from decouple.io.evaluate import evaluate
from decouple.io.images import load_cifar10_exact, shared_assets_dir
from decouple.nn.discover import is_plain_conv2d
from decouple.pipeline import compress_
from decouple.surgery.methods import FactorCache

FIELDS = [
    "model",
    "target",
    "variant",
    "seed",
    "flops_ratio",
    "reached",
    "top1",
    "drop",
    "drop_low",
    "drop_high",
    "jpeg_images",
    "jpeg_drop",
    "jpeg_low",
    "jpeg_high",
    "agreement",
    "seconds",
    "making_s",
    "plan_loss",
    "uniform_plan",
    "uniform_loss",
    "uniform_taken",
]
TARGETS = (0.5, 0.4)
MODELS = ("cifar_resnet20", "cifar_resnet32", "mbv2")
SHAPE = (3, 32, 32)
BATCH = 128  # images per forward pass when predicting: 2.4x faster than 512 on 2 cores


def ours(
    base, target: float, calib: torch.Tensor | None, bias_correction: bool = True
) -> tuple[torch.nn.Module, bool, dict]:
    """The compressed copy, whether it reached the target, and its plan's loss beside the best
    uniform plan's (the baseline the planner compares it with, by the same loss)."""
    model = copy.deepcopy(base)
    result = compress_(
        model, DecoupleConfig(method="auto"), SHAPE, target_flops=target,
        criterion="output" if calib is not None else "energy", calib_images=calib,
        bias_correction=bias_correction,
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


def tltorch_at(base, target: float, x: torch.Tensor, seed: int) -> tuple[torch.nn.Module, bool]:
    """Uniform CP at the largest parameter fraction whose FLOPs meet ``target`` (bisection on
    layers initialised at random: only their shapes count), then decomposed for real. Its CP
    (tensorly's ``parafac``) fills ranks above a mode's size from NumPy's global random state,
    so ``seed`` seeds that (and torch's): unseeded, its top-1 moved from run to run."""
    np.random.seed(seed)
    torch.manual_seed(seed)
    f0 = count_flops(base, x[:1])[0]
    lo, hi = 0.01, 1.0
    for _ in range(12):
        mid = (lo + hi) / 2
        ratio = count_flops(tltorch_uniform(base, mid, decompose=False), x[:1])[0] / f0
        lo, hi = (mid, hi) if ratio <= target else (lo, mid)
    model = tltorch_uniform(base, lo, decompose=True)
    return model, count_flops(model, x[:1])[0] / f0 <= target * 1.001


def run(name, base, target, variant, seed, test, assets, made, jpeg) -> tuple[dict, tuple]:
    """One row: ``variant`` of ``name`` at ``target`` (``seed``: the synthetic or real sample's;
    ``made``: the synthetic images of that seed, already made, and the seconds they took), and
    the compressed model's predictions (exact-pixel images, JPEG images, which JPEG images it
    did not calibrate on) for the head-to-head comparison.

    ``test`` and ``jpeg`` hold the original's predictions last: each drop is paired with them."""
    x, y, xbase = test
    jx, jy, jidx, jbase = jpeg
    calibrated = torch.zeros(0, dtype=jidx.dtype)
    start = time.perf_counter()
    plan: dict = {}
    making = ""
    if variant == "ours, data-free":
        model, reached, plan = ours(base, target, None)
    elif variant == "ours, data-free, no bias correction":
        model, reached, plan = ours(base, target, None, bias_correction=False)
    elif variant == "ours, synthetic":
        images, making = made
        model, reached, plan = ours(base, target, images)
    elif variant == NO_MIRRORS:  # the same made images, without the mirrors that follow them
        images, making = made
        model, reached, plan = ours(base, target, images[: len(images) // 2])
    elif variant == "ours, 512 real images":
        images, calibrated = calib_sample(assets, 512, seed)
        model, reached, plan = ours(base, target, images)
    else:
        model, reached = tltorch_at(base, target, x, seed)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        ratio = count_flops(base, x[:1])[0] / count_flops(model, x[:1])[0]
        mine, jmine = predictions(model, x, BATCH), predictions(model, jx, BATCH)
    top1 = 100 * float((mine == y).float().mean())  # the predictions made, not another pass
    held = ~torch.isin(jidx, calibrated)
    exact, jp = paired(mine, xbase, y), paired(jmine[held], jbase[held], jy[held])
    row = {"model": name, "target": target, "variant": variant, "seed": seed,
           "flops_ratio": ratio, "reached": reached, "top1": top1, "seconds": seconds,
           "making_s": making, "drop_low": 100 * exact.low, "drop_high": 100 * exact.high,
           "jpeg_images": int(held.sum()), "jpeg_drop": 100 * jp.change,
           "jpeg_low": 100 * jp.low, "jpeg_high": 100 * jp.high,
           "agreement": 100 * float((jmine[held] == jbase[held]).float().mean()),
           **plan}  # fmt: skip
    return row, (mine, jmine, held)


NO_MIRRORS = "ours, synthetic, no mirrors"
SEEDED = ("ours, synthetic", NO_MIRRORS, "ours, 512 real images", "TensorLy-Torch uniform CP")
VARIANTS = (
    "ours, data-free, no bias correction",
    "ours, data-free",
    NO_MIRRORS,
    "ours, synthetic",
    "ours, 512 real images",
    "TensorLy-Torch uniform CP",
)


def summary(rows: list[dict]) -> list[dict]:
    """Per (model, target, variant): top-1 and drop, mean and range over its seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["target"], r["variant"]), []).append(r)
    out = []
    for (model, target, variant), rs in groups.items():
        tops = [r["top1"] for r in rs]
        mean = {k: sum(r[k] for r in rs) / len(rs)
                for k in ("flops_ratio", "drop", "jpeg_drop", "agreement")}  # fmt: skip
        out.append({"model": model, "target": target, "variant": variant, "seeds": len(rs),
                    "reached": all(r["reached"] for r in rs), "top1": sum(tops) / len(rs),
                    "low": min(tops), "high": max(tops), **mean,
                    "drop_pm": _half_width(rs, "drop_low", "drop_high"),
                    "jpeg_pm": _half_width(rs, "jpeg_low", "jpeg_high")})  # fmt: skip
    return out


def _half_width(rs: list[dict], low: str, high: str) -> float:
    """Half the width of one run's 95 % paired interval, the mean over ``rs``: they share the
    test images, so their mean is no surer than one of them."""
    return sum(r[high] - r[low] for r in rs) / (2 * len(rs))


PEER = "TensorLy-Torch uniform CP"
VS_FIELDS = ["model", "target", "variant", "seed", "exact_change", "exact_low", "exact_high",
             "jpeg_images", "jpeg_change", "jpeg_low", "jpeg_high"]  # fmt: skip


def head_to_head(preds: dict, test: dict, jpeg: tuple) -> list[dict]:
    """Each of our variants against TensorLy-Torch's uniform CP at the same model and target,
    paired image by image: seed ``s`` of ours against seed ``s`` of the peer (our data-free
    variants, deterministic, against each of the peer's seeds), on the exact-pixel images and on
    the JPEG images neither calibrated on."""
    _, jy, _ = jpeg
    rows = []
    for (name, target, variant, seed), (mine, jmine, held) in preds.items():
        if variant == PEER:
            continue
        for (n2, t2, v2, s2), (theirs, jtheirs, held2) in preds.items():
            if (n2, t2, v2) != (name, target, PEER) or (variant in SEEDED and s2 != seed):
                continue
            both = held & held2
            exact = paired(mine, theirs, test[name][1])
            jp = paired(jmine[both], jtheirs[both], jy[both])
            rows.append({"model": name, "target": target, "variant": variant, "seed": s2,
                         "exact_change": 100 * exact.change, "exact_low": 100 * exact.low,
                         "exact_high": 100 * exact.high, "jpeg_images": int(both.sum()),
                         "jpeg_change": 100 * jp.change, "jpeg_low": 100 * jp.low,
                         "jpeg_high": 100 * jp.high})  # fmt: skip
    return rows


def head_to_head_lines(rows: list[dict]) -> list[str]:
    """The section of ``data_free.md`` that compares ours with the peer, pair by pair."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["target"], r["variant"]), []).append(r)
    lines = [
        "",
        "## Head to head with TensorLy-Torch's uniform CP",
        "",
        "Each of our variants against the peer at the same model and FLOPs target, image by "
        "image (seed *s* of ours against seed *s* of the peer; our deterministic data-free "
        "variants against each of its seeds). *exact*: the top-1 difference, ours minus the "
        "peer's, on the 1,017 exact-pixel images; *held-out*: the same on the JPEG test images of "
        "index ≥ 1017 that neither calibrated on (about 9,000: a difference is measured to a "
        "third of the noise). ± is half the width of one pair's exact 95 % paired interval "
        "(`decouple.io.paired_change`); *pairs ahead*: pairs whose held-out interval lies wholly "
        "above 0. Rows in `results/data_free_vs_peer.csv`.",
        "",
        "| model | FLOPs target | ours | pairs | exact | held-out | pairs ahead |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for (model, target, variant), rs in groups.items():
        n = len(rs)
        exact = sum(r["exact_change"] for r in rs) / n
        held = sum(r["jpeg_change"] for r in rs) / n
        ahead = sum(r["jpeg_low"] > 0 for r in rs)
        lines.append(
            f"| {model} | {target} | {variant} | {n} | {exact:+.2f} "
            f"(±{_half_width(rs, 'exact_low', 'exact_high'):.2f}) | {held:+.2f} "
            f"(±{_half_width(rs, 'jpeg_low', 'jpeg_high'):.2f}) | {ahead} of {n} |"
        )
    return lines


def write(
    rows: list[dict],
    out: Path,
    originals: dict,
    peer: bool,
    seeds: int,
    ranking: list[dict],
    vs_peer: list[dict],
) -> None:
    write_csv(out / "data_free.csv", FIELDS, rows)
    write_csv(out / "data_free_vs_peer.csv", VS_FIELDS, vs_peer)
    lines = [
        "# No images: data-free plans, synthetic calibration and TensorLy-Torch's uniform CP",
        "",
        "Written by `python experiments/data_free.py` (its docstring says how each variant "
        "runs). Top-1 on the 1,017 exact-pixel CIFAR-10 test images; originals: "
        + ", ".join(f"{k} {v:.2f} %" for k, v in originals.items())
        + f". *synthetic*, *512 real images* and TensorLy-Torch run on {seeds} samples each "
        f"(seeds 0 to {seeds - 1}: the synthetic images' starting noise, the real images' draw, "
        "the random columns TensorLy's CP starts from where a rank exceeds a mode); the "
        "data-free variants are deterministic. *drop*: top-1 change in points against the "
        "original on the exact-pixel images; *held-out drop* and *agreement*: top-1 change and "
        "unchanged predictions on the JPEG test images of index ≥ 1017 the run did not calibrate "
        "on (about 9,000). Beside each drop, its 95 % paired interval "
        "(`decouple.io.paired_change`); in the first table ± is half the width of one run's "
        "interval (the samples share the test images, so their mean is no surer)."
        + ("" if peer else " TensorLy-Torch was not installed: its rows are missing."),
        "",
        "## Mean over samples",
        "",
        "| model | FLOPs target | variant | samples | FLOPs | top-1 (range) | drop | "
        "held-out drop | agreement |",
        "|---|---:|---|---:|---:|---|---:|---:|---:|",
    ]
    for r in summary(rows):
        reach = "" if r["reached"] else " (not reached)"
        spread = f" ({r['low']:.2f} to {r['high']:.2f})" if r["seeds"] > 1 else ""
        lines.append(
            f"| {r['model']} | {r['target']} | {r['variant']} | {r['seeds']} | "
            f"{r['flops_ratio']:.2f}×{reach} | {r['top1']:.2f} %{spread} | {r['drop']:+.2f} "
            f"(±{r['drop_pm']:.2f}) | {r['jpeg_drop']:+.2f} (±{r['jpeg_pm']:.2f}) | "
            f"{r['agreement']:.2f} % |"
        )
    if vs_peer:
        lines += head_to_head_lines(vs_peer)
    lines += [
        "",
        "## Every run",
        "",
        "*seconds*: planning, factoring and calibration; *making*: the synthetic images (made "
        "once per model and seed, used at both targets). *plan loss*: the plan's predicted loss "
        "(its criterion: `energy` data-free, else `output`); *uniform baseline*: the best "
        "uniform plan under the same budget and its loss by the same criterion, which the "
        "planner takes instead when lower (`decouple/plan/uniform.py`).",
        "",
        "| model | FLOPs target | variant | seed | FLOPs | top-1 | drop | held-out drop | "
        "agreement | seconds | making (s) | plan loss | uniform baseline (loss) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        reach = "" if r["reached"] else " (not reached)"
        loss = f"{r['plan_loss']:.4g}" if r.get("plan_loss", "") != "" else ""
        making = f"{r['making_s']:.0f}" if r.get("making_s", "") != "" else ""
        uni = ""
        if r.get("uniform_plan"):
            taken = ", taken" if r["uniform_taken"] else ""
            uni = f"{r['uniform_plan']} ({r['uniform_loss']:.4g}{taken})"
        seed = r["seed"] if r["variant"] in SEEDED else ""
        lines.append(
            f"| {r['model']} | {r['target']} | {r['variant']} | {seed} | "
            f"{r['flops_ratio']:.2f}×{reach} | {r['top1']:.2f} % | {r['drop']:+.2f} "
            f"({r['drop_low']:+.2f} to {r['drop_high']:+.2f}) | {r['jpeg_drop']:+.2f} "
            f"({r['jpeg_low']:+.2f} to {r['jpeg_high']:+.2f}) | {r['agreement']:.2f} % | "
            f"{r['seconds']:.0f} | {making} | {loss} | {uni} |"
        )
    if ranking:
        lines += write_ranking(ranking, out)
    (out / "data_free.md").write_text("\n".join(lines) + "\n")


def read_rows(path: Path) -> list[dict]:
    """The rows of an earlier run's csv, typed as :func:`run` makes them."""
    if not path.exists():
        return []
    floats = ("target", "flops_ratio", "top1", "drop", "seconds", "making_s", "plan_loss",
              "uniform_loss", "drop_low", "drop_high", "jpeg_drop", "jpeg_low", "jpeg_high",
              "agreement", "exact_change", "exact_low", "exact_high", "jpeg_change")  # fmt: skip
    rows = []
    with open(path) as f:
        for r in csv.DictReader(f):
            r = {k: (float(v) if k in floats and v != "" else v) for k, v in r.items()}
            r["seed"] = int(r["seed"])
            if "jpeg_images" in r:
                r["jpeg_images"] = int(r["jpeg_images"])
            if "reached" not in r:  # a head-to-head row
                rows.append(r)
                continue
            for k in ("reached", "uniform_taken"):
                r[k] = {"True": True, "False": False}.get(r[k], r[k])
            rows.append(r)
    return rows


def in_order(rows: list[dict]) -> list[dict]:
    """Rows by model (as the script runs them), target (largest first), variant, seed."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    return sorted(rows, key=lambda r: (models.index(r["model"]), -r["target"],
                                       VARIANTS.index(r["variant"]), r["seed"]))  # fmt: skip


RANK_TARGETS = (0.7, 0.5, 0.4)
RANK_METHODS = {  # (method, order) of the plans ranked; the MobileNetV2-style net's are 1×1
    "resnet": (("nd", "dw-pw"), ("nd", "pw-dw"), ("cp", "dw-pw"), ("tucker", "dw-pw"),
               ("auto", "dw-pw")),
    "mbv2": (("svd", "dw-pw"), ("auto", "dw-pw")),
}  # fmt: skip
RANK_FIELDS = ["model", "method", "target", "bias_correction", "flops_ratio", "loss", "top1"]


def ranking_rows(name: str, base, test) -> list[dict]:
    """Every data-free plan of :data:`RANK_METHODS` at :data:`RANK_TARGETS`, with and without
    the bias correction: its predicted loss (``energy``) and its top-1."""
    x, y = test
    cache = FactorCache()  # CP/Tucker factored once per model, for every target
    rows = []
    for method, order in RANK_METHODS["mbv2" if name == "mbv2" else "resnet"]:
        for target in RANK_TARGETS:
            for corrected in (False, True):
                model = copy.deepcopy(base)
                result = compress_(model, DecoupleConfig(method=method, order=order), SHAPE,
                                   target_flops=target, cache=cache,
                                   bias_correction=corrected)  # fmt: skip
                with torch.no_grad():
                    ratio = count_flops(base, x[:1])[0] / count_flops(model, x[:1])[0]
                label = method if method != "nd" else f"nd {order}"
                rows.append({"model": name, "method": label, "target": target,
                             "bias_correction": corrected, "flops_ratio": ratio,
                             "loss": result.allocation.loss,
                             "top1": 100 * evaluate(model, x, y)["top1"]})  # fmt: skip
                print(rows[-1], flush=True)
    return rows


def ranking_lines(rows: list[dict]) -> list[dict]:
    """Per model and correction: the Spearman correlation of the plans' predicted loss with
    their top-1 drop (1: the loss orders the plans exactly as top-1 does)."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for corrected in (False, True):
            pts = [r for r in rows if r["model"] == model and r["bias_correction"] == corrected]
            rho = spearmanr([r["loss"] for r in pts], [-r["top1"] for r in pts])[0]
            best = max(pts, key=lambda r: r["top1"])
            out.append({"model": model, "corrected": corrected, "plans": len(pts), "rho": rho,
                        "mean": sum(r["top1"] for r in pts) / len(pts), "best": best})  # fmt: skip
    return out


def write_ranking(rows: list[dict], out: Path) -> list[str]:
    """``data_free_ranking.csv``, and the lines of its section in ``data_free.md``."""
    write_csv(out / "data_free_ranking.csv", RANK_FIELDS, rows)
    lines = [
        "",
        "## Does the data-free loss rank plans as top-1 does?",
        "",
        "Every data-free plan of each method (`nd` in both orders, `cp`, `tucker`, `auto`; on "
        "the MobileNetV2-style network `svd` and `auto`) at "
        + ", ".join(str(t) for t in RANK_TARGETS)
        + " of the FLOPs, as factored and with the bias correction (the same plans: the "
        "correction changes biases, not ranks). *Spearman*: of the plans' predicted loss "
        "(`energy`) with their top-1 drop; *mean top-1*: over the model's plans. Rows in "
        "`results/data_free_ranking.csv`.",
        "",
        "| model | bias correction | plans | Spearman | mean top-1 | best plan (top-1) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in ranking_lines(rows):
        b = r["best"]
        lines.append(
            f"| {r['model']} | {'yes' if r['corrected'] else 'no'} | {r['plans']} | "
            f"{r['rho']:.3f} | {r['mean']:.2f} % | {b['method']} at {b['target']} "
            f"({b['top1']:.2f} %) |"
        )
    return lines


def read_ranking(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        return [{**r, "target": float(r["target"]), "bias_correction": r["bias_correction"] == "True",
                 "flops_ratio": float(r["flops_ratio"]), "loss": float(r["loss"]),
                 "top1": float(r["top1"])} for r in csv.DictReader(f)]  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="ResNet-20 at 2x, a temporary folder")
    p.add_argument("--out", default=None)
    p.add_argument("--seeds", type=int, default=3, help="samples of the seeded variants")
    p.add_argument("--only", nargs="+", choices=VARIANTS, default=None,
                   help="run these variants only; the other variants' rows stay as the csv "
                        "in --out has them")  # fmt: skip
    p.add_argument("--models", nargs="+", choices=MODELS, default=None,
                   help="run these models only; the other models' rows stay as the csv in "
                        "--out has them")  # fmt: skip
    p.add_argument("--ranking-only", action="store_true",
                   help="only the ranking table; the other rows stay as the csv in --out has "
                        "them")  # fmt: skip
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
    x, y = exact.as_float(MEAN, STD), torch.as_tensor(exact.labels)
    bases = {arch: load_model(assets / f, arch)[0] for f, arch in RESNETS}
    bases["mbv2"] = mbv2(assets)
    if args.quick:
        bases = {"cifar_resnet20": bases["cifar_resnet20"]}
    bases = {n: m for n, m in bases.items() if args.models is None or n in args.models}
    jpeg = jpeg_set(assets)
    if args.quick:  # a smoke test: a tenth of the held-out images
        jpeg = tuple(t[:1000] for t in jpeg)
    with torch.no_grad():  # the originals' predictions, made once: every drop is paired with them
        tests = {n: (x, y, predictions(m, x, BATCH)) for n, m in bases.items()}
        jpegs = {n: (*jpeg, predictions(m, jpeg[0], BATCH)) for n, m in bases.items()}
    originals = {n: 100 * float((t[2] == y).float().mean()) for n, t in tests.items()}
    variants = [v for v in VARIANTS if peer or not v.startswith("TensorLy")]
    variants = [v for v in variants if args.only is None or v in args.only]
    seeds = 1 if args.quick else args.seeds
    out = Path(args.out)
    ranking = read_ranking(out / "data_free_ranking.csv")
    vs_kept = read_rows(out / "data_free_vs_peer.csv")
    if args.ranking_only:
        ranking = [r for name, base in bases.items() for r in ranking_rows(name, base, (x, y))]
        write(read_rows(out / "data_free.csv"), out, originals, peer, seeds, ranking, vs_kept)
        print(f"wrote {args.out}/data_free.md and data_free_ranking.csv")
        return
    partial = args.only is not None or args.models is not None
    kept = read_rows(out / "data_free.csv") if partial else []
    kept = [r for r in kept if r["variant"] not in variants or r["model"] not in bases]
    # head-to-head rows need both sides' predictions: those of a variant rerun here are remade
    vs_kept = [
        r for r in (vs_kept if partial else [])
        if r["model"] not in bases or (PEER not in variants and r["variant"] not in variants)
    ]  # fmt: skip
    rows: list[dict] = []
    preds: dict[tuple, tuple] = {}
    vs = vs_kept
    for name, base in bases.items():
        made: dict[int, tuple] = {}  # seed -> (images, seconds): made once, used at each target
        for target in TARGETS[:1] if args.quick else TARGETS:
            for variant in variants:
                for seed in range(seeds) if variant in SEEDED else [0]:
                    if variant in ("ours, synthetic", NO_MIRRORS) and seed not in made:
                        start = time.perf_counter()
                        images, _ = synthesize_images(base, SHAPE, 32 if args.quick else 256,
                                                      seed=seed)  # fmt: skip
                        made[seed] = (images, time.perf_counter() - start)
                    row, preds[(name, target, variant, seed)] = run(
                        name, base, target, variant, seed, tests[name], assets, made.get(seed),
                        jpegs[name],
                    )  # fmt: skip
                    row["drop"] = row["top1"] - originals[name]
                    rows.append(row)
                    print({k: (round(v, 3) if isinstance(v, float) else v)
                           for k, v in row.items()}, flush=True)  # fmt: skip
                    vs = in_order(vs_kept + head_to_head(preds, tests, jpeg))
                    write(in_order(kept + rows), out, originals, peer, seeds, ranking, vs)
    if not partial and not args.quick:
        ranking = [r for name, base in bases.items() for r in ranking_rows(name, base, (x, y))]
        write(in_order(rows), out, originals, peer, seeds, ranking, vs)
    print(f"wrote {args.out}/data_free.md and data_free.csv")


if __name__ == "__main__":
    main()

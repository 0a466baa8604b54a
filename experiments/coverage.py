"""Coverage of the zoo: where each model's FLOPs are, what ``--target-flops 0.5`` decouples, and
what that buys in ONNX Runtime.

For every model (torchvision classifiers, detection and segmentation models, and timm models
when timm is installed; ``weights=None``, which changes neither FLOPs nor speed):

* the share of its FLOPs (``FlopCounterMode``) in k×k convs, 1×1 convs, linear layers,
  depthwise or grouped convs, and everything else (attention products, ...);
* the FLOPs budget 0.5, data-free (kernel energy), planned twice: with the k×k convs only (the
  1×1 convs and linear layers skipped: what decouple covered before) and with every layer;
* the layers decoupled, the FLOPs ratio reached, the planning time, and the speedup of the
  decoupled model over the BN-folded original in ONNX Runtime (batch 1, side by side).

The k×k convs are priced in network decoupling (``--method nd``; 1×1 convs and linear layers
always in svd): ``auto`` also prices CP and Tucker-2 at many ranks per layer, which takes hours on
ImageNet-size models (``--method auto`` runs it anyway).

Run (about an hour on 2 cores)::

    pip install -e '.[dev,vision,zoo]' && python experiments/coverage.py

→ ``results/coverage.md``, ``results/coverage.csv``, ``results/coverage.png``. ``--quick`` runs
three small models into a temporary folder; ``--models a,b`` picks models.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from experiment_io import output_folder, progress, write_csv
from torch import nn

from decouple import DecoupleConfig, count_flops
from decouple.io.checkpoint import build_arch
from decouple.io.torchvision_archs import torchvision_family
from decouple.nn.discover import is_plain_conv2d, is_plain_linear
from decouple.pipeline import compress_
from decouple.runtime.latency import LatencyConfig, compare
from decouple.surgery.bn_fold import fold_batchnorm_

TORCHVISION = (
    "alexnet vgg16 resnet18 resnet50 resnext50_32x4d wide_resnet50_2 densenet121 googlenet "
    "inception_v3 squeezenet1_1 shufflenet_v2_x1_0 mobilenet_v2 mobilenet_v3_large mnasnet1_0 "
    "efficientnet_b0 efficientnet_v2_s regnet_y_400mf regnet_x_1_6gf convnext_tiny vit_b_16 "
    "swin_t maxvit_t deeplabv3_resnet50 lraspp_mobilenet_v3_large fasterrcnn_resnet50_fpn "
    "ssdlite320_mobilenet_v3_large"
).split()
TIMM = "timm:mobilenetv3_large_100 timm:efficientnet_b0 timm:convnext_nano timm:resnet50d timm:vit_small_patch16_224".split()  # noqa: E501
QUICK = ["resnet18", "mobilenet_v2", "timm:mobilenetv3_large_100"]
KINDS = ("kxk", "1x1", "linear", "depthwise/grouped", "other")
FIELDS = [
    "model", "family", "input", "params_m", "gflops", *[f"share_{k}" for k in KINDS],
    "layers", "kxk_only_decoupled", "kxk_only_ratio", "decoupled", "ratio", "reached",
    "plan_s", "ort_before_ms", "ort_after_ms", "ort_speedup", "note", "error",
]  # fmt: skip


def build(name: str) -> tuple[nn.Module, tuple[int, ...], str]:
    """The model, one input's shape and its family; ``timm:NAME`` through ``timm.create_model``."""
    if name.startswith("timm:"):
        import timm

        model = timm.create_model(name[5:], pretrained=False)
        return model.eval(), tuple(model.pretrained_cfg["input_size"]), "timm classification"
    model, shape = build_arch(name)
    return model.eval(), tuple(shape), torchvision_family(name) or "classification"


def kind(module: nn.Module) -> str | None:
    """Which FLOPs column a leaf layer counts in (None: not a conv or linear layer)."""
    if is_plain_linear(module):
        return "linear"
    if not is_plain_conv2d(module):
        return None
    if module.groups > 1:
        return "depthwise/grouped"
    return "1x1" if module.kernel_size == (1, 1) else "kxk"


def shares(model: nn.Module, example: torch.Tensor) -> tuple[int, dict[str, float]]:
    total, per = count_flops(model, example)
    out = dict.fromkeys(KINDS, 0.0)
    for name, m in model.named_modules():
        k = kind(m)
        if k is not None:
            out[k] += per.get(name, 0)
    out["other"] = total - sum(out.values())
    return total, {k: v / total for k, v in out.items()}


def plan(model, shape, method: str, kxk_only: bool) -> tuple[nn.Module, object, float]:
    """The model under ``--target-flops 0.5`` (data-free); ``kxk_only`` skips every 1×1 conv and
    linear layer, as decouple did before it covered them."""
    twin = copy.deepcopy(model)
    skips = {}
    if kxk_only:
        skips = {n: "skip" for n, m in twin.named_modules() if kind(m) in ("1x1", "linear")}
    start = time.perf_counter()
    result = compress_(twin, DecoupleConfig(method=method, overrides=skips), shape, 0.5)
    return twin, result, time.perf_counter() - start


def measure(name: str, method: str, ort: bool) -> dict:
    torch.manual_seed(0)
    model, shape, family = build(name)
    example = torch.zeros(1, *shape)
    total, share = shares(model, example)
    row = {
        "model": name, "family": family, "input": "x".join(map(str, shape)),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "gflops": total / 1e9,
        **{f"share_{k}": v for k, v in share.items()},
    }  # fmt: skip
    old, old_result, _ = plan(model, shape, method, kxk_only=True)
    new, result, seconds = plan(model, shape, method, kxk_only=False)
    done = [r for r in result.records if r.action == "decoupled"]
    row.update(
        layers=len(result.records),
        kxk_only_decoupled=sum(r.action == "decoupled" for r in old_result.records),
        kxk_only_ratio=total / count_flops(old, example)[0],
        decoupled=len(done),
        ratio=total / count_flops(new, example)[0],
        reached=result.allocation.total_flops <= result.allocation.target_flops,
        plan_s=seconds,
    )
    if ort and family.endswith("classification"):
        baseline = copy.deepcopy(model)
        fold_batchnorm_(baseline)
        lat = compare(baseline, new, example, LatencyConfig(runtime="onnxruntime", min_run_time=1))
        row.update(
            ort_before_ms=lat["before"]["median_ms"],
            ort_after_ms=lat["after"]["median_ms"],
            ort_speedup=lat["speedup"],
        )
    elif ort:
        row["note"] = "no ONNX Runtime timing: its output is not one tensor of logits"
    return row


def write(rows: list[dict], out: Path, method: str) -> None:
    write_csv(out / "coverage.csv", FIELDS, rows)
    lines = [
        "# Coverage: every layer people deploy",
        "",
        "Written by `python experiments/coverage.py` (torchvision and timm models with random "
        f"weights; `--target-flops 0.5`, data-free, k×k convs in `{method}`, 1×1 convs and "
        "linear layers in `svd`; ONNX Runtime at batch 1 on this machine's 2 cores, the "
        "BN-folded original against the decoupled model, each as planned, no `--latency`).",
        "",
        "| model | input | GFLOPs | k×k | 1×1 | linear | dw/grouped | other | "
        "k×k only: layers, FLOPs | now: layers, FLOPs | ORT speedup | plan s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | | | | | | | | | failed: {r['error']} | | |")
            continue
        pct = [f"{100 * r[f'share_{k}']:.0f} %" for k in KINDS]
        speed = f"{r['ort_speedup']:.2f}×" if r.get("ort_speedup") else "n/a"
        lines.append(
            f"| {r['model']} | {r['input']} | {r['gflops']:.2f} | {' | '.join(pct)} | "
            f"{r['kxk_only_decoupled']} of {r['layers']}, {r['kxk_only_ratio']:.2f}× | "
            f"{r['decoupled']} of {r['layers']}, {r['ratio']:.2f}×"
            f"{'' if r['reached'] else ' (not reached)'} | {speed} | {r['plan_s']:.0f} |"
        )
    notes = [r for r in rows if r.get("note")]
    if notes:
        lines += ["", *[f"- {r['model']}: {r['note']}" for r in notes]]
    (out / "coverage.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "coverage.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "error" not in r]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 0.32 * len(rows) + 1.5), sharey=True)
    names = [r["model"] for r in rows]
    left = [0.0] * len(rows)
    for k in KINDS:
        vals = [100 * r[f"share_{k}"] for r in rows]
        ax.barh(names, vals, left=left, label=k)
        left = [a + b for a, b in zip(left, vals, strict=True)]
    ax.set_xlabel("share of FLOPs (%)")
    ax.legend(loc="lower right", fontsize=7)
    ax.invert_yaxis()
    y = range(len(rows))
    bx.scatter([r["kxk_only_ratio"] for r in rows], y, marker="o", label="k×k convs only")
    bx.scatter([r["ratio"] for r in rows], y, marker="s", label="every layer (with svd)")
    bx.axvline(2.0, color="grey", lw=0.8, ls="--")
    bx.set_xlabel("FLOPs ratio at --target-flops 0.5 (asked: 2×)")
    bx.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="three small models, a temporary folder")
    p.add_argument("--models", default=None, help="comma list (timm:NAME for timm)")
    p.add_argument("--method", default="nd", choices=("nd", "auto"), help="for the k×k convs")
    p.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime timings")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    small = "--quick" if args.quick else ("--models" if args.models else None)
    args.out = output_folder(p, args.out, small, "coverage-")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        import timm  # noqa: F401

        zoo = TORCHVISION + TIMM
    except ImportError:
        print("timm is not installed (pip install -e '.[zoo]'): torchvision models only")
        zoo = TORCHVISION
    names = QUICK if args.quick else (args.models.split(",") if args.models else zoo)
    torch.set_num_threads(2)
    rows = []
    for name in progress(names, "coverage"):
        try:
            rows.append(measure(name, args.method, not args.no_ort))
        except Exception as e:  # noqa: BLE001 - one model's failure is a row, not the end
            rows.append({"model": name, "error": f"{type(e).__name__}: {str(e)[:120]}"})
        r = rows[-1]
        print(name, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()},
              flush=True)  # fmt: skip
        write(rows, Path(args.out), args.method)
    print(f"wrote {args.out}/coverage.md, coverage.csv, coverage.png")


if __name__ == "__main__":
    main()

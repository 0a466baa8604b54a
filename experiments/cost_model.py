"""How well the latency cost model (decouple/runtime/cost_model.py) predicts measured speed.

For each model, a set of plans (every method under ``--target-flops``, data-free; fixed-rank
network decoupling and Tucker at ImageNet shapes, where CP's decompositions take too long for a
sweep) is exported to ONNX and timed in ONNX Runtime beside the BN-folded original; the cost
model, fitted once on this machine by its micro-benchmark, predicts the same times from one
forward pass's census of ops. Reported per model and batch: the Spearman rank correlation of
predicted against measured time over the original and the plans, and each plan's predicted and
measured speedup, and whether the prediction said "slower than the original" when it was.

Models: the shared CIFAR-10 ResNet-20/32 and the MobileNetV2-style network (real weights, from
``../shared/assets``), batch 1 and 32, in ONNX Runtime and eager PyTorch; torchvision's
ResNet-18, ResNet-50 and VGG-16 at 224² (weights=None: speed does not depend on the values),
batch 1, in ONNX Runtime.

Run (needs ../shared/assets and the vision extra; about 30 minutes on 2 cores, nothing else
running)::

    pip install -e '.[dev,vision]' && python experiments/cost_model.py

→ ``results/cost_model.md``, ``results/cost_model.csv``. ``--quick``: ResNet-20 at batch 32
only, into a temporary folder.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from experiment_io import quick_or_full, write_csv
from scipy.stats import spearmanr

from decouple import DecoupleConfig
from decouple.io.checkpoint import load_model
from decouple.io.evaluate import evaluate
from decouple.io.images import load_cifar10_exact, shared_assets_dir
from decouple.io.onnx_weights import state_dict_from_onnx
from decouple.models import build_model
from decouple.nn.flops import count_flops
from decouple.pipeline import compress_
from decouple.runtime.cost_model import census, fit_cost_model
from decouple.runtime.latency import LatencyConfig, cpu_name, side_by_side
from decouple.surgery.bn_fold import fold_batchnorm_
from decouple.surgery.methods import FactorCache

FIELDS = ["model", "runtime", "batch", "plan", "flops_ratio", "top1", "predicted_ms", "measured_ms",
          "predicted_speedup", "measured_speedup"]  # fmt: skip
CIFAR = {"cifar_resnet20": "resnet20-12fca82f.th", "cifar_resnet32": "resnet32-d509ac18.th"}
MBV2_ONNX = "mbv2_tinymlperf_alibaba_cifar10.onnx"
ALIGN = 8  # --rank-multiple of the aligned plans
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def cifar_models(assets: Path) -> dict:
    models = {arch: load_model(assets / f, arch)[0].eval() for arch, f in CIFAR.items()}
    mbv2 = build_model("cifar_mbv2")
    mbv2.load_state_dict(state_dict_from_onnx(assets / MBV2_ONNX))
    models["cifar_mbv2"] = mbv2.eval()
    return models


def plans(name: str, model, shape) -> dict:
    """Every plan of ``model``: label → decoupled copy."""
    cache, out = FactorCache(), {}

    def plan(label, config, **kw):
        m = copy.deepcopy(model)
        compress_(m, config, shape, cache=cache, **kw)
        out[label] = m.eval()

    if name.startswith("cifar_resnet"):
        for method in ("auto", "nd", "cp", "tucker"):
            for target in (0.7, 0.5, 0.35):
                plan(
                    f"{method} flops {target:g}", DecoupleConfig(method=method), target_flops=target
                )
        for method in ("auto", "cp", "tucker"):
            for target in (0.5, 0.35):
                config = DecoupleConfig(method=method, rank_multiple=ALIGN)
                plan(f"{method} flops {target:g}, ranks ×{ALIGN}", config, target_flops=target)
    elif name == "cifar_mbv2":
        for target in (0.8, 0.67, 0.5):
            plan(f"auto flops {target:g}", DecoupleConfig(method="auto"), target_flops=target)
            config = DecoupleConfig(method="auto", rank_multiple=ALIGN)
            plan(f"auto flops {target:g}, ranks ×{ALIGN}", config, target_flops=target)
    else:  # ImageNet shapes: fast decompositions only
        for t in (1, 2, 4):
            plan(f"nd rank {t}", DecoupleConfig(method="nd", rank=t))
        for target in (0.7, 0.5):
            plan(f"tucker flops {target:g}", DecoupleConfig(method="tucker"), target_flops=target)
    return out


def runs(quick: bool, assets: Path) -> list[tuple[str, object, tuple, tuple]]:
    """(name, model, input shape, (runtime, batch) pairs) of every model."""
    if quick:
        r20 = cifar_models(assets)["cifar_resnet20"]
        return [("cifar_resnet20", r20, (3, 32, 32), (("onnxruntime", 32),))]
    import torchvision

    cifar = tuple((r, b) for r in ("onnxruntime", "eager") for b in (1, 32))
    out = [(n, m, (3, 32, 32), cifar) for n, m in cifar_models(assets).items()]
    for n in ("resnet18", "resnet50", "vgg16"):
        model = getattr(torchvision.models, n)(weights=None).eval()
        out.append((n, model, (3, 224, 224), (("onnxruntime", 1),)))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    return quick_or_full(__doc__, "cost_model-", argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    out = args.out
    assets = shared_assets_dir()
    if assets is None or not (assets / MBV2_ONNX).is_file():
        sys.exit("cost_model: the shared CIFAR-10 assets are not found (../shared/assets)")
    torch.set_num_threads(2)
    exact = load_cifar10_exact(assets / "test_batch.truncated_first_3145728_bytes")
    test = (exact.as_float(MEAN, STD), exact.labels)
    rows, fits = [], {}
    for name, model, shape, settings in runs(args.quick, assets):
        start = time.perf_counter()
        decoupled = plans(name, model, shape)
        print(f"{name}: {len(decoupled)} plans in {time.perf_counter() - start:.0f} s", flush=True)
        baseline = copy.deepcopy(model)
        fold_batchnorm_(baseline)  # what the CLI times the plans against
        models = {"original": baseline, **decoupled}
        one = torch.zeros((1, *shape))
        flops = {
            k: count_flops(baseline, one)[0] / count_flops(m, one)[0] for k, m in models.items()
        }
        top1 = (
            {k: 100 * evaluate(m, *test)["top1"] for k, m in models.items()}
            if name.startswith("cifar")
            else {}
        )
        for runtime, batch in settings:
            if (runtime, batch) not in fits:
                start = time.perf_counter()
                fitted = fit_cost_model(runtime, batch)
                fits[runtime, batch] = (fitted, time.perf_counter() - start)
            cm = fits[runtime, batch][0]
            x = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(0))
            predicted = {k: cm.predict_ms(census(m, x, runtime)) for k, m in models.items()}
            # As the CLI times a plan against the original: interleaved rounds, each model
            # prepared twice (a fresh ONNX Runtime session), the best round kept.
            config = LatencyConfig(runtime=runtime, min_run_time=0.5, threads=2)
            print(f"{name} {runtime} batch {batch}: timing {len(models)} models", flush=True)
            measured = {k: v.median_ms for k, v in side_by_side(models, x, config).items()}
            for k in models:
                rows.append({
                    "model": name, "runtime": runtime, "batch": batch, "plan": k,
                    "flops_ratio": flops[k],
                    "top1": top1.get(k, ""),
                    "predicted_ms": predicted[k], "measured_ms": measured[k],
                    "predicted_speedup": predicted["original"] / predicted[k],
                    "measured_speedup": measured["original"] / measured[k],
                })  # fmt: skip
            print(f"{name} {runtime} batch {batch}: Spearman "
                  f"{spearmanr(list(predicted.values()), list(measured.values()))[0]:.3f}",
                  flush=True)  # fmt: skip
        write(rows, fits, Path(out))
    print(f"wrote {out}/cost_model.md and cost_model.csv")


def _key(r: dict) -> tuple:
    return r["model"], r["runtime"], r["batch"]


def _groups(rows):
    keys = []
    for r in rows:
        if _key(r) not in keys:
            keys.append(_key(r))
    return [(k, [r for r in rows if _key(r) == k]) for k in keys]


def write(rows: list[dict], fits: dict, out: Path) -> None:
    write_csv(out / "cost_model.csv", FIELDS, rows, extra="ignore")
    lines = [
        "# The latency cost model against the clock (ONNX Runtime, eager PyTorch)",
        "",
        "Written by `python experiments/cost_model.py`. The cost model "
        "(`decouple/runtime/cost_model.py`) is fitted once per runtime and batch size by its "
        f"micro-benchmark on this machine ({cpu_name()}, {torch.get_num_threads()} threads); "
        "every plan, and the BN-folded original, is timed in the runtime (ONNX Runtime: exported "
        "first; four interleaved rounds, each model prepared twice, the best round's median, as "
        "the CLI times a plan against the original). *Spearman*: rank correlation of "
        "predicted and measured time over the original and the plans of one model, runtime and "
        "batch. *Slower, said*: plans measured "
        "slower than the original, and how many of them the prediction called slower.",
        "",
        "| runtime | batch | fit: graphs timed | fit: median relative error | fit: seconds |",
        "|---|---:|---:|---:|---:|",
    ]
    for (rt, b), (cm, sec) in sorted(fits.items()):
        lines.append(f"| {rt} | {b} | {cm.graphs_timed} | {100 * cm.fit_error:.1f} % | "
                     f"{sec:.0f} |")  # fmt: skip
    lines += ["", "| model | runtime | batch | plans | Spearman | median error of predicted "
              "speedup | slower, said |", "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    every: dict[str, tuple[list, list]] = {}
    for (model, runtime, batch), rs in _groups(rows):
        rho = spearmanr([r["predicted_ms"] for r in rs], [r["measured_ms"] for r in rs])[0]
        errs = sorted(abs(r["predicted_speedup"] / r["measured_speedup"] - 1)
                      for r in rs if r["plan"] != "original")  # fmt: skip
        slow = [r for r in rs if r["plan"] != "original" and r["measured_speedup"] < 1]
        said = sum(r["predicted_speedup"] < 1 for r in slow)
        lines.append(f"| {model} | {runtime} | {batch} | {len(rs) - 1} | {rho:.3f} | "
                     f"{100 * errs[len(errs) // 2]:.1f} % | {len(slow)}, {said} said |")  # fmt: skip
        p, m = every.setdefault(runtime, ([], []))
        p += [r["predicted_speedup"] for r in rs if r["plan"] != "original"]
        m += [r["measured_speedup"] for r in rs if r["plan"] != "original"]
    for runtime, (p, m) in every.items():
        if len(p) > 2:
            lines += ["", f"{runtime}: over every plan of every model and batch, the Spearman "
                      f"rank correlation of predicted and measured speedup is "
                      f"{spearmanr(p, m)[0]:.3f} ({len(p)} plans)."]  # fmt: skip
    lines += ["", "## Every plan", "", "*top-1*: on the 1,017 exact-pixel CIFAR-10 test images, "
              "data-free (no calibration).", "", "| model | runtime | batch | plan | FLOPs | "
              "top-1 | predicted ms | measured ms | predicted speedup | measured speedup |",
              "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        top1 = f"{r['top1']:.2f} %" if r["top1"] != "" else "–"
        lines.append(f"| {r['model']} | {r['runtime']} | {r['batch']} | {r['plan']} | "
                     f"{r['flops_ratio']:.2f}× | "
                     f"{top1} | {r['predicted_ms']:.3f} | {r['measured_ms']:.3f} | "
                     f"{r['predicted_speedup']:.2f}× | {r['measured_speedup']:.2f}× |")  # fmt: skip
    (out / "cost_model.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Network decoupling vs CP vs Tucker-2 at equal FLOPs on the real pretrained CIFAR-10 ResNets.

Run (needs ../shared/assets; about 10 minutes on 2 cores):

    pip install -e '.[dev]' && python experiments/method_sweep.py

For every checkpoint (default: the shared ResNet-20 and ResNet-32; ``--model PATH:cifar_resnetN``
for other depths) and every method (nd dw-pw, nd pw-dw, cp, tucker), the same budget allocator
(data-free kernel-error criterion) picks per-layer ranks for each FLOPs budget; top-1 on the
1,017 exact-pixel test images is measured data-free and after the calibration refit on 512 JPEG
test images with test index >= 1017. It also records, per layer, the relative kernel error of
every candidate rank of every method against the layer's FLOPs.

Writes results/methods.csv, results/layer_error.csv, results/methods_vs_flops.png,
results/layer_error.png and results/methods.md. ``experiments/compare_methods.ipynb`` reads them.

``--quick`` (ResNet-20, budget 0.5, 64 calibration and 256 test images, 10 CP sweeps; minutes) and
``--smoke`` (the same with nd dw-pw and Tucker-2 only, 16 calibration and 64 test images, the
first layers only: seconds, for the test suite) write into a new temporary folder unless ``--out``
is given, and never into results/.
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from pathlib import Path

import torch
from accuracy_sweep import SHAPE, SHARED, load_sets, write_csv
from experiment_io import output_folder, progress

from decouple import DecoupleConfig, count_flops
from decouple.factor.nd import decouple_weight
from decouple.io.checkpoint import load_model
from decouple.io.evaluate import evaluate
from decouple.models import get_model_info
from decouple.nn.flops import conv_flops
from decouple.pipeline import compress_
from decouple.plan.allocate import MIN_SAVING
from decouple.plan.losses import probe_shapes
from decouple.surgery.bn_fold import fold_batchnorm_
from decouple.surgery.methods import FactorCache, candidate_ranks
from decouple.surgery.rewrite import decouplable_convs

ROOT = Path(__file__).resolve().parent.parent
METHODS = [("nd", "dw-pw"), ("nd", "pw-dw"), ("cp", "dw-pw"), ("tucker", "dw-pw")]


def label(method: str, order: str) -> str:
    return f"nd {order}" if method == "nd" else method


def run_one(
    base, method, order, budget, calibrated, calib, images, labels, flops0, cache, cp_iters
):
    model = copy.deepcopy(base)
    config = DecoupleConfig(order=order, method=method, fold_bn=True, cp_max_iter=cp_iters)
    start = time.perf_counter()
    result = compress_(
        model, config, SHAPE, target_flops=budget, criterion="energy",
        calib_images=calib if calibrated else None, cache=cache,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    flops, _ = count_flops(model, torch.zeros(1, *SHAPE))
    acc = evaluate(model, images, labels)
    decoupled = [r for r in result.records if r.action == "decoupled"]
    return {
        "flops": flops,
        "flops_ratio": round(flops0 / flops, 4),
        "top1": round(100 * acc["top1"], 2),
        "top5": round(100 * acc["top5"], 2),
        "layers": len(decoupled),
        "not_converged": sum(r.converged is False for r in decoupled),
        "seconds": round(seconds, 1),
        "ranks": " ".join(r.rank_text.split("/")[0] for r in decoupled),
    }


def layer_errors(
    name: str, base, cache: FactorCache, cp_iters: int, methods=METHODS, max_layers=None
) -> list[dict]:
    """Relative kernel error of every rank the allocator offers, per method and layer (BN folded;
    the same candidates as the budget runs, so CP comes from ``cache`` rather than ALS again);
    the first ``max_layers`` decouplable layers only, if given."""
    model = copy.deepcopy(base)
    fold_batchnorm_(model)
    config = DecoupleConfig(cp_max_iter=cp_iters)
    names = decouplable_convs(model, config)[:max_layers]
    shapes = probe_shapes(model, names, SHAPE)
    rows = []
    for layer in names:
        conv = model.get_submodule(layer)
        in_hw, out_hw = shapes[layer]
        original = conv_flops(conv, out_hw)
        for method, order in methods:
            if method == "nd":
                full = decouple_weight(conv.weight, None, order, conv.groups)
            limit = (1 - MIN_SAVING) * original
            for rank, flops in candidate_ranks(conv, method, order, in_hw, out_hw, limit):
                if method == "nd":
                    err, converged = full.truncated(rank).relative_error(), ""
                else:
                    done = cache.factor(conv, method, rank, None, order, config.factor_options())
                    err, converged = done.rel_error, done.converged if method == "cp" else ""
                rows.append({
                    "model": name, "layer": layer, "channels": f"{conv.in_channels}->{conv.out_channels}",
                    "method": label(method, order), "rank": rank,
                    "flops_fraction": round(flops / original, 4), "rel_error": round(err, 5),
                    "converged": converged,
                })  # fmt: skip
    return rows


def summary_table(rows, budgets) -> list[str]:
    """One line per model and budget: every method's top-1, the best in bold."""
    methods = list(dict.fromkeys(r["method"] for r in rows if r["scheme"] != "original"))
    head = "| model | budget | FLOPs | refit | " + " | ".join(methods) + " | best |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for model in dict.fromkeys(r["model"] for r in rows):
        base = next(r for r in rows if r["model"] == model and r["scheme"] == "original")
        for budget in budgets:
            for calibrated in (False, True):
                pts = {r["method"]: r for r in rows if r["model"] == model and r["target"] == budget
                       and r["calibrated"] == calibrated}  # fmt: skip
                if not pts:
                    continue
                top = max(pts.values(), key=lambda r: r["top1"])
                ratio = min(r["flops_ratio"] for r in pts.values())
                cells = [
                    (f"**{pts[m]['top1']:.2f}**" if pts[m] is top else f"{pts[m]['top1']:.2f}")
                    if m in pts else "-"
                    for m in methods
                ]  # fmt: skip
                refit = "calibrated" if calibrated else "data-free"
                lines.append(
                    f"| {model} ({base['top1']:.2f}) | {budget} | ≥{ratio:.2f}× | {refit} | "
                    + " | ".join(cells)
                    + f" | {top['method']} |"
                )
    return lines


def plot(rows, layer_rows, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        base = next(r for r in rows if r["model"] == model and r["scheme"] == "original")
        ax.axhline(base["top1"], color="k", lw=1, label=f"original {base['top1']:.2f} %")
        ax.axhline(base["top1"] - 1, color="k", lw=0.8, ls=":", label="original − 1 point")
        for i, method in enumerate(dict.fromkeys(r["method"] for r in rows if r["method"])):
            for calibrated, ls, marker in ((False, "--", "o"), (True, "-", "s")):
                pts = sorted((r for r in rows if r["model"] == model and r["method"] == method
                              and r["calibrated"] == calibrated), key=lambda r: r["flops_ratio"])  # fmt: skip
                if pts:
                    ax.plot([p["flops_ratio"] for p in pts], [p["top1"] for p in pts], ls=ls,
                            marker=marker, color=f"C{i}",
                            label=f"{method} {'calibrated' if calibrated else 'data-free'}")  # fmt: skip
        ax.set_title(f"{model}: equal-FLOPs comparison (top-1, 1,017 exact test images)")
        ax.set_xlabel("FLOPs reduction of the whole model (x, FlopCounterMode)")
        ax.set_ylabel("top-1 (%)")
        ax.set_ylim(0, base["top1"] + 3)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "methods_vs_flops.png", dpi=120)
    plt.close(fig)

    # Per-layer error vs FLOPs: the first and last decoupled conv of each model.
    picks = []
    for model in models:
        layers = list(dict.fromkeys(r["layer"] for r in layer_rows if r["model"] == model))
        picks += [(model, layers[1] if len(layers) > 1 else layers[0]), (model, layers[-1])]
    fig, axes = plt.subplots(1, len(picks), figsize=(4.5 * len(picks), 4), squeeze=False)
    for ax, (model, layer) in zip(axes[0], picks, strict=True):
        mine = [r for r in layer_rows if r["model"] == model and r["layer"] == layer]
        for i, method in enumerate(dict.fromkeys(r["method"] for r in mine)):
            pts = sorted(
                (r for r in mine if r["method"] == method), key=lambda r: r["flops_fraction"]
            )
            ax.plot([p["flops_fraction"] for p in pts], [p["rel_error"] for p in pts], marker=".",
                    color=f"C{i}", label=method)  # fmt: skip
        ax.set_title(f"{model} {layer} ({mine[0]['channels']})", fontsize=9)
        ax.set_xlabel("layer FLOPs / original")
        ax.set_ylabel("relative kernel error")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "layer_error.png", dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``--quick``/``--smoke`` write into a new temp folder unless ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", type=Path, default=None, help="the shared cifar10 folder")
    parser.add_argument("--model", action="append", default=[], metavar="PATH:ARCH")
    parser.add_argument(
        "--budgets",
        type=float,
        nargs="+",
        default=[0.5, 0.33],
        help="fractions of the FLOPs to keep (default: 2x and 3x fewer)",
    )
    parser.add_argument("--calib-size", type=int, default=512)
    parser.add_argument("--cp-iters", type=int, default=100, help="CP-ALS sweeps at most")
    parser.add_argument("--eval-size", type=int, default=None, help="first N test images only")
    parser.add_argument("--methods", default=None,
                        help="comma list of nd-dw-pw, nd-pw-dw, cp, tucker (default: all)")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help="small setting for CI and notebooks: ResNet-20, budget 0.5, "
                        "64 calibration and 256 test images, 10 CP sweeps")  # fmt: skip
    parser.add_argument("--smoke", action="store_true",
                        help="seconds, for the test suite: --quick with nd dw-pw and tucker only, "
                        "16 calibration and 64 test images, kernel errors of 3 layers")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None,
                        help="default results/ (--quick, --smoke: a new temp dir)")  # fmt: skip
    args = parser.parse_args(argv)
    small = "--smoke" if args.smoke else "--quick" if args.quick else None
    args.out = output_folder(parser, args.out, small, "method_sweep-")
    if small:
        args.budgets, args.calib_size, args.cp_iters, args.eval_size = [0.5], 64, 10, 256
    max_layers = None
    if args.smoke:
        args.calib_size, args.eval_size, max_layers = 16, 64, 3
        args.methods = args.methods or "nd-dw-pw,tucker"
    args.methods_chosen = METHODS
    if args.methods:
        wanted = args.methods.split(",")
        args.methods_chosen = [m for m in METHODS if label(*m).replace(" ", "-") in wanted]
        if len(args.methods_chosen) != len(wanted):
            parser.error(f"--methods: each of nd-dw-pw, nd-pw-dw, cp, tucker; got {args.methods}")
    args.max_layers = max_layers
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    methods, max_layers, small = args.methods_chosen, args.max_layers, args.quick or args.smoke
    assets, test, calib_set = load_sets(args.assets, args.calib_size)
    if args.eval_size:
        test = test.subset(torch.arange(min(args.eval_size, len(test))))
    pairs = [m.rsplit(":", 1) for m in args.model] or [[str(assets / f), a] for f, a in SHARED]
    if small and not args.model:
        pairs = pairs[:1]
    args.out.mkdir(parents=True, exist_ok=True)
    rows, layer_rows = [], []
    for path, arch in pairs:
        meta = get_model_info(arch).meta
        images, calib = (
            test.as_float(meta["mean"], meta["std"]),
            calib_set.as_float(meta["mean"], meta["std"]),
        )
        base, _, _ = load_model(path, arch)
        flops0, _ = count_flops(base, torch.zeros(1, *SHAPE))
        acc = evaluate(base, images, test.labels)
        name = arch.replace("cifar_", "")
        rows.append({"model": name, "scheme": "original", "method": "", "target": "", "calibrated": False,
                     "flops": flops0, "flops_ratio": 1.0, "top1": round(100 * acc["top1"], 2),
                     "top5": round(100 * acc["top5"], 2), "drop": 0.0})  # fmt: skip
        print(
            f"{name}: original top-1 {rows[-1]['top1']:.2f} % on {len(images)} images", flush=True
        )
        cache = FactorCache()  # CP/Tucker factorizations shared by every budget of this model
        grid = [(m, b, c) for m in methods for b in args.budgets for c in (False, True)]
        for (method, order), budget, calibrated in progress(grid, f"{name} runs"):
            row = {"model": name, "scheme": "budget", "method": label(method, order),
                   "target": budget, "calibrated": calibrated}  # fmt: skip
            row.update(run_one(base, method, order, budget, calibrated, calib, images,
                               test.labels, flops0, cache, args.cp_iters))  # fmt: skip
            row["drop"] = round(row["top1"] - next(r["top1"] for r in rows if r["model"] == name
                                                   and r["scheme"] == "original"), 2)  # fmt: skip
            rows.append(row)
            print(f"  {row['method']:10s} R={budget:<4} {'calibrated' if calibrated else 'data-free '} "
                  f"{row['flops_ratio']:.2f}x top-1 {row['top1']:6.2f} ({row['drop']:+.2f}) "
                  f"{row['seconds']}s", flush=True)  # fmt: skip
        layer_rows += layer_errors(name, base, cache, args.cp_iters, methods, max_layers)
    write_csv(rows, args.out / "methods.csv")
    write_csv(layer_rows, args.out / "layer_error.csv")
    plot(rows, layer_rows, args.out)
    command = "pip install -e '.[dev]' && python experiments/method_sweep.py" + (
        " --smoke" if args.smoke else " --quick" if args.quick else ""
    )
    table = summary_table(rows, args.budgets)
    lines = [
        "# Results: network decoupling vs CP vs Tucker-2 at equal FLOPs",
        "",
        "Written by `experiments/method_sweep.py`; do not edit by hand. Reproduce with:",
        "",
        f"    {command}",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}.",
        f"Top-1 (%) on the first {len(test)} exact-pixel CIFAR-10 test images; calibration on "
        f"{len(calib_set)} JPEG test images with test index ≥ 1017. Every method gets the same",
        "budget allocator (data-free kernel-error criterion, whole-model FLOPs as FlopCounterMode",
        f"counts them); CP-ALS runs at most {args.cp_iters} sweeps from an SVD start. The FLOPs column",
        "is the smallest reduction any method reached at that budget.",
        "",
        *table,
        "",
        "![accuracy vs FLOPs](methods_vs_flops.png)",
        "",
        "![layer error vs FLOPs](layer_error.png)",
        "",
        "Every run: `methods.csv`; per-layer kernel error of every candidate rank: `layer_error.csv`.",
    ]
    (args.out / "methods.md").write_text("\n".join(lines) + "\n")
    print("\n".join(table))
    print(
        f"wrote {args.out}/methods.csv, layer_error.csv, methods_vs_flops.png, layer_error.png, methods.md"
    )


if __name__ == "__main__":
    main()

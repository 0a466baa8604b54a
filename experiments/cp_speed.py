"""CP at every candidate rank of every conv: one rank at a time (as the planner did) vs
``cp_weights_for_ranks`` (one warm-started chain of ranks per conv).

For each conv the budget allocator's CP candidates are taken (``candidate_ranks(conv, "cp", "",
in_hw, out_hw, 0.9 · original FLOPs)``: 8 ranks, 10 % to 90 % of the largest affordable rank; input
and output sizes from a forward hook) and decomposed three ways, all float64, defaults
``n_iter_max=100``, ``tol=1e-6``, ``seed=0``:

* ``old``: tensorly's ``parafac`` per rank (what ``cp_weight`` ran before, kept here verbatim);
* ``cold``: today's ``cp_weight`` per rank (the same ALS from the same SVD start, on the new
  engine; its errors are the old path's up to rounding, which the run checks where both ran);
* ``new``: ``cp_weights_for_ranks`` on all the ranks at once.

Models: torchvision ResNet-18 (``weights=None`` after ``torch.manual_seed(0)``; 224×224 input; all
its 3×3 convs and the 7×7 stem) and the pretrained CIFAR-10 ResNet-20 (``../shared/assets``;
32×32; skipped with a message where absent). The old path takes minutes per rank on ResNet-18's
256- and 512-channel convs (tensorly builds the Khatri-Rao product of the whole kernel; see the
probe line of the report), so there it runs on ``--old-layers`` only; ``new`` runs on every
conv. ``cold`` runs wherever ``old`` does, and on ResNet-20 everywhere.

Writes ``results/cp_speed.csv`` (one row per model, conv and path) and ``results/cp_speed.md``.
Both paths run on ``--threads`` BLAS/OpenMP threads (default 1: on shared, busy cores more threads
make ALS many times slower; the script re-executes itself with the thread variables set, as
numpy's BLAS reads them only at start). ``--jobs N`` also times the new path on every conv spread
over N processes (one row per model; only meaningful on otherwise idle cores). Run (about 5 CPU
minutes, longer on busy cores; ``--quick``: two convs per model into a temporary folder,
seconds)::

    pip install -e '.[dev,vision]' && python experiments/cp_speed.py --jobs 2
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from experiment_io import output_folder, progress
from torch import nn

from decouple.factor.cp import (
    CP_MAX_ITER,
    CP_TOL,
    CPFactors,
    cp_max_rank,
    cp_weights_for_ranks,
)
from decouple.factor.cp import _normalise as normalise
from decouple.factor.tensorly_compat import run_parafac
from decouple.nn.flops import conv_flops
from decouple.surgery.methods import candidate_ranks

ROOT = Path(__file__).resolve().parent.parent
RESNET20 = ROOT.parent / "shared" / "assets" / "cifar10" / "resnet20-12fca82f.th"
OLD_LAYERS = {  # the stem and one conv per stage, where tensorly takes seconds, not minutes
    "resnet18": ["conv1", "layer1.0.conv1", "layer2.0.conv1"],
    "resnet20": ["conv1", "layer1.0.conv1", "layer2.0.conv2", "layer3.0.conv2"],
}
COLD_LAYERS = {  # None: every conv; on ResNet-18's 512-channel convs it would take ~8 min each
    "resnet18": [*OLD_LAYERS["resnet18"], "layer2.0.conv2", "layer3.0.conv2"],
    "resnet20": None,
}
PATHS = ("old", "cold", "new")


# ------------------------------------------------------------------------------------------
# the three paths


def old_cp_weight(weight, rank, groups=1, n_iter_max=CP_MAX_ITER, tol=CP_TOL, seed=0):
    """``cp_weight`` as it was: tensorly's ``parafac`` per group."""
    w = weight.detach().double().cpu()
    n, cg, kh, kw = w.shape
    ng = n // groups
    rank = min(rank, cp_max_rank(tuple(w.shape), groups))
    parts, iterations, converged = [], [], True
    for j in range(groups):
        block = w[j * ng : (j + 1) * ng]
        if float(block.norm()) == 0.0:
            factors = [torch.zeros(d, rank, dtype=torch.float64) for d in (ng, cg, kh, kw)]
            its, ok = 0, True
        else:
            weights, arrays, errors = run_parafac(block.numpy(), rank, n_iter_max, tol, seed)
            factors = [torch.from_numpy(np.array(a, dtype=np.float64)) for a in arrays]
            factors[0] = factors[0] * torch.from_numpy(np.array(weights, dtype=np.float64))
            its = len(errors)
            ok = len(errors) >= 2 and abs(errors[-2] - errors[-1]) < tol
        parts.append(normalise(*factors))
        iterations.append(its)
        converged = converged and ok
    stacked = [torch.stack([p[i] for p in parts]) for i in range(4)]
    return CPFactors(tuple(w.shape), groups, *stacked, iterations, converged)


def run_path(path: str, conv: nn.Conv2d, ranks: list[int]) -> tuple[dict, float, float]:
    """``({rank: CPFactors}, wall seconds, CPU seconds)``, on the threads ``--threads`` set."""
    wall, cpu = time.perf_counter(), time.process_time()
    w, g = conv.weight, conv.groups
    if path == "new":
        out = cp_weights_for_ranks(w, ranks, g, threads=None)
    elif path == "cold":  # cp_weight, but on the process's threads rather than CP_THREADS
        out = {r: cp_weights_for_ranks(w, [r], g, threads=None)[r] for r in ranks}
    else:
        out = {r: old_cp_weight(w, r, g) for r in ranks}
    return out, time.perf_counter() - wall, time.process_time() - cpu


def _new_worker(task) -> None:
    weight, groups, ranks = task
    cp_weights_for_ranks(weight, ranks, groups, threads=None)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def new_in_processes(tasks, jobs: int, threads: int) -> float:
    """Wall seconds of the new path on every conv of ``tasks`` spread over ``jobs`` fresh
    processes (largest convs first), start-up included."""
    order = sorted(tasks, key=lambda t: -t[0].numel() * max(t[2], default=0))
    start = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        jobs, mp_context=ctx, initializer=_init_worker, initargs=(threads,)
    ) as ex:
        list(ex.map(_new_worker, order))
    return time.perf_counter() - start


def probe_old_sweep(conv: nn.Conv2d, rank: int, sweeps: int = 2) -> float:
    """Seconds per sweep of tensorly's ALS at ``rank`` (timed over ``sweeps`` sweeps)."""
    x = conv.weight.detach().double().numpy()
    start = time.perf_counter()
    run_parafac(x, rank, sweeps, 0.0, 0)
    return (time.perf_counter() - start) / sweeps


# ------------------------------------------------------------------------------------------
# models and their convs


def load_models(quick: bool) -> list[tuple[str, nn.Module, tuple[int, int, int]]]:
    models = []
    try:
        import torchvision

        torch.manual_seed(0)
        models.append(("resnet18", torchvision.models.resnet18(weights=None), (3, 224, 224)))
    except ImportError:
        print("skipping ResNet-18: torchvision is not installed (pip install -e '.[vision]')")
    if RESNET20.exists():
        from decouple.io.checkpoint import load_model

        model, _, _ = load_model(RESNET20, "cifar_resnet20")
        models.append(("resnet20", model, (3, 32, 32)))
    else:
        print(f"skipping ResNet-20: {RESNET20} is absent (the shared CIFAR-10 assets)")
    return [(name, m.eval(), shape) for name, m, shape in models]


def conv_sizes(model: nn.Module, input_shape) -> list[tuple[str, nn.Conv2d, tuple, tuple]]:
    """Every k×k conv (k > 1) with its input and output spatial sizes, from forward hooks."""
    sizes, hooks = {}, []

    def record(name, mod, inp, out) -> None:  # returns None: a hook's value replaces the output
        sizes.setdefault(name, (mod, tuple(inp[0].shape[2:]), tuple(out.shape[2:])))

    for name, m in model.named_modules():
        if type(m) is nn.Conv2d and max(m.kernel_size) > 1:
            hooks.append(m.register_forward_hook(lambda mod, i, o, n=name: record(n, mod, i, o)))
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
    return [(name, *v) for name, v in sizes.items()]


def cp_candidates(conv: nn.Conv2d, in_hw, out_hw) -> list[int]:
    limit = 0.9 * conv_flops(conv, out_hw)
    return [r for r, _ in candidate_ranks(conv, "cp", "", in_hw, out_hw, limit)]


# ------------------------------------------------------------------------------------------
# the report


def summarise(rows: list[dict], model: str, layers: list[str]) -> dict:
    """Totals of each path over the convs of ``layers`` it ran on."""
    pick = [r for r in rows if r["model"] == model and r["layer"] in layers]
    out = {}
    for path in PATHS:
        mine = [r for r in pick if r["path"] == path]
        if not mine:
            continue
        errs = [e for r in mine for e in r["errors"]]
        out[path] = {
            "layers": len(mine),
            "seconds": sum(r["seconds"] for r in mine),
            "cpu_seconds": sum(r["cpu_seconds"] for r in mine),
            "mean_error": float(np.mean(errs)),
            "converged": float(np.mean([c for r in mine for c in r["converged_each"]])),
            "sweeps": float(np.mean([s for r in mine for s in r["sweeps_each"]])),
        }
    return out


def ratio_stats(rows, model, base: str) -> tuple[float, float, int, int]:
    """Mean and worst ``new / base`` error ratio over the ranks both ran; how many ranks are
    more than 1 % worse; how many compared."""
    ratios = []
    for r in rows:
        if r["model"] == model and r["path"] == "new":
            other = next(
                (o for o in rows if o["model"] == model and o["layer"] == r["layer"]
                 and o["path"] == base), None,
            )  # fmt: skip
            if other is not None:
                ratios += [a / b for a, b in zip(r["errors"], other["errors"], strict=True)]
    if not ratios:
        return float("nan"), float("nan"), 0, 0
    return float(np.mean(ratios)), float(max(ratios)), sum(q > 1.01 for q in ratios), len(ratios)


def write_report(rows: list[dict], probes, parallel, out: Path, args, load: str) -> None:
    fields = ["model", "layer", "shape", "ranks", "path", "seconds", "cpu_seconds",
              "mean_error", "errors", "converged", "sweeps"]  # fmt: skip
    with open(out / "cp_speed.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({
                **{k: r[k] for k in ("model", "layer", "shape", "path")},
                "ranks": " ".join(map(str, r["ranks"])),
                "seconds": round(r["seconds"], 3), "cpu_seconds": round(r["cpu_seconds"], 3),
                "mean_error": round(float(np.mean(r["errors"])), 5),
                "errors": " ".join(f"{e:.5f}" for e in r["errors"]),
                "converged": f"{sum(r['converged_each'])}/{len(r['converged_each'])}",
                "sweeps": " ".join(map(str, r["sweeps_each"])),
            })  # fmt: skip

    lines = [
        "# CP at every candidate rank: one rank at a time vs `cp_weights_for_ranks`",
        "",
        "Written by `experiments/cp_speed.py`; do not edit by hand. Reproduce with:",
        "",
        "    pip install -e '.[dev,vision]' && python experiments/cp_speed.py"
        + (" --quick" if args.quick else "")
        + (f" --jobs {args.jobs}" if args.jobs > 1 else "")
        + (f" --threads {args.threads}" if args.threads != 1 else ""),
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"numpy {np.__version__}; both paths on {args.threads} BLAS/OpenMP thread(s) "
        f"(`--threads`). Load average before the run: {load}: the cores were shared with other "
        "work, so wall seconds are noisy; CPU seconds count this process's work.",
        "",
        "Every conv is decomposed at the allocator's 8 CP candidate ranks (`candidate_ranks`, "
        "0.9 × the conv's FLOPs), float64, `n_iter_max=100`, `tol=1e-6`, `seed=0`. "
        "**old**: tensorly's `parafac` per rank (the previous `cp_weight`); **cold**: today's "
        "`cp_weight` per rank (the same ALS from the same SVD start on the new engine: same "
        "errors up to rounding); **new**: `cp_weights_for_ranks` (the smallest rank as "
        "`cp_weight`, each larger one warm-started from it, with a line search and a sweep "
        "budget of about 5 sweeps at the largest rank). Errors are `‖W − Ŵ‖/‖W‖` per rank; "
        "*converged* is the fraction of ranks whose ALS met `tol` before its sweep budget.",
        "",
        "## Totals",
        "",
        "| model | convs | path | wall s | CPU s | mean rel. error | converged | sweeps/rank |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    models = list(dict.fromkeys(r["model"] for r in rows))
    for model in models:
        every = list(dict.fromkeys(r["layer"] for r in rows if r["model"] == model))
        ran = {p: [x for x in every if any(r["model"] == model and r["layer"] == x
                                           and r["path"] == p for r in rows)] for p in PATHS}  # fmt: skip
        scopes = sorted({tuple(v) for v in ran.values() if v}, key=len)
        for layers in scopes:
            label = f"all {len(every)}" if len(layers) == len(every) else ", ".join(layers)
            for path, s in summarise(rows, model, list(layers)).items():
                if s["layers"] < len(layers):
                    continue  # this path did not run on every conv of the scope
                lines.append(
                    f"| {model} | {label} | {path} | {s['seconds']:.1f} | {s['cpu_seconds']:.1f} "
                    f"| {s['mean_error']:.4f} | {s['converged']:.2f} | {s['sweeps']:.1f} |"
                )
        for name, n, jobs, wall in parallel:
            if name == model:
                lines.append(f"| {model} | all {n} | new, {jobs} processes | {wall:.1f} | | | | |")
    lines += ["", "## Error of new against old, rank by rank", ""]
    lines += [
        "| model | against | ranks compared | mean new/old | worst new/old | ranks > 1 % worse |"
    ]
    lines += ["|---|---|---:|---:|---:|---:|"]
    for model in models:
        for base in ("old", "cold"):
            mean, worst, bad, n = ratio_stats(rows, model, base)
            if n:
                lines.append(f"| {model} | {base} | {n} | {mean:.4f} | {worst:.4f} | {bad} |")
    agree = []
    for r in rows:
        if r["path"] == "old":
            cold = next((o for o in rows if o["model"] == r["model"] and o["layer"] == r["layer"]
                         and o["path"] == "cold"), None)  # fmt: skip
            if cold is not None:
                agree += [abs(a - b) / b for a, b in zip(cold["errors"], r["errors"], strict=True)]
    if agree:
        lines += ["", f"cold vs old (same algorithm, new engine): largest relative difference "
                  f"in error {max(agree):.1e} over {len(agree)} ranks."]  # fmt: skip
    if probes:
        lines += ["", "## Why the old path skips the large convs", ""] + [f"* {p}" for p in probes]
    lines += ["", "## Every conv", "", "| model | conv | shape | ranks | path | wall s | CPU s "
              "| mean error | converged | sweeps per rank |", "|---|---|---|---|---|---:|---:|---:|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['layer']} | {r['shape']} | {' '.join(map(str, r['ranks']))} "
            f"| {r['path']} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} "
            f"| {np.mean(r['errors']):.4f} | {sum(r['converged_each'])}/{len(r['converged_each'])} "
            f"| {' '.join(map(str, r['sweeps_each']))} |"
        )
    (out / "cp_speed.md").write_text("\n".join(lines) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``--quick`` writes into a new temp folder unless ``--out`` is given."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two convs per model, to a temp dir")
    parser.add_argument(
        "--threads", type=int, default=1, help="BLAS/OpenMP threads of both paths (default 1)"
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="also time the new path on N processes (convs shared)"
    )
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the csv and md (default results/; --quick: a temp dir)")  # fmt: skip
    args = parser.parse_args(argv)
    args.out_given = args.out is not None
    args.out = output_folder(parser, args.out, "--quick" if args.quick else None, "cp_speed_")
    return args


def main() -> None:
    args = parse_args()
    want = str(args.threads)
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    if any(os.environ.get(k) != want for k in names):  # numpy's BLAS reads them only at start
        os.execve(
            sys.executable,
            # the same folder: a --quick run's temp folder is made (and printed) once
            [sys.executable, *sys.argv, *([] if args.out_given else ["--out", str(args.out)])],
            {**os.environ, **dict.fromkeys(names, want)},
        )
    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    rows, probes, parallel = [], [], []
    for model_name, model, input_shape in load_models(args.quick):
        convs = conv_sizes(model, input_shape)
        old_layers = OLD_LAYERS[model_name]
        if args.quick:
            convs = convs[:2]
        for layer, conv, in_hw, out_hw in progress(convs, f"{model_name} convs"):
            ranks = cp_candidates(conv, in_hw, out_hw)
            if not ranks:
                continue
            cold_layers = COLD_LAYERS[model_name]
            paths = [
                p
                for p, on in zip(PATHS, (old_layers, cold_layers, None), strict=True)
                if on is None or layer in on
            ]
            for path in paths:
                factors, wall, cpu = run_path(path, conv, ranks)
                rows.append({
                    "model": model_name, "layer": layer, "ranks": ranks, "path": path,
                    "shape": "x".join(map(str, conv.weight.shape)),
                    "seconds": wall, "cpu_seconds": cpu,
                    "errors": [factors[r].relative_error(conv.weight) for r in ranks],
                    "converged_each": [factors[r].converged for r in ranks],
                    "sweeps_each": [max(factors[r].iterations) for r in ranks],
                })  # fmt: skip
                print(f"{model_name} {layer} {path}: {wall:.2f} s wall, {cpu:.2f} s CPU, "
                      f"mean error {np.mean(rows[-1]['errors']):.4f}", flush=True)  # fmt: skip
        if args.jobs > 1:
            tasks = [(c.weight.detach(), c.groups, cp_candidates(c, i, o)) for _, c, i, o in convs]
            wall = new_in_processes(tasks, args.jobs, args.threads)
            parallel.append((model_name, len(tasks), args.jobs, wall))
            print(f"{model_name} new, every conv, {args.jobs} processes: {wall:.1f} s wall")
        if model_name == "resnet18" and not args.quick:
            name, conv, in_hw, out_hw = next(c for c in convs if c[0] == "layer3.0.conv2")
            top = cp_candidates(conv, in_hw, out_hw)[-1]
            per_sweep = probe_old_sweep(conv, top)
            probes.append(
                f"tensorly on resnet18 {name} ({'x'.join(map(str, conv.weight.shape))}) at rank "
                f"{top}: {per_sweep:.1f} s per ALS sweep, so about {100 * per_sweep / 60:.0f} min "
                "for that one rank at 100 sweeps (at the top rank of a 512-channel conv, its "
                "Khatri-Rao products alone take over 10 GB)."
            )
            print(probes[-1])
    write_report(rows, probes, parallel, out, args, load)
    print(f"wrote {out / 'cp_speed.csv'} and {out / 'cp_speed.md'}")


if __name__ == "__main__":
    main()

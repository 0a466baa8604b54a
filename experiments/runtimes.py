"""Where users deploy: the same plans in eager PyTorch, channels-last, ``torch.compile``
(inductor, CPU), ONNX Runtime and OpenVINO, each against the original in the same runtime.

Plans of the shared CIFAR ResNet-20/32 (real weights; data-free ``--target-flops 0.5``: ``auto``
as planned and with ``--rank-multiple 8``, and network decoupling at ``T=1``); every model
BN-folded. Each runtime times the original and each plan side by side (two interleaved rounds,
best median each; ``torch.utils.benchmark`` blocks as in ``decouple.runtime.latency``), batch 1
and 32, 2 threads. ``torch.compile`` compiles once per model and batch (not timed); OpenVINO
reads the same ONNX export ONNX Runtime runs, in float32 (its CPU default is bfloat16 where the
CPU has AMX or AVX-512 BF16, as this one does). A runtime that is not installed is left out with a
line saying so (OpenVINO: the ``runtimes`` extra).

Run (needs ../shared/assets; about 15 minutes on 2 cores, nothing else running)::

    pip install -e '.[dev,vision,runtimes]' && python experiments/runtimes.py

→ ``results/runtimes.md``, ``results/runtimes.csv``. ``--quick``: ResNet-20, batch 32, eager and
ONNX Runtime, into a temporary folder.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch
from experiment_io import progress, quick_or_full, write_csv

from decouple import DecoupleConfig
from decouple.io.checkpoint import load_model
from decouple.io.images import shared_assets_dir
from decouple.nn.flops import count_flops
from decouple.pipeline import compress_
from decouple.runtime.latency import Prepared, cpu_name, prepare, time_prepared
from decouple.surgery.bn_fold import fold_batchnorm_

ARCH = {"cifar_resnet20": "resnet20-12fca82f.th", "cifar_resnet32": "resnet32-d509ac18.th"}
RUNTIMES = ("eager", "channels-last", "torch.compile", "onnxruntime", "openvino")
FIELDS = ["model", "plan", "flops_ratio", "runtime", "batch", "ms", "original_ms", "speedup"]
THREADS = 2


def plans(model) -> dict:
    out = {}
    for label, config, kw in (
        ("auto flops 0.5", DecoupleConfig(method="auto"), {"target_flops": 0.5}),
        ("auto flops 0.5, ranks ×8", DecoupleConfig(method="auto", rank_multiple=8),
         {"target_flops": 0.5}),
        ("nd T=1", DecoupleConfig(rank=1), {}),
    ):  # fmt: skip
        m = copy.deepcopy(model)
        compress_(m, config, (3, 32, 32), **kw)
        out[label] = m.eval()
    return out


def prepared(module, x, runtime: str) -> Prepared:
    if runtime in ("eager", "channels-last", "onnxruntime"):
        return prepare(module, x, runtime, THREADS)
    if runtime == "torch.compile":
        compiled = torch.compile(copy.deepcopy(module))

        def run(a):
            with torch.inference_mode():
                return compiled(a)

        run(x)  # compile now, not in the timing
        return Prepared(run, x)
    import openvino as ov

    from decouple.runtime.export import onnx_bytes

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        path.write_bytes(onnx_bytes(module, x))
        core = ov.Core()
        compiled = core.compile_model(
            core.read_model(str(path)), "CPU",
            # f32 like the others: on a CPU with AMX or AVX-512 BF16 OpenVINO runs bfloat16
            # by default (3e-3 relative error on ResNet-20's logits here)
            {"INFERENCE_NUM_THREADS": THREADS, "PERFORMANCE_HINT": "LATENCY",
             "INFERENCE_PRECISION_HINT": "f32"},
        )  # fmt: skip
    request = compiled.create_infer_request()
    return Prepared(lambda a: request.infer([a]), x.numpy())


def available(runtime: str) -> bool:
    needs = {"onnxruntime": "onnxruntime", "openvino": "openvino"}.get(runtime)
    return needs is None or importlib.util.find_spec(needs) is not None


def parse_args(argv=None) -> argparse.Namespace:
    return quick_or_full(__doc__, "runtimes-", argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    assets = shared_assets_dir()
    if assets is None or not (assets / ARCH["cifar_resnet20"]).is_file():
        sys.exit("runtimes: the shared CIFAR-10 assets are not found (../shared/assets)")
    torch.set_num_threads(THREADS)
    archs = ["cifar_resnet20"] if args.quick else list(ARCH)
    runtimes = ("eager", "onnxruntime") if args.quick else RUNTIMES
    batches = (32,) if args.quick else (1, 32)
    missing = [r for r in runtimes if not available(r)]
    for r in missing:
        print(f"runtimes: {r} is not installed; left out", flush=True)
    rows = []
    for arch in archs:
        base = load_model(assets / ARCH[arch], arch)[0].eval()
        models = {"original": copy.deepcopy(base), **plans(base)}
        fold_batchnorm_(models["original"])
        one = torch.zeros(1, 3, 32, 32)
        f0 = count_flops(models["original"], one)[0]
        for runtime in (r for r in runtimes if r not in missing):
            for batch in batches:
                x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
                if runtime == "torch.compile":
                    # the models share their forward's code, and dynamo recompiles it per model
                    # and batch: past its limit (8) it would run the rest in eager, silently
                    torch._dynamo.reset()
                preps = {k: prepared(m, x, runtime) for k, m in models.items()}
                best = dict.fromkeys(preps, float("inf"))
                for _ in range(2):
                    for k in progress(list(preps), f"{arch} {runtime} batch {batch}"):
                        m, _ = time_prepared(preps[k], 0.5, threads=THREADS)
                        best[k] = min(best[k], m.median * 1e3)
                for k in models:
                    rows.append({
                        "model": arch, "plan": k, "runtime": runtime, "batch": batch,
                        "flops_ratio": f0 / count_flops(models[k], one)[0], "ms": best[k],
                        "original_ms": best["original"], "speedup": best["original"] / best[k],
                    })  # fmt: skip
                print(f"{arch} {runtime} batch {batch}: "
                      + ", ".join(f"{k} {best['original'] / v:.2f}x" for k, v in best.items()),
                      flush=True)  # fmt: skip
        write(rows, Path(args.out), missing)
    print(f"wrote {args.out}/runtimes.md and runtimes.csv")


def write(rows: list[dict], out: Path, missing: list[str]) -> None:
    write_csv(out / "runtimes.csv", FIELDS, rows)
    runtimes = list(dict.fromkeys(r["runtime"] for r in rows))
    lines = [
        "# The same plans in five runtimes",
        "",
        "Written by `python experiments/runtimes.py`. BN-folded models of the shared CIFAR "
        f"ResNets, data-free plans; {cpu_name()}, {THREADS} threads; each cell: the original's "
        "time in that runtime (ms), and each plan's speedup over the original *in the same "
        "runtime* (best median of two interleaved rounds)."
        + (f" Not installed, left out: {', '.join(missing)}." if missing else ""),
        "",
        "| model | batch | plan | FLOPs | " + " | ".join(runtimes) + " |",
        "|---|---:|---|---:|" + "---:|" * len(runtimes),
    ]
    keys = list(dict.fromkeys((r["model"], r["batch"], r["plan"]) for r in rows))
    for model, batch, plan in keys:
        cells = []
        for rt in runtimes:
            got = [r for r in rows if (r["model"], r["batch"], r["plan"], r["runtime"])
                   == (model, batch, plan, rt)]  # fmt: skip
            if not got:
                cells.append("–")
            elif plan == "original":
                cells.append(f"{got[0]['ms']:.3f} ms")
            else:
                cells.append(f"{got[0]['speedup']:.2f}×")
        flops = next(r["flops_ratio"] for r in rows if (r["model"], r["plan"]) == (model, plan))
        lines.append(f"| {model} | {batch} | {plan} | {flops:.2f}× | " + " | ".join(cells) + " |")
    (out / "runtimes.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

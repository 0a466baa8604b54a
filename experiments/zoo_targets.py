"""``--target-flops 0.5`` as a user runs it on the models whose FLOPs sit in 1×1 convs and linear
layers: ResNet-50, MobileNetV2, EfficientNet-B0 and ConvNeXt-Tiny (torchvision, random weights).

Each model is saved as a state_dict and run through the CLI with its defaults (``--method
auto``, data-free) and ``--latency --runtime onnxruntime``, so that its own report holds the
FLOPs (``FlopCounterMode``) and the ONNX Runtime latency of the BN-folded original and of the
decoupled model, measured side by side (batch 1, this machine's 2 cores). The report is read
back.

Run (about an hour on 2 cores; ResNet-50's planning is most of it)::

    pip install -e '.[dev,vision]' && python experiments/zoo_targets.py

→ ``results/zoo_targets.md``. ``--models a,b`` picks models (into a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from experiment_io import output_folder

MODELS = ["mobilenet_v2", "efficientnet_b0", "convnext_tiny", "resnet50"]


def run(arch: str, folder: Path) -> dict:
    import torchvision

    torch.manual_seed(0)
    path = folder / f"{arch}.pt"
    torch.save(torchvision.models.get_model(arch, weights=None).state_dict(), path)
    out = folder / f"{arch}.decoupled.pt"
    argv = [sys.executable, "-m", "decouple", str(path), "--arch", arch, "--target-flops", "0.5",
            "--latency", "--runtime", "onnxruntime", "--quiet", "--out", str(out),
            "--allow-miss"]  # random weights: the output check's verdict says nothing  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode:
        return {"model": arch, "error": proc.stderr.strip(), "seconds": seconds}
    report = json.loads(out.with_name(out.stem + ".report.json").read_text())
    t, alloc, lat = report["totals"], report["allocation"], report["latency"]
    kinds: dict[str, int] = {}
    for label in alloc["methods"].values():
        k = "keep" if label == "keep" else label.rsplit(" ", 1)[0]
        kinds[k] = kinds.get(k, 0) + 1
    return {
        "model": arch,
        "decoupled": f"{t['layers_decoupled']} of {len(report['layers'])}",
        "flops": t["flops_ratio"],
        "reached": alloc["reached"],
        "before_ms": lat["before"]["median_ms"],
        "after_ms": lat["after"]["median_ms"],
        "speedup": lat["speedup"],
        "methods": ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())),
        "seconds": seconds,
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=None, help="comma list of torchvision names")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.out = output_folder(p, args.out, "--models" if args.models else None, "zoo-targets-")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    names = args.models.split(",") if args.models else MODELS
    rows = []
    with tempfile.TemporaryDirectory(prefix="decouple-zoo-") as tmp:
        for arch in names:
            rows.append(run(arch, Path(tmp)))
            print(rows[-1], flush=True)
    lines = [
        "# `--target-flops 0.5` on the models whose FLOPs are in 1×1 convs and linear layers",
        "",
        "Written by `python experiments/zoo_targets.py`: `decouple X.pt --arch X --target-flops "
        "0.5 --latency --runtime onnxruntime` (torchvision, random weights, data-free, `--method "
        "auto` by default), read back from each report. ONNX Runtime at batch 1 on this "
        "machine's 2 cores, the BN-folded original against the decoupled model, side by side.",
        "",
        "| model | layers decoupled | FLOPs | reached | ORT before → after (ms) | speedup | "
        "methods chosen | seconds |",
        "|---|---|---:|---|---|---:|---|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | failed: {r['error']} | | | | | | {r['seconds']:.0f} |")
            continue
        lines.append(
            f"| {r['model']} | {r['decoupled']} | {r['flops']:.2f}× | "
            f"{'yes' if r['reached'] else 'no'} | {r['before_ms']:.2f} → {r['after_ms']:.2f} | "
            f"{r['speedup']:.2f}× | {r['methods']} | {r['seconds']:.0f} |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "zoo_targets.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}/zoo_targets.md")


if __name__ == "__main__":
    main()

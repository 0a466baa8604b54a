"""The CLI on models that do not return one tensor: what the report's output check compares.

``deeplabv3_resnet50`` (an OrderedDict ``out``/``aux``) and ``fasterrcnn_resnet50_fpn`` (a list
of per-image dicts of boxes, scores and labels) with random weights (``weights=None``, no
pretrained backbone: nothing is downloaded), each saved as a state_dict and run through the CLI
as a user would, at ``--rank 2`` and at ``--rank 9`` (a 3×3 conv's full rank: exact, so the check
must find nothing moved), ``--input-shape 3,320,320``. Each report's ``output`` section is read
back.

Run (about 15 minutes on 2 cores)::

    pip install -e '.[dev,vision]' && python experiments/output_check.py

→ ``results/output_check.md``.
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

RUNS = [
    ("deeplabv3_resnet50", "2"),
    ("deeplabv3_resnet50", "9"),
    ("fasterrcnn_resnet50_fpn", "2"),
    ("fasterrcnn_resnet50_fpn", "9"),
]


def save_weights(arch: str, folder: Path) -> Path:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, weights_backbone=None)
    path = folder / f"{arch}.pt"
    torch.save(model.state_dict(), path)
    return path


def run_cli(path: Path, arch: str, rank: str, folder: Path) -> tuple[dict, float, str]:
    out = folder / f"{arch}.r{rank}.pt"
    argv = [sys.executable, "-m", "decouple", str(path), "--arch", arch, "--rank", rank,
            "--input-shape", "3,320,320", "--quiet", "--out", str(out),
            "--allow-miss"]  # random weights: a low rank wrecks them, and that is measured  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{arch} --rank {rank}: {proc.stderr.strip()}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("output", "detections"))]
    report = json.loads(out.with_name(out.stem + ".report.json").read_text())
    return report, seconds, " / ".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.out = output_folder(p, args.out, None, "output-check-")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="decouple-output-check-") as tmp:
        folder = Path(tmp)
        weights = {}
        for arch, rank in RUNS:
            if arch not in weights:
                weights[arch] = save_weights(arch, folder)
            report, seconds, summary = run_cli(weights[arch], arch, rank, folder)
            t = report["totals"]
            rows.append(
                f"| `{arch}` | {rank} | {t['layers_decoupled']} of {len(report['layers'])} | "
                f"{t['flops_ratio']:.2f}× | {summary} | {seconds:.0f} |"
            )
            print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# The output check on segmentation and detection models",
        "",
        "Written by `python experiments/output_check.py`: the CLI (`decouple X.pt --arch ARCH "
        "--rank T --input-shape 3,320,320`) on torchvision models with random weights, each "
        "report's output lines as printed. Rank 9 is a 3×3 conv's full rank: exact.",
        "",
        "| model | `--rank` | layers decoupled | FLOPs | output check (as the report prints it) "
        "| seconds |",
        "|---|---:|---|---:|---|---:|",
        *rows,
    ]
    (out / "output_check.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}/output_check.md")


if __name__ == "__main__":
    main()

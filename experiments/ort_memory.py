"""Peak memory of timing one layer's options side by side in ONNX Runtime: one arena or many.

The latency tables (``--target-latency --runtime onnxruntime``) time every option of a layer in
interleaved rounds, each option an ONNX Runtime session. Each session keeps a CPU memory arena as
large as the activations it ran, so the sessions of one layer held their activations all at
once: VGG-16 under ``--target-latency 0.6`` at batch 32, 224×224, peaked at 21.5 GB
(``results/scale.md``). :func:`decouple.runtime.onnx_check.shared_arena` registers one arena for
the process, which every session uses (only one runs at a time).

This times VGG-16's second conv (64→64 3×3 at 224×224, the largest activations of the network)
against its options as the tables build them (network decoupling in both orders at T = 1 to 4,
CP at 4 ranks, Tucker-2 at 2), at batch 8 and, with the shared arena, 32 (the tables'), in ONNX Runtime, in
a fresh process per mode (``DECOUPLE_ORT_SHARED_ARENA=1`` or ``0``), and reports each process's
peak RSS and the options' median times (a check that sharing the arena costs no speed: both
modes time the same sessions; compare as ratios, the machine is noisy).

Run::

    pip install -e '.[dev,vision]' && python experiments/ort_memory.py

→ ``results/ort_memory.md``. ``--quick``: batch 2, into a temporary folder (about a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from experiment_io import output_folder

CHILD = """
import json, resource, sys, torch
from torch import nn
from decouple.runtime.realize import time_candidates
from decouple.surgery.methods import factor_conv
torch.manual_seed(0)
torch.set_num_threads(2)
conv = nn.Conv2d(64, 64, 3, padding=1).eval()
options = {"original": conv}
for order in ("dw-pw", "pw-dw"):
    for t in (1, 2, 3, 4):
        options[f"nd {order} T={t}"] = factor_conv(conv, "nd", t, None, order).layer
for r in (8, 16, 32, 64):
    options[f"cp R={r}"] = factor_conv(conv, "cp", r, None).layer
for r in (16, 32):
    options[f"tucker r={r}"] = factor_conv(conv, "tucker", r, None).layer
x = torch.randn(BATCH, 64, 224, 224)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
times = time_candidates(options, x, "onnxruntime", rounds=2, min_run_time=0.05)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
print(json.dumps({"peak_gb": peak, "before_gb": before, "times": times, "options": len(options)}))
"""


def measure(shared: bool, batch: int) -> dict:
    """The child's report, with its peak RSS as the kernel counted it (``os.wait4``)."""
    env = dict(os.environ, DECOUPLE_ORT_SHARED_ARENA="1" if shared else "0")
    code = CHILD.replace("BATCH", str(batch))
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env
    )
    stdout = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"batch {batch}, shared={shared}: exit {child.returncode}")
    return json.loads(stdout.strip().splitlines()[-1]) | {"peak_gb": usage.ru_maxrss / 1e6}


MODES = {"an arena per session": False, "one shared arena": True}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="batch 2, into a temporary folder")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.out = output_folder(p, args.out, "--quick" if args.quick else None, "ort-memory-")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    out = args.out
    # (batch, mode): batch 32 with an arena per session passed 23 GB and was killed by the
    # kernel on this 24 GB machine, so both modes compare at 8, and the shared one runs at 32
    runs = [(2, m) for m in MODES] if args.quick else [(8, m) for m in MODES]
    runs += [] if args.quick else [(32, "one shared arena")]
    got = {(b, m): measure(MODES[m], b) for b, m in runs}
    first = next(iter(got.values()))
    lines = [
        "# Timing a layer's options in ONNX Runtime: peak memory with one arena or many",
        "",
        "Written by `python experiments/ort_memory.py` (its docstring says what runs). "
        f"VGG-16's second conv and its {first['options'] - 1} options, 224×224, timed side "
        "by side in ONNX Runtime (2 threads, interleaved rounds) in a fresh process per row; "
        "peak RSS as the kernel counted it for that process. *before timing*: its peak before "
        "the first session (the input, the layers). Batch 32 (the latency tables' batch) with an "
        "arena per session is not run: it ran out of this 24 GB machine's memory and was killed.",
        "",
        "| batch | mode | peak RSS before timing (GB) | peak RSS (GB) |",
        "|---:|---|---:|---:|",
    ]
    for (b, mode), r in got.items():
        lines.append(f"| {b} | {mode} | {r['before_gb']:.2f} | {r['peak_gb']:.2f} |")
    b = runs[0][0]
    own, shared = got[(b, "an arena per session")], got[(b, "one shared arena")]
    ratios = sorted(shared["times"][k] / own["times"][k] for k in own["times"])
    lines += [
        "",
        f"At batch {b}: {shared['peak_gb']:.2f} GB with one arena against {own['peak_gb']:.2f} GB "
        f"with one per session ({own['peak_gb'] / shared['peak_gb']:.1f}× less). Each option's "
        "median time with the shared arena over its time with its own: "
        f"{ratios[0]:.2f} to {ratios[-1]:.2f} (median {ratios[len(ratios) // 2]:.2f}; two "
        "processes one after the other on a shared machine).",
        "",
    ]
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "ort_memory.md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {out}/ort_memory.md")


if __name__ == "__main__":
    main()

"""A CP layer in four ops or three: its two depthwise convs (``kh×1``, then ``1×kw``) one after
the other (``separable``), or as one ``kh×kw`` depthwise conv with their outer-product kernels
(``square``), each timed beside the 3×3 conv it replaces.

Every layer is a :class:`~decouple.nn.factorized.CPConv2d` with random weights (only shapes
decide a time) at two ranks: ``R = C`` (what the latency plans mostly choose on the CIFAR
ResNets) and the rank at 2× fewer FLOPs, ``R = 0.5·N·C·9 / (C + N + 6)`` (issue 23), both
rounded to a multiple of 8. Shapes: the CIFAR ResNets' three stages at batch 32 and batch 1, and
ResNet-18's four stages at 224×224 at batch 1. Times are :func:`decouple.runtime.realize.
time_candidates`' (ONNX Runtime, one thread, interleaved rounds, net of the call overhead), the
same clock that prices a latency budget's layer table; *speed* is the original conv's time over
the realization's.

    pip install -e '.[dev,vision]' && python experiments/cp_realizations.py   # about 2 minutes

→ ``results/cp_realizations.md`` and ``.csv``. ``--quick``: two shapes into a temporary folder.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch
from experiment_io import output_folder, progress, write_csv
from torch import nn

from decouple.nn.factorized import CP_REALIZATIONS, CPConv2d
from decouple.runtime.latency import cpu_name
from decouple.runtime.realize import time_candidates

FIELDS = ["net", "channels", "hw", "batch", "rank", "original_ms", "separable_ms", "square_ms",
          "separable_speed", "square_speed", "square_vs_separable"]  # fmt: skip
# (net, channels, spatial size, batch): where the shared CIFAR ResNets and ResNet-18 spend time
SHAPES = [
    *(("CIFAR ResNet", c, hw, b) for b in (32, 1) for c, hw in ((16, 32), (32, 16), (64, 8))),
    *(("ResNet-18", c, hw, 1) for c, hw in ((64, 56), (128, 28), (256, 14), (512, 7))),
]


def ranks(c: int) -> list[int]:
    """``R = C`` and the rank at 2× fewer FLOPs, multiples of 8."""
    half = 0.5 * c * c * 9 / (2 * c + 6)
    return sorted({c, max(8, round(half / 8) * 8)})


def time_shape(c: int, hw: int, batch: int, rank: int, rounds: int) -> dict:
    torch.manual_seed(0)
    conv = nn.Conv2d(c, c, 3, padding=1).eval()
    cp = CPConv2d(c, c, 3, rank, padding=1).eval()
    for p in cp.parameters():
        nn.init.normal_(p, std=0.1)
    candidates = {"original": conv}
    for real in CP_REALIZATIONS:
        twin = CPConv2d(c, c, 3, rank, padding=1).eval()
        twin.load_state_dict(cp.state_dict())
        candidates[real] = twin.set_realization(real)
    x = torch.randn(batch, c, hw, hw)
    t = time_candidates(candidates, x, "onnxruntime", rounds, 0.1, 1)
    return {
        "channels": c, "hw": hw, "batch": batch, "rank": rank,
        **{f"{k}_ms": round(v, 4) for k, v in t.items()},
        "separable_speed": round(t["original"] / t["separable"], 2),
        "square_speed": round(t["original"] / t["square"], 2),
        "square_vs_separable": round(t["separable"] / t["square"], 3),
    }  # fmt: skip


def write(rows: list[dict], out: Path) -> None:
    write_csv(out / "cp_realizations.csv", FIELDS, rows)
    faster = sum(r["square_vs_separable"] > 1 for r in rows)
    lines = [
        "# A CP layer in four ops (`separable`) or three (`square`)",
        "",
        f"Written by `python experiments/cp_realizations.py` on {cpu_name()} "
        f"({platform.machine()}): ONNX Runtime, one thread, each time the best median of "
        "interleaved rounds net of the call overhead (the clock of a latency budget's layer "
        "table). A 3×3 conv `C → C` with padding 1 and the CP layer that replaces it, at "
        "`R = C` and at the rank of 2× fewer FLOPs. *speed*: the conv's time over the layer's; "
        "*square / separable*: how many times faster the three-op graph runs than the four-op "
        "one. Both compute the same function (the square kernel is the outer product of the "
        "two depthwise kernels), so the faster one is free: a latency plan or `--realize` "
        f"times both and keeps the faster per layer. Square was faster in {faster} of "
        f"{len(rows)} shapes.",
        "",
        "| net | channels | size | batch | R | conv ms | separable ms | square ms | "
        "separable speed | square speed | square / separable |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['net']} | {r['channels']} | {r['hw']}×{r['hw']} | {r['batch']} | {r['rank']} "
            f"| {r['original_ms']:.3f} | {r['separable_ms']:.3f} | {r['square_ms']:.3f} "
            f"| {r['separable_speed']:.2f}× | {r['square_speed']:.2f}× "
            f"| {r['square_vs_separable']:.2f}× |"
        )
    (out / "cp_realizations.md").write_text("\n".join(lines) + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="two shapes, a temporary folder")
    p.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds per shape")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.out = output_folder(p, args.out, "--quick" if args.quick else None, "cp-realizations-")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    torch.set_num_threads(1)
    shapes = SHAPES[:1] + SHAPES[-1:] if args.quick else SHAPES
    jobs = [(s, r) for s in shapes for r in ranks(s[1])]
    rows = []
    for (net, c, hw, batch), rank in progress(jobs, "shapes"):
        rows.append(
            {"net": net, **time_shape(c, hw, batch, rank, 2 if args.quick else args.rounds)}
        )
    write(rows, out)
    print(f"wrote {out}/cp_realizations.md")


if __name__ == "__main__":
    main()

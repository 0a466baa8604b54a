"""How long does decoupling every conv of torchvision VGG-16 take? (weights=None; the cost is the SVDs.)

Run:  pip install -e '.[vision]' && python experiments/bench_decouple_time.py
Prints the seconds per run (median of --repeats, each on a fresh copy of the model) for both
orders at a few ranks, and writes results/decouple_time.csv.
"""

from __future__ import annotations

import argparse
import copy
import csv
import statistics
import time
from pathlib import Path

import torch
import torchvision

from decouple import DecoupleConfig, decouple_

RESULTS = Path(__file__).resolve().parent.parent / "results"


def time_decoupling(
    model: torch.nn.Module, config: DecoupleConfig, repeats: int
) -> tuple[float, int]:
    seconds, n = [], 0
    for _ in range(repeats):
        fresh = copy.deepcopy(model)
        start = time.perf_counter()
        records = decouple_(fresh, config)
        seconds.append(time.perf_counter() - start)
        n = sum(r.action == "decoupled" for r in records)
    return statistics.median(seconds), n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "decouple_time.csv")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None).eval()
    n_conv_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    print(
        f"VGG-16: {n_conv_params:,} conv weights, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    rows = []
    for order in ("dw-pw", "pw-dw"):
        for rank in (1, 3, 9):
            sec, n = time_decoupling(model, DecoupleConfig(rank=rank, order=order), args.repeats)
            print(f"  order {order}  T={rank}: {n} convs decoupled in {sec:.3f} s")
            rows.append(
                {
                    "model": "vgg16",
                    "order": order,
                    "rank": rank,
                    "convs": n,
                    "seconds_median": round(sec, 4),
                    "repeats": args.repeats,
                    "threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                }
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

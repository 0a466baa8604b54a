"""What every experiment script shares: where it writes, and how it shows that it is alive.

* :func:`output_folder`: a full run writes into ``results/`` (the committed figures); a quick or
  partial run (``--quick``, ``--smoke``...) writes into a new temporary folder, says where, and
  refuses ``--out results/``, so that its small numbers never replace the committed ones.
* :func:`write_csv`: a table's rows as CSV, its folder made first.
* :func:`progress`: wraps a long loop. On a terminal it is a tqdm bar; piped into a file or a CI
  log it prints one plain line every few seconds (items done, elapsed time), also while a single
  item runs for minutes, so a run is never silent.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from tqdm import tqdm

RESULTS = Path(__file__).resolve().parent.parent / "results"


def write_csv(path: Path, fields: list[str], rows: Iterable[dict], extra: str = "raise") -> None:
    """``rows`` into the CSV file ``path`` under the header ``fields`` (its folder made first);
    ``extra="ignore"`` drops keys the header does not name, otherwise they raise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fields, extrasaction=extra)
        w.writeheader()
        w.writerows(rows)


def is_results(folder: Path) -> bool:
    """Whether ``folder`` is the repository's ``results/``."""
    return Path(folder).resolve() == RESULTS.resolve()


def output_folder(
    parser: argparse.ArgumentParser, out: Path | str | None, small: str | None, prefix: str
) -> Path:
    """The folder a script writes into.

    ``small`` names the quick or partial mode in use (e.g. ``"--quick"``), ``None`` for a full
    run. Without ``out``: ``results/`` for a full run, else a new temporary folder (printed).
    With ``out`` = ``results/`` in a small mode: ``parser.error`` (exit status 2).
    """
    if out is None:
        if small is None:
            return RESULTS
        folder = Path(tempfile.mkdtemp(prefix=prefix))
        print(f"{small}: writing into {folder} (results/ keeps the full run)", flush=True)
        return folder
    if small is not None and is_results(Path(out)):
        parser.error(f"{small} runs never write into results/ (its files are the full run); "
                     "give another --out or none")  # fmt: skip
    return Path(out)


def quick_or_full(doc: str, prefix: str, argv=None) -> argparse.Namespace:
    """The arguments of a script whose only options are ``--quick`` and ``--out``; ``out``
    resolved by :func:`output_folder`."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one small run, a temporary folder")
    p.add_argument("--out", help="output folder (default results/; --quick: a temporary one)")
    args = p.parse_args(argv)
    args.out = output_folder(p, args.out, "--quick" if args.quick else None, prefix)
    return args


def progress(items: Iterable, desc: str, total: int | None = None, every: float = 5.0) -> Iterator:
    """Iterate ``items``, showing progress (see the module docstring)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if sys.stderr.isatty():
        yield from tqdm(items, desc=desc, total=total)
        return
    done, start, stop = [0], time.monotonic(), threading.Event()

    def beat() -> None:
        while not stop.wait(every):
            of = f"/{total}" if total is not None else ""
            print(f"[{desc}] {done[0]}{of} done, {time.monotonic() - start:.0f} s",
                  file=sys.stderr, flush=True)  # fmt: skip

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        for item in items:
            yield item
            done[0] += 1
    finally:
        stop.set()

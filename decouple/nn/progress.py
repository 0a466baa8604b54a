"""One progress bar for every long pass: a live bar on a terminal, plain lines when piped.

A tqdm bar redraws its line with carriage returns, which a log file or a CI console keeps as one
endless line (or none at all when the bar is disabled off a terminal). :func:`progress_bar` shows
the usual bar when stderr is a terminal, and otherwise writes one plain ASCII line at most every
:data:`PIPE_INTERVAL` seconds, so a run piped to a file still says where it is. Always to stderr:
stdout is for results.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm import tqdm

__all__ = ["PIPE_INTERVAL", "progress_bar"]

PIPE_INTERVAL = 5.0  # seconds between two lines when stderr is not a terminal


class _Lines:
    """A stream wrapper that turns tqdm's carriage-return redraws into whole lines."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self._stream.write(line + "\n")

    def flush(self) -> None:
        self._stream.flush()


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(
    iterable: Iterable | None = None,
    *,
    desc: str,
    total: int | None = None,
    enabled: bool,
    unit: str = "it",
    interval: float = PIPE_INTERVAL,
) -> tqdm:
    """A tqdm bar over ``iterable`` (or a manual one: call ``update``), on stderr.

    Parameters
    ----------
    iterable : iterable, optional
        What to iterate; without it, advance the bar with ``update(n)``.
    desc : str
        What the pass does, printed first.
    total : int, optional
        Steps expected (default ``len(iterable)`` when it has one).
    enabled : bool
        Show anything at all; when False the bar is a plain pass-through.
    unit : str
        What one step is (``"batch"``, ``"layer"``...).
    interval : float
        Seconds between two lines when stderr is not a terminal.

    Returns
    -------
    tqdm
        Use it as tqdm: iterate it, or ``update`` and ``close`` it (a ``with`` block closes it).
    """
    stream = sys.stderr
    if not enabled:
        return tqdm(iterable, desc=desc, total=total, unit=unit, disable=True)
    if _is_terminal(stream):
        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, file=stream)
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        file=_Lines(stream),
        mininterval=interval,
        ascii=True,
        dynamic_ncols=False,
        ncols=80,
        leave=True,  # the last line says how the pass ended
    )

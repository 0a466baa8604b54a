"""Where a run's time goes: seconds per stage, the stages that raised the peak memory, and a
progress line as each stage ends.

The CLI (or any caller) opens :func:`recording`; every stage of the pipeline, however deep, wraps
its work in ``with stage("pricing cp"):``. Stages add up under their name (CP is priced layer by
layer: one entry for all of it), and a stage inside another is counted once, in the outer one, so
the entries sum to the time recorded. Outside :func:`recording` a stage costs one clock read and
records nothing, so library calls stay silent.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

__all__ = ["Timings", "announce_group", "current", "recording", "stage"]


ANNOUNCE_SECONDS = 0.5  # a stage quicker than this gets no progress line: it was not waited for


@dataclass
class Timings:
    """Seconds per stage, in the order stages first ran."""

    seconds: dict[str, float] = field(default_factory=dict)
    peaks: dict[str, float] = field(default_factory=dict)  # GB: the stages that raised the peak
    progress: bool = False
    min_seconds: float = ANNOUNCE_SECONDS
    started: float = field(default_factory=time.perf_counter)
    _depth: int = 0

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def total(self) -> float:
        """Seconds since recording began (the stages plus whatever ran between them)."""
        return time.perf_counter() - self.started

    def to_dict(self) -> dict:
        """Stages rounded to milliseconds, the remainder as ``other`` and the ``total``."""
        stages = {k: round(v, 3) for k, v in self.seconds.items()}
        total = self.total()
        return {
            "stages": stages,
            "other": round(max(0.0, total - sum(self.seconds.values())), 3),
            "total": round(total, 3),
            "peak_rss_gb": {k: round(v, 3) for k, v in self.peaks.items()},
        }


_CURRENT: ContextVar[Timings | None] = ContextVar("decouple_timings", default=None)


def current() -> Timings | None:
    """The timings being recorded, if any."""
    return _CURRENT.get()


def announce_group(prefix: str) -> None:
    """One progress line for the stages named ``prefix …`` (``pricing: nd 1.2 s, cp 3.4 s``),
    whose own lines were not announced, once they took :attr:`Timings.min_seconds` together."""
    timings = _CURRENT.get()
    if timings is None or not timings.progress:
        return
    group = {k[len(prefix) + 1 :]: v for k, v in timings.seconds.items()
             if k.startswith(prefix + " ")}  # fmt: skip
    if group and sum(group.values()) >= timings.min_seconds:
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in group.items())
        print(f"{prefix}: {parts}", file=sys.stderr, flush=True)


def peak_rss_gb() -> float:
    """The process's peak resident memory so far, in GB (0 where the OS does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1e9 if sys.platform == "darwin" else 1e6)  # bytes on macOS, KiB elsewhere


@contextmanager
def recording(progress: bool = False, min_seconds: float = ANNOUNCE_SECONDS) -> Iterator[Timings]:
    """Record every :func:`stage` run inside; ``progress`` prints a line on stderr as each stage
    that took at least ``min_seconds`` ends."""
    timings = Timings(progress=progress, min_seconds=min_seconds)
    token = _CURRENT.set(timings)
    try:
        yield timings
    finally:
        _CURRENT.reset(token)


@contextmanager
def stage(name: str, announce: bool = True) -> Iterator[None]:
    """Time the block as stage ``name`` of the run being recorded (nothing when none is).

    ``announce`` False: no progress line (a stage entered once per layer adds up silently; the
    layer loop's own bar shows progress)."""
    timings = _CURRENT.get()
    if timings is None or timings._depth:  # not recording, or inside a stage that counts it
        yield
        return
    timings._depth += 1
    start, peak = time.perf_counter(), peak_rss_gb()
    try:
        yield
    finally:
        timings._depth -= 1
        took = time.perf_counter() - start
        timings.add(name, took)
        if (now := peak_rss_gb()) > peak:  # this stage raised the process's peak memory
            timings.peaks[name] = now
        if timings.progress and announce and took >= timings.min_seconds:
            print(f"[{timings.total():7.1f} s] {name}: {took:.1f} s", file=sys.stderr, flush=True)


def timings_line(t: dict) -> str:
    """``time: 95.2 s until the report (calibration 41.0 s, pricing cp 30.1 s, ...)``: the stages
    that took at least 1 % of the total, in the order they ran."""
    total = t["total"]
    parts = [f"{k} {v:.1f} s" for k, v in t["stages"].items() if v >= 0.01 * total]
    if t.get("other", 0) >= 0.01 * total:
        parts.append(f"other {t['other']:.1f} s")
    line = f"time: {total:.1f} s until the files were written ({', '.join(parts)})"
    if t.get("peak_rss_gb"):  # the stage that set the peak last holds the highest figure
        where, gb = max(t["peak_rss_gb"].items(), key=lambda kv: kv[1])
        line += f"; peak memory {gb:.2f} GB, reached in {where}"
    return line

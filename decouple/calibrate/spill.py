"""Where a calibration stream's values live: in memory up to a share, else as raw files.

:mod:`decouple.calibrate.stream` stores every value that crosses a cut for every image of the set;
what fits under ``keep_bytes`` stays in memory, the rest is written to a temporary folder.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# Activations kept in memory at a cut, per network; past it they go to disk. 768 MiB where a
# sixteenth of the memory available (shared by the processes of a torchrun node) allows, at
# least 256 MiB (all of a CIFAR ResNet's: 512 images × 64 KiB). Disk time is what made
# ImageNet-size calibration slow; with 768 MiB for each of the two networks, ResNet-50's default
# path with 512 images at 224² peaked at 3.87 GB (experiments/scale_bench.py --planner).
KEEP_BYTES = 768 << 20
MIN_KEEP_BYTES = 256 << 20


def available_memory() -> int | None:
    """Bytes of memory available now (Linux ``MemAvailable``, else free pages), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_keep_bytes() -> int:
    """What each network's stream keeps in memory by default (see :data:`KEEP_BYTES`)."""
    free = available_memory()
    if free is None:
        return MIN_KEEP_BYTES
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(MIN_KEEP_BYTES, min(KEEP_BYTES, free // (16 * local)))


def release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's ``malloc_trim``; elsewhere nothing).

    Activations kept for a whole pass sit between short-lived ones on the heap; the holes they
    leave would otherwise stay in the resident set and grow with the number of batches.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass(frozen=True)
class Spilled:
    """A tensor written to a file as its raw bytes: ``torch.save``'s zip writer ran at a
    twentieth of the speed of a plain write (234 MB/s against 5 GB/s into the page cache), and
    writing spilled values that way cost as much time as running both networks on ResNet-50."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]

    @classmethod
    def save(cls, x: torch.Tensor, path: Path) -> Spilled:
        x.contiguous().reshape(-1).view(torch.uint8).numpy().tofile(path)
        return cls(path, x.dtype, tuple(x.shape))

    def load(self) -> torch.Tensor:
        raw = torch.from_numpy(np.fromfile(self.path, dtype=np.uint8))
        return raw.view(self.dtype).reshape(self.shape)

"""An on-disk cache of ``--calib synthetic`` images: made once per model, count and seed.

Making ZeroQ images costs minutes (2 to 3 on a CIFAR ResNet, 2 cores) and gives the same images
for the same model, shape, count, seed and steps every time, so the second run with the same
settings reads them back in a second. The key hashes every one of those and every tensor of the
model's ``state_dict`` (its names too), so a model whose weights or BatchNorm statistics changed
never meets another's images. Files are written atomically (a temporary file renamed into place)
and read with ``weights_only=True``; an unreadable or mismatched file is made again.

Where: ``$DECOUPLE_CACHE/synthetic`` if set, else ``$XDG_CACHE_HOME/decouple/synthetic``, else
``~/.cache/decouple/synthetic``; ``DECOUPLE_CACHE=off`` turns the cache off.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch
from torch import nn

from .cache import cache_root, write_atomic

FORMAT = 1  # bump when what a cached file holds, or how images are made, changes


def cache_dir() -> Path | None:
    """The folder of the cached images, or None when ``DECOUPLE_CACHE=off``."""
    root = cache_root()
    return None if root is None else root / "synthetic"


def cache_key(model: nn.Module, shape: tuple[int, ...], settings: dict) -> str:
    """A hex digest of the model's ``state_dict`` (names, shapes, dtypes, values), the input
    shape and the making's ``settings`` (count, seed, steps, ...)."""
    h = hashlib.sha256()
    h.update(repr((FORMAT, tuple(shape), sorted(settings.items()))).encode())
    for name, t in model.state_dict().items():
        t = t.detach()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def path_for(model: nn.Module, shape: tuple[int, ...], settings: dict) -> Path | None:
    """Where the images for these settings are cached, or None when the cache is off."""
    folder = cache_dir()
    return None if folder is None else folder / f"{cache_key(model, shape, settings)}.pt"


def load(path: Path, count: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, dict] | None:
    """The images and their record from ``path``, or None if it is missing, unreadable or not
    ``count`` images of ``shape``."""
    try:
        held = torch.load(path, map_location="cpu", weights_only=True)
        x, info = held["images"], dict(held["info"])
    except Exception:  # a torn or foreign file: make the images again
        return None
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != (count, *shape):
        return None
    return x, info


def store(path: Path, x: torch.Tensor, info: dict) -> None:
    """Write ``x`` and ``info`` to ``path`` atomically (never a half-written file there)."""
    buffer = io.BytesIO()
    torch.save({"images": x.detach().cpu(), "info": info}, buffer)
    write_atomic(path, buffer.getvalue())

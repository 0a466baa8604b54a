"""Output files: where they go and their bytes; :mod:`decouple.io.output_set` writes them."""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch


def torch_bytes(obj: object) -> bytes:
    """``torch.save`` into memory."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


WEIGHT_SUFFIXES = (".pt", ".pth", ".th", ".ckpt", ".bin", ".tar")


def sidecar_path(weights_path: str | os.PathLike, suffix: str) -> Path:
    """A file beside a saved model: ``x.decoupled.pt`` -> ``x.decoupled<suffix>``.

    Only a weights-file extension is dropped, so ``x.decoupled`` -> ``x.decoupled<suffix>`` too.
    """
    p = Path(weights_path)
    base = p.name[: -len(p.suffix)] if p.suffix in WEIGHT_SUFFIXES else p.name
    return p.with_name(base + suffix)


def recipe_path_for(weights_path: str | os.PathLike) -> Path:
    """The recipe that sits next to a saved decoupled model: ``x.pt`` -> ``x.recipe.json``."""
    return sidecar_path(weights_path, ".recipe.json")

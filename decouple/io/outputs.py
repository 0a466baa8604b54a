"""Output files: where they go, no overwrite without ``force``, written atomically."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from .errors import InputError


def check_output_paths(paths: Mapping[str, Path], inputs: list[Path], force: bool) -> None:
    """Refuse outputs that collide, overwrite an input, exist without ``force``, or can't be made."""
    seen: dict[Path, str] = {}
    for what, p in paths.items():
        real = p.resolve()
        if any(real == i.resolve() for i in inputs):
            raise InputError(
                f"the {what} output {p} would overwrite the input file; choose another --out"
            )
        if real in seen:
            raise InputError(f"the {what} and {seen[real]} outputs would both be written to {p}")
        seen[real] = what
        if p.is_dir():
            raise InputError(f"the {what} output {p} is a directory")
        if p.exists() and not force:
            raise InputError(f"output exists: {p}; pass --force to overwrite")
        ancestor = p.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise InputError(f"cannot create {p}: {ancestor} is not a directory")


def write_files_atomically(payloads: Mapping[Path, bytes]) -> None:
    """Write every file through a temporary sibling, then rename them all.

    A failure while writing leaves no new or half-written file behind; the renames come last.
    """
    staged: list[tuple[str, Path]] = []
    try:
        for path, data in payloads.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            staged.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)


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

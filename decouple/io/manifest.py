"""The manifest of an output set: each file's relative path, size and sha256, written last.

A set of outputs (decoupled weights, recipe, reports, ONNX) is complete exactly when its manifest
exists and every file matches it. The recipe names its manifest, so a recipe whose manifest is
missing, or weights that differ from the manifest's, are refused rather than loaded as a mix of
two runs. Old recipes without a manifest (and no manifest beside the weights) still load.

The manifest is JSON::

    {"format": "decouple-output-set", "version": 1,
     "files": {"model": {"path": "x.decoupled.pt", "sha256": "<hex>", "size": 1234}, ...}}

Each ``path`` is relative to the manifest's folder; the keys are the files' roles.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

from .errors import InputError
from .outputs import sidecar_path

MANIFEST_FORMAT = "decouple-output-set"
MANIFEST_VERSION = 1
MANIFEST_KEY = "manifest"  # the recipe's key naming its manifest
_CHUNK = 1 << 20


def manifest_path_for(weights_path: str | os.PathLike) -> Path:
    """The manifest beside a saved model: ``x.decoupled.pt`` -> ``x.decoupled.manifest.json``."""
    return sidecar_path(weights_path, ".manifest.json")


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _relative(path: Path, folder: Path) -> str:
    return Path(os.path.relpath(Path(path).absolute(), Path(folder).absolute())).as_posix()


def make_manifest(files: Mapping[str, tuple[Path, bytes]], manifest_path: Path) -> bytes:
    """The manifest of ``{role: (target path, content)}``, as the bytes to write."""
    entries = {
        role: {
            "path": _relative(path, manifest_path.parent),
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
        }
        for role, (path, data) in files.items()
    }
    doc = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "files": entries}
    return (json.dumps(doc, indent=2) + "\n").encode()


def name_manifest(recipe: dict, recipe_path: Path, manifest_path: Path) -> dict:
    """``recipe`` with the key naming its manifest (relative to the recipe's folder)."""
    return {**recipe, MANIFEST_KEY: _relative(manifest_path, recipe_path.parent)}


def _incomplete(weights: Path, why: str) -> InputError:
    return InputError(
        f"{weights} is an incomplete or mixed output set: {why}; a file was changed, or a run "
        f"writing it is still going (decouple --recover {Path(weights).parent} says); re-run decouple "
        "with --force"
    )


def read_manifest(path: Path, weights: Path) -> dict:
    """The ``files`` of the manifest at ``path``; :class:`InputError` when missing or damaged."""
    if not path.is_file():
        raise _incomplete(weights, f"its manifest {path} is missing")
    try:
        doc = json.loads(path.read_text())
        files = doc["files"]
        ok = doc.get("format") == MANIFEST_FORMAT and isinstance(files, dict)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise _incomplete(weights, f"its manifest {path} is damaged")
    return files


def _matches(path: Path, entry: object) -> bool:
    if not isinstance(entry, dict) or not path.is_file():
        return False
    # The size first: a mismatch there needs no hashing of a large weights file.
    return path.stat().st_size == entry.get("size") and sha256_file(path) == entry.get("sha256")


def check_output_set(weights_path: str | os.PathLike, recipe_path: Path, recipe: dict) -> None:
    """Refuse weights and recipe that do not match their manifest.

    The manifest is the one the recipe names, or else the one beside the weights; with neither
    (an output of an older decouple) there is nothing to check.
    """
    weights = Path(weights_path)
    named = recipe.get(MANIFEST_KEY) if isinstance(recipe, dict) else None
    if named is not None:
        manifest = Path(recipe_path).parent / str(named)
    else:
        manifest = manifest_path_for(weights)
        if not os.path.lexists(manifest):
            return
    files = read_manifest(manifest, weights)
    for role, path in (("recipe", Path(recipe_path)), ("model", weights)):
        if role not in files:
            raise _incomplete(weights, f"its manifest {manifest} does not list the {role}")
        if not _matches(path, files[role]):
            raise _incomplete(weights, f"{path} does not match its manifest {manifest}")


def verify_manifest(path: str | os.PathLike) -> None:
    """Check every file a manifest lists (paths relative to its folder); :class:`InputError`."""
    path = Path(path)
    for role, entry in read_manifest(path, path).items():
        file = path.parent / str(entry.get("path", "")) if isinstance(entry, dict) else path
        if not _matches(file, entry):
            raise _incomplete(path, f"the {role} file {file} does not match the manifest")

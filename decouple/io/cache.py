"""Where decouple keeps what it computed once and can reuse: one root folder, atomic writes.

``$DECOUPLE_CACHE`` if set, else ``$XDG_CACHE_HOME/decouple``, else ``~/.cache/decouple``;
``DECOUPLE_CACHE=off`` turns every cache off. Each cache has its own subfolder
(``synthetic/``: :mod:`decouple.io.synthetic_cache`; ``cost_models/``:
:mod:`decouple.io.cost_model_cache`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

OFF = ("off", "0", "no", "false")


def cache_root() -> Path | None:
    """The cache's root folder, or None when ``DECOUPLE_CACHE=off``."""
    root = os.environ.get("DECOUPLE_CACHE")
    if root is not None and root.strip().lower() in OFF:
        return None
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "decouple"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed into place: a reader never
    sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None if it is missing, unreadable or not an object."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None

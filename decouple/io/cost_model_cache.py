"""On-disk cache of fitted latency cost models (:mod:`decouple.runtime.cost_model`), one JSON
file per machine, runtime, batch, threads and software versions, under ``cost_models/`` of the
cache root (:mod:`decouple.io.cache`). Fitting takes 10 to 30 s; reading one back, nothing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .cache import cache_root, read_json, write_atomic


def path_for(key: dict) -> Path | None:
    """Where the cost model for ``key`` (JSON-able fields) is cached, or None when caching is
    off."""
    root = cache_root()
    if root is None:
        return None
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return root / "cost_models" / f"{digest}.json"


load = read_json  # the cached dict at a path, or None if it is missing or unreadable


def store(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=1).encode())

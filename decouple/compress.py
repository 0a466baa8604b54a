"""Deprecated: :mod:`decouple.compress` became :mod:`decouple.pipeline` (``compress_``) and
:mod:`decouple.plan` (the rank options and the FLOPs budget). The old names still work, with a
``DeprecationWarning`` naming the new place, until the next release removes this module.
"""

from __future__ import annotations

import importlib
import warnings

_MOVED = {
    "compress_": "decouple.pipeline",
    "CompressResult": "decouple.pipeline",
    "plan_ranks": "decouple.plan.flops_budget",
    "rank_options": "decouple.plan.options",
    "allocated_config": "decouple.plan.options",
    "method_and_order": "decouple.plan.options",
    "decouplable_convs": "decouple.surgery.rewrite",
}


def __getattr__(name: str):
    if name not in _MOVED:
        raise AttributeError(f"module 'decouple.compress' has no attribute {name!r}")
    where = _MOVED[name]
    warnings.warn(
        f"decouple.compress.{name} moved to {where}.{name}; decouple.compress goes in the next "
        "release",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(where), name)


def __dir__() -> list[str]:
    return sorted(_MOVED)

"""Checks of untrusted values (configs, overrides, recipes read from disk), one rule each.

A value of the wrong type raises :class:`~decouple.nn.guards.InputTypeError` (a ``TypeError``
that is also a ``ValueError``) naming the field, the type wanted and what was given; a value of
the right type out of range raises ``ValueError``. Nothing here allocates more than the message.
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Any

from ..factor.nd import ORDERS
from ..nn.guards import show, type_error
from .methods import METHODS

AUTO = "auto"  # every method priced per layer; a budget chooses (decouple.plan)
MAX_SEED = 2**32 - 1  # numpy's RandomState (tensorly's starts) takes no more
MAX_CP_ITER = 1_000_000  # ALS sweeps: more is a hang, not a setting


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(value: Any, what: str, low: int = 1, high: int | None = None) -> int:
    """``value`` if it is an int (not a bool) in ``[low, high]``."""
    if not is_int(value):
        raise type_error(what, "an int", value)
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{what} must be an integer {allowed}; got {show(value)}")
    return value


def check_rank(rank: Any, what: str = "rank", low: int = 1) -> None:
    if rank is not None:
        check_int(rank, what, low)


def check_energy(energy: Any, what: str = "energy") -> None:
    if energy is None:
        return
    if isinstance(energy, bool) or not isinstance(energy, (int, float)):
        raise type_error(what, "a number in (0, 1]", energy)
    if math.isnan(energy) or not 0.0 < energy <= 1.0:
        raise ValueError(f"{what} must be a number in (0, 1]; got {show(energy)}")


def check_str(value: Any, what: str, allowed: tuple[str, ...]) -> str:
    """``value`` if it is one of the strings ``allowed``."""
    if not isinstance(value, str):
        raise type_error(what, f"one of {', '.join(allowed)}", value)
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}; got {show(value)}")
    return value


def check_order(order: Any, what: str = "order") -> None:
    if order is not None:
        check_str(order, what, ORDERS)


def check_bool(value: Any, what: str) -> None:
    if not isinstance(value, bool):
        raise type_error(what, "a bool", value)


def check_config_method(method: Any, energy: Any, rank: Any = None) -> None:
    """A config's method, and what it can be combined with."""
    if method is not None and (not isinstance(method, str) or method not in (*METHODS, AUTO)):
        wanted = f"one of {', '.join(METHODS)} or {AUTO}"
        if not isinstance(method, str):
            raise type_error("method", wanted, method)
        raise ValueError(f"method must be {wanted}; got {show(method)}")
    if method == "cp" and energy is not None:
        raise ValueError("CP takes a rank, not an energy (ALS has no closed-form energy rule)")
    if method == AUTO and (rank is not None or energy is not None):
        raise ValueError(
            "method 'auto' chooses each layer's method and rank under a budget (target FLOPs, "
            "target latency or max change); it takes no fixed rank or energy"
        )


def check_pattern(key: Any) -> None:
    """An override key: a non-empty string, a plain name or a regular expression."""
    if not isinstance(key, str):
        raise type_error("an override key", "a non-empty string", key)
    if not key:
        raise ValueError("override keys must be non-empty strings; got ''")
    try:
        re.compile(key)
    except (re.error, RecursionError, OverflowError) as e:  # deep nesting overflows the parser
        why = e if isinstance(e, re.error) else type(e).__name__
        raise ValueError(
            f"override {show(key)} is neither a plain name nor a valid regex: {why}"
        ) from None


def check_keys(data: dict, allowed: tuple[str, ...], what: str) -> None:
    """Refuse keys of ``data`` outside ``allowed``, naming both."""
    unknown = [k for k in data if k not in allowed]
    if unknown:
        names = ", ".join(sorted(map(show, unknown)))
        raise ValueError(f"unknown {what} keys [{names}]; allowed: {', '.join(allowed)}")


def close_names(name: str, candidates: list[str], limit: int = 3) -> str:
    """``"did you mean 'a', 'b'?"`` or, with nothing close, a few of ``candidates``."""
    near = difflib.get_close_matches(name, candidates, n=limit, cutoff=0.5)
    if near:
        return "did you mean " + ", ".join(map(repr, near)) + "?"
    if not candidates:
        return "the model has none"
    more = f" (and {len(candidates) - limit} more)" if len(candidates) > limit else ""
    return "it has " + ", ".join(map(repr, candidates[:limit])) + more

"""Checks an in-place verb runs on the model it is given, before it changes anything.

Every verb that rewrites a model (``decouple_``, ``fold_batchnorm_``, ``apply_recipe_``,
``compress_``, ``calibrate_``, ...) needs an eager ``nn.Module``; the ones that compute from the
weights also need real weights (not the meta device). Wrong types in user input raise
:class:`InputTypeError`.
"""

from __future__ import annotations

from itertools import chain
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import UninitializedTensorMixin


class InputTypeError(TypeError, ValueError):
    """A value of the wrong type in user input (a model, a config field, a recipe entry).

    A ``TypeError`` that is also a ``ValueError``: callers that treat every bad input as a
    ``ValueError`` (the CLI's one-line errors, older code) still catch it.
    """


def show(value: Any, limit: int = 60) -> str:
    """``repr(value)``, shortened; never raises (a huge int's repr does)."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - an int over sys.get_int_max_str_digits, a broken __repr__
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def type_error(what: str, expected: str, value: Any) -> InputTypeError:
    """The error for ``what`` holding ``value`` where ``expected`` was wanted."""
    return InputTypeError(f"{what} must be {expected}; got {type(value).__name__} {show(value)}")


def check_module(model: Any, verb: str, *, needs_values: bool = True) -> None:
    """Raise unless ``model`` is an eager ``nn.Module`` that ``verb`` can change in place.

    Parameters
    ----------
    model : object
        What the caller passed.
    verb : str
        The function's name, for the message.
    needs_values : bool
        Also refuse parameters and buffers on the meta device (they hold no values to factor,
        fold or refit).

    Raises
    ------
    InputTypeError
        ``model`` is not an ``nn.Module``, or is a TorchScript module (its submodules cannot be
        replaced; pass the eager module it was scripted or traced from).
    ValueError
        ``needs_values`` and a parameter or buffer is on the meta device.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise InputTypeError(
            f"{verb} rewrites an eager model; got a TorchScript module ({type(model).__name__}): "
            "pass the nn.Module it was scripted or traced from"
        )
    if not isinstance(model, nn.Module):
        raise type_error(f"the model passed to {verb}", "an nn.Module", model)
    if not needs_values:
        return
    for name, t in chain(model.named_parameters(), model.named_buffers()):
        if not isinstance(t, UninitializedTensorMixin) and t.is_meta:
            raise ValueError(
                f"{verb} needs the model's weights, but {name!r} is on the meta device (no "
                "values): load them first, e.g. load_state_dict(..., assign=True)"
            )

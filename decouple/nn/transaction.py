"""All or nothing for in-place verbs: a call that fails halfway leaves the model as it was.

``with transaction(model):`` takes an undo log, not a copy: for every module, its attributes
(``__dict__``, with shallow copies of the dicts, lists and sets in it, so ``_modules``,
``_parameters``, ``_buffers``, hooks and flags such as ``training``), and for every parameter and
buffer its version counter. On any exception, every module gets back exactly those attributes
(the same submodule, parameter and buffer objects: identities hold), then the exception goes on.

Surgery replaces modules and parameters and never writes into the old ones, so that is enough for
it. A verb that writes into existing tensors in place (calibration refits factored layers) names
the modules whose tensors to copy first (``save_data``); a tensor changed in place without a
copy is found by its version counter and named in a note on the exception.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import chain

import torch
from torch import nn

from .guards import check_module

SaveData = Callable[[nn.Module], bool]


def _contents(value):
    """A shallow copy of a container attribute, to put back into the same object."""
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, (list, set)):
        return list(value)
    return None


def _put_back(container, saved) -> None:
    if isinstance(container, dict):
        container.clear()
        container.update(saved)
    elif isinstance(container, list):
        container[:] = saved
    else:
        container.clear()
        container.update(saved)


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter
        return None


class UndoLog:
    """What :func:`transaction` restores: module attributes, and tensors changed in place."""

    def __init__(self, model: nn.Module, save_data: SaveData | None = None) -> None:
        self._modules: list[tuple[nn.Module, dict, list]] = []
        self._tensors: list[tuple[str, torch.Tensor, int | None, torch.Tensor | None]] = []
        seen: set[int] = set()
        keep = {  # every tensor of the modules named, submodules included
            id(t)
            for m in (model.modules() if save_data is not None else ())
            if save_data(m)
            for t in chain(m.parameters(), m.buffers())
        }
        for prefix, m in model.named_modules():
            if isinstance(m, torch.jit.ScriptModule):
                continue  # surgery never rewrites TorchScript internals
            attrs = dict(m.__dict__)
            inner = [(v, c) for v in attrs.values() if (c := _contents(v)) is not None]
            self._modules.append((m, attrs, inner))
            for key, t in [*m._parameters.items(), *m._buffers.items()]:
                if t is None or id(t) in seen:
                    continue
                seen.add(id(t))
                copy = t.detach().clone() if id(t) in keep and not t.is_meta else None
                self._tensors.append((f"{prefix}.{key}" if prefix else key, t, _version(t), copy))

    @torch.no_grad()
    def restore(self) -> list[str]:
        """Put every module back; returns the tensors changed in place with no copy to restore."""
        for m, attrs, inner in self._modules:
            m.__dict__.clear()
            m.__dict__.update(attrs)
            for container, saved in inner:
                _put_back(container, saved)
        lost = []
        for name, t, version, copy in self._tensors:
            if copy is not None and copy.shape == t.shape:
                t.copy_(copy)  # always: a write through ``.data`` leaves no version behind
            elif version is not None and _version(t) != version:
                lost.append(name)
        return lost


@contextmanager
def transaction(
    model: nn.Module, verb: str = "this call", save_data: SaveData | None = None
) -> Iterator[UndoLog]:
    """Run the block on ``model``; on any exception restore ``model`` exactly, then re-raise.

    Parameters
    ----------
    model : nn.Module
        The model the block changes in place.
    verb : str
        Who is asking (for the error when ``model`` is not an eager module).
    save_data : callable, optional
        ``save_data(module) -> bool``: copy the parameters and buffers of these modules (and of
        their submodules) first, because the block may write into them in place.
    """
    check_module(model, verb, needs_values=False)
    log = UndoLog(model, save_data)
    try:
        yield log
    except BaseException as e:
        lost = log.restore()
        if lost:
            e.add_note(
                "decouple could not restore these tensors, changed in place: " + ", ".join(lost)
            )
        raise


def in_place(save_data: SaveData | None = None):
    """Decorator: run a verb whose first argument (``model``) is the model inside a
    :func:`transaction`."""

    def wrap(fn):
        @functools.wraps(fn)
        def verb(*args, **kwargs):
            model = args[0] if args else kwargs.get("model")
            with transaction(model, fn.__name__, save_data):
                return fn(*args, **kwargs)

        return verb

    return wrap

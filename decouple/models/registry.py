"""A registry of named architectures, in the spirit of torchvision's ``models/_api.py``.

Each entry carries the metadata the CLI needs to use a bare checkpoint: how to build the
network and the input shape it expects. ``--arch NAME`` looks here first, then in torchvision.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class ModelInfo:
    """Metadata of a registered architecture.

    Parameters
    ----------
    name : str
        Registry key, e.g. ``"digits_cnn"``.
    builder : callable
        Returns a freshly initialised ``nn.Module``; keyword arguments are passed through.
    input_shape : tuple of int
        Shape of one input sample, ``(C, H, W)``.
    description : str
        One line for ``--help`` and listings.
    """

    name: str
    builder: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    description: str = ""
    meta: dict = field(default_factory=dict)

    def build(self, **kwargs) -> nn.Module:
        return self.builder(**kwargs)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.build().parameters())


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(name: str, *, input_shape: tuple[int, ...], description: str = "", **meta):
    """Decorator that registers an architecture builder under ``name``."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelInfo(name, builder, tuple(input_shape), description, dict(meta))
        return builder

    return wrap


def list_models() -> list[str]:
    """Names of all registered architectures, sorted."""
    return sorted(_REGISTRY)


_FAMILIES: list[tuple[re.Pattern, Callable[[re.Match], ModelInfo]]] = []
_FAMILY_NAMES: dict[str, str] = {}  # how each family is shown -> the pattern it stands for


def register_family(
    pattern: str, factory: Callable[[re.Match], ModelInfo], shown: str | None = None
) -> None:
    """Register names matching ``pattern`` (``re.fullmatch``), e.g. every CIFAR ResNet depth.

    ``factory(match)`` returns the :class:`ModelInfo`, or raises ``ValueError`` for a name of
    the family's shape that it cannot build (such as an impossible depth). ``shown`` is how
    messages name the whole family (e.g. ``cifar_resnetN (N = 6n+2)``).
    """
    _FAMILIES.append((re.compile(pattern), factory))
    _FAMILY_NAMES[shown or pattern] = pattern


def describe_models() -> str:
    """Every architecture for a message: the families once, then the other names."""
    patterns = [re.compile(p) for p in _FAMILY_NAMES.values()]
    alone = [n for n in list_models() if not any(p.fullmatch(n) for p in patterns)]
    return ", ".join(sorted([*_FAMILY_NAMES, *alone]))


def get_model_info(name: str) -> ModelInfo:
    """Metadata of a registered architecture; ``KeyError`` naming the known ones otherwise."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    for pattern, factory in _FAMILIES:
        match = pattern.fullmatch(name)
        if match:
            try:
                return factory(match)
            except ValueError as e:
                raise KeyError(f"unknown model {name!r}: {e}") from None
    raise KeyError(f"unknown model {name!r}; registered: {describe_models()}")


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a registered architecture with fresh weights."""
    return get_model_info(name).build(**kwargs)

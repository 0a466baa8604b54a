"""Architectures that ship with decouple, reachable by name through the registry."""

from . import cifar_mbv2, cifar_resnet, digits  # noqa: F401  (register the zoo's names)
from .registry import (
    ModelInfo,
    build_model,
    describe_models,
    get_model_info,
    list_models,
    register_family,
    register_model,
)

__all__ = [
    "ModelInfo",
    "build_model",
    "describe_models",
    "get_model_info",
    "list_models",
    "register_family",
    "register_model",
]

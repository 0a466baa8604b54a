"""Architectures that ship with decouple, reachable by name through the registry."""

from . import cifar_resnet, digits  # noqa: F401  (register "cifar_resnet*" and "digits_cnn")
from .registry import (
    ModelInfo,
    build_model,
    get_model_info,
    list_models,
    register_family,
    register_model,
)

__all__ = [
    "ModelInfo",
    "build_model",
    "get_model_info",
    "list_models",
    "register_family",
    "register_model",
]

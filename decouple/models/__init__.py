"""Architectures that ship with decouple, reachable by name through the registry."""

from . import digits  # noqa: F401  (registers "digits_cnn")
from .registry import ModelInfo, build_model, get_model_info, list_models, register_model

__all__ = ["ModelInfo", "build_model", "get_model_info", "list_models", "register_model"]

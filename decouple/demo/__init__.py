"""Bundled demo: a trained :class:`~decouple.models.digits.DigitsCNN` and its test split.

The files next to this module are produced by ``experiments/train_digits_demo.py``:

* ``digits_cnn.pt``: the model's plain ``state_dict`` (float32);
* ``digits_test.pt``: ``{"images": uint8 (n, 1, 8, 8) raw 0..16 pixels, "labels": int64 (n,)}``.

Both load with ``torch.load(..., weights_only=True)``. :func:`normalize` is the one definition of
the input preprocessing, shared by training and evaluation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..models.digits import DigitsCNN

__all__ = [
    "MODEL_FILENAME",
    "PIXEL_MAX",
    "TEST_DATA_FILENAME",
    "load_demo_model",
    "load_demo_test_set",
    "model_path",
    "normalize",
    "test_data_path",
]

MODEL_FILENAME = "digits_cnn.pt"
TEST_DATA_FILENAME = "digits_test.pt"
#: Largest raw pixel value in scikit-learn's 8×8 digits (16 gray levels plus zero).
PIXEL_MAX = 16


def _demo_dir() -> Path:
    return Path(__file__).resolve().parent


def model_path() -> Path:
    """Path of the bundled ``state_dict`` file, ``digits_cnn.pt``."""
    return _demo_dir() / MODEL_FILENAME


def test_data_path() -> Path:
    """Path of the bundled test split, ``digits_test.pt``."""
    return _demo_dir() / TEST_DATA_FILENAME


def normalize(pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Map raw digit pixels (integers 0..16) to the network's input range [-1, 1].

    Parameters
    ----------
    pixels : torch.Tensor or numpy.ndarray
        Raw pixel values of any shape and any integer or float dtype.

    Returns
    -------
    torch.Tensor
        float32 tensor of the same shape, ``pixels / 8 - 1``.
    """
    x = torch.as_tensor(pixels).to(torch.float32)
    return x * (2.0 / PIXEL_MAX) - 1.0


def load_demo_model() -> DigitsCNN:
    """The bundled trained :class:`DigitsCNN`, on the CPU and in eval mode.

    Returns
    -------
    DigitsCNN
    """
    model = DigitsCNN()
    state = torch.load(model_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def load_demo_test_set() -> tuple[torch.Tensor, torch.Tensor]:
    """The bundled test split, preprocessed as in training.

    Returns
    -------
    images : torch.Tensor
        float32 ``(n, 1, 8, 8)``, passed through :func:`normalize`.
    labels : torch.Tensor
        int64 ``(n,)``, class indices 0..9.
    """
    data = torch.load(test_data_path(), map_location="cpu", weights_only=True)
    return normalize(data["images"]), data["labels"].to(torch.int64)

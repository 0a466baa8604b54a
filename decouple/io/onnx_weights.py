"""Weights out of an ONNX file: its initializers as a ``state_dict``.

An ONNX file exported from PyTorch names its initializers by module path
(``blocks.0.conv.depth_conv.conv.weight``), so a model written to match (such as
``decouple.models.cifar_mbv2``) loads them with ``load_state_dict(..., strict=True)``; BatchNorm
fills in the ``num_batches_tracked`` the exporter leaves out.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

from .errors import InputError

INSTALL_HINT = "pip install 'decouple[export]'"


def _need(module: str):
    # The same as decouple.runtime.export_util.need: io may not import runtime (same rank).
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{module} is not installed; {INSTALL_HINT}")
    return importlib.import_module(module)


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def state_dict_from_onnx(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every initializer of the ONNX model at ``path``, by name.

    Parameters
    ----------
    path : str or path-like
        An ``.onnx`` file (external data, if any, beside it).

    Returns
    -------
    dict of str to torch.Tensor
        Floating-point initializers as float32, others in their own dtype; each tensor owns its
        memory (a copy, not a view of the parsed protobuf).

    Raises
    ------
    InputError
        No such file, not an ONNX model, or an initializer that is not numeric; one line.
    ImportError
        ``onnx`` is not installed.
    """
    onnx = _need("onnx")
    from onnx import numpy_helper

    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a directory, not an ONNX file")
    if not path.is_file():
        raise InputError(f"no such ONNX file: {path}")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 - protobuf and external-data errors come in many types
        raise InputError(f"{path} is not a readable ONNX model ({_one_line(e)})") from None
    # Protobuf parses many byte strings without complaint: an ONNX model has an IR version and
    # a graph with nodes.
    if model.ir_version < 1 or not model.graph.node:
        raise InputError(f"{path} is not an ONNX model (no IR version or no graph nodes)")
    weights: dict[str, torch.Tensor] = {}
    for init in model.graph.initializer:
        try:
            array = numpy_helper.to_array(init, base_dir=str(path.parent))
        except Exception as e:  # noqa: BLE001 - missing external data, damaged tensors
            raise InputError(
                f"cannot read initializer {init.name!r} of {path}: {_one_line(e)}"
            ) from None
        if array.dtype.kind == "f":
            array = array.astype(np.float32)
        elif array.dtype.kind not in "iub":
            raise InputError(f"initializer {init.name!r} of {path} is not numeric ({array.dtype})")
        weights[init.name] = torch.from_numpy(np.array(array, copy=True))
    return weights

"""ONNX Runtime sessions and the check of an exported model against PyTorch."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..nn.outputs import flatten_output
from .export_util import compare_outputs, need, one_line


def _graph_name(files: Mapping[str, bytes]) -> str:
    return next(n for n in files if not n.endswith(".data"))


@contextlib.contextmanager
def _onnx_source(data: bytes | Mapping[str, bytes]):
    """What onnx and ONNX Runtime load: the bytes of a one-file model, or the path of its graph
    written beside its weights' file in a temporary folder."""
    if isinstance(data, Mapping) and len(data) == 1:
        data = next(iter(data.values()))
    if isinstance(data, bytes):
        yield data
        return
    with tempfile.TemporaryDirectory() as tmp:
        for n, content in data.items():
            (Path(tmp) / n).write_bytes(content)
        yield str(Path(tmp) / _graph_name(data))


_SHARED_ARENA: bool | None = None  # whether this process's sessions share one CPU arena


def shared_arena(ort) -> bool:
    """One CPU memory arena for every session of this process, registered on first use.

    Each session otherwise keeps an arena of its own, as large as the largest activations it
    ever ran: the latency tables time a layer's every option side by side, so at batch 32 and
    224×224 VGG-16's options held 21.5 GB at once. Only one session runs at a time, so one arena
    serves them all (``experiments/ort_memory.py``). ``DECOUPLE_ORT_SHARED_ARENA=0`` turns it off.
    """
    global _SHARED_ARENA
    if _SHARED_ARENA is None:
        _SHARED_ARENA = False
        if os.environ.get("DECOUPLE_ORT_SHARED_ARENA", "1") != "0":
            try:
                info = ort.OrtMemoryInfo(
                    "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
                )
                ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
                _SHARED_ARENA = True
            except Exception:  # noqa: BLE001 - an ORT without it: each session its own arena
                pass
    return _SHARED_ARENA


def ort_session(data: bytes | str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime CPU session for ``data`` with every graph optimisation on.

    Parameters
    ----------
    data : bytes or path
        A serialized ONNX model (from :func:`onnx_bytes`), or the path of an ONNX file (its
        external data, if any, beside it).
    threads : int, optional
        Intra-op threads; ``None`` uses ``torch.get_num_threads()``, so that ONNX Runtime and
        eager PyTorch are timed on the same cores.

    Raises
    ------
    RuntimeError
        ONNX Runtime cannot load the model (e.g. a float64 conv, which its CPU provider lacks).
    """
    ort = need("onnxruntime")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.log_severity_level = 3  # errors only: the CLI keeps stderr for itself
    if shared_arena(ort):
        opts.add_session_config_entry("session.use_env_allocators", "1")
    try:
        source = data if isinstance(data, bytes) else os.fspath(data)
        return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT's exceptions share no useful base class
        missing = "NOT_IMPLEMENTED" in str(e)  # a kernel the CPU provider lacks, float64 convs
        hint = " (its CPU provider lacks a kernel: is the model float32?)" if missing else ""
        raise RuntimeError(f"ONNX Runtime cannot load the model{hint}: {one_line(e)}") from None


def ort_runner(session) -> Callable[[np.ndarray], np.ndarray]:
    """A function running ``session`` on one array and returning its first output."""
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: x})[0]

    return run


def check_onnx(
    model: nn.Module,
    example: torch.Tensor,
    data: bytes | Mapping[str, bytes],
    rtol: float = 1e-3,
    atol: float = 1e-4,
) -> dict:
    """Check ``data`` (from :func:`onnx_bytes`) with the onnx checker and against PyTorch.

    Parameters
    ----------
    model : nn.Module
        The exported model (eval mode).
    example : torch.Tensor
        Input to run through both; any batch size when the batch axis is dynamic.
    data : bytes or dict of str to bytes
        The serialized ONNX model, or the files of :func:`onnx_files`.
    rtol, atol : float
        Tolerances, see ``ok`` below.

    Returns
    -------
    dict
        ``checker`` (``onnx.checker.check_model`` passed), ``max_abs_err``, ``rel_err``
        (Frobenius norm of the difference over that of PyTorch's output, all leaves together),
        ``leaves`` (each output leaf's relative error, by its path: ``out``, ``aux``, ...; a
        single tensor is ``output``) and ``ok``: the checker passed and, leaf by leaf, either
        every element is within ``atol + rtol·|y|`` or the leaf's relative error is below
        ``rtol``. The second test is there because random-weight models have outputs far from
        1, where float32 rounding alone exceeds any fixed elementwise bound; a wrong graph
        misses both by orders of magnitude.

    Raises
    ------
    RuntimeError
        ONNX Runtime cannot load or run the model.
    """
    onnx = need("onnx")
    with torch.no_grad():
        flat = flatten_output(model(example))  # ONNX's outputs, in order: dicts by value order
    expected = [t.detach().cpu().numpy() for t in flat.values()]
    with _onnx_source(data) as source:
        try:  # a path is checked with its external data, past the 2 GiB of one message
            onnx.checker.check_model(
                source if isinstance(source, str) else onnx.load_from_string(source)
            )
            checker = True
        except onnx.checker.ValidationError:
            checker = False
        session = ort_session(source)
        try:
            got = session.run(None, {session.get_inputs()[0].name: example.detach().cpu().numpy()})
        except Exception as e:  # noqa: BLE001 - ORT's exceptions share no useful base class
            raise RuntimeError(f"ONNX Runtime failed to run the model: {one_line(e)}") from None
    err, rel, close, per_leaf = compare_outputs(got, expected, rtol, atol, list(flat))
    return {
        "checker": checker,
        "max_abs_err": err,
        "rel_err": rel,
        "leaves": per_leaf,
        "ok": checker and close,
    }

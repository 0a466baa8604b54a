"""Export of decoupled models: ONNX (checked against ONNX Runtime) and ``torch.export``.

Every factored layer is a chain of plain convs (plus ``pad``, ``repeat_interleave``, ``stack`` or
``add`` in some realizations), so a decoupled model exports wherever the original does, in every
padding mode (reflect, replicate and circular become explicit ``Pad``/``Slice``/``Concat`` nodes).

ONNX goes through the TorchScript-based exporter (``dynamo=False``): in torch 2.14 it still
exists, needs no package beyond ``onnx``, and exports a decoupled ResNet-18 in about 0.5 s where
the dynamo exporter takes about 4 s (and needs ``onnxscript``). Where it fails (an op it lacks),
the dynamo exporter is tried. The batch axis is dynamic, so one file serves any batch size.

One ONNX file is one protobuf message, which cannot exceed 2 GiB. Larger models (a decoupled
ViT-H/14 has 2.4 GiB of weights) go through :func:`onnx_files`: the dynamo exporter, with the
weights in a second file beside the graph (ONNX *external data*, which the onnx checker and ONNX
Runtime read from the graph's folder).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

INSTALL_HINT = "pip install 'decouple[export]'"
PROTOBUF_LIMIT = 2**31  # bytes in one serialized protobuf message, so in one ONNX file
DEFAULT_OPSET = 17  # every op used here exists there, and ONNX Runtime runs all of it


def _need(module: str):
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{module} is not installed; {INSTALL_HINT}")
    return importlib.import_module(module)


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextlib.contextmanager
def _fds_to_devnull():
    """Point file descriptors 1 and 2 at /dev/null: when it fails, the TorchScript exporter's
    C++ logger prints the whole graph there, whatever ``verbose`` says (torch 2.14)."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
    except (OSError, AttributeError, ValueError):  # no real descriptors (embedded interpreters)
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (null, *saved):
            os.close(fd)


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' warnings, prints and log records: the CLI owns stdout and stderr."""
    level = logging.root.manager.disable
    with (
        _fds_to_devnull(),  # first: it flushes the real sys.stdout and sys.stderr
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(level)


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _spell_out_same_padding(model: nn.Module) -> nn.Module:
    """``model``, or a copy whose dilated ``padding='same'`` convs pad explicitly.

    The TorchScript exporter writes ``padding='same'`` as ``auto_pad=SAME_UPPER``, which ONNX
    Runtime refuses together with dilation. Symmetric padding becomes explicit ``pads``; odd
    total padding (even kernel) becomes a constant ``F.pad`` (the path every other padding_mode
    takes), with the extra row/column at the end as PyTorch puts it.
    """
    needs = [
        name
        for name, m in model.named_modules()
        if isinstance(m, _CONVS)
        and m.padding == "same"
        and m.padding_mode == "zeros"
        and any(d != 1 for d in m.dilation)
    ]
    if not needs:
        return model
    model = copy.deepcopy(model)
    for name in needs:
        conv = model.get_submodule(name)
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        if all(t % 2 == 0 for t in total):
            conv.padding = tuple(t // 2 for t in total)
        else:  # _reversed_padding_repeated_twice already holds the asymmetric amounts
            conv.padding_mode = "constant"
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers, each shared tensor counted once."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.nbytes for t in tensors.values())


def onnx_bytes(
    model: nn.Module,
    example: torch.Tensor,
    opset: int | None = None,
    dynamic_batch: bool = True,
) -> bytes:
    """``model`` as an in-memory ONNX model with one input ``x`` and output ``y``.

    Parameters
    ----------
    model : nn.Module
        The model to export, in eval mode (what is exported is its eval-mode function); not
        changed.
    example : torch.Tensor
        An input batch; its shape fixes every axis but the batch axis (when ``dynamic_batch``).
    opset : int, optional
        ONNX opset; ``None`` uses :data:`DEFAULT_OPSET` (the dynamo fallback: its own default).
    dynamic_batch : bool
        Name axis 0 of input and output ``"batch"`` and leave it free.

    Returns
    -------
    bytes
        A serialized ``onnx.ModelProto``.

    Raises
    ------
    ImportError
        ``onnx`` is not installed.
    RuntimeError
        Neither exporter could export the model (the first exporter's reason, on one line), or
        its weights exceed the 2 GiB protobuf limit of one ONNX file (:func:`onnx_files` writes
        them beside the graph instead).
    """
    _need("onnx")
    size = weight_bytes(model)
    if size >= PROTOBUF_LIMIT:  # fail in a second rather than after minutes of exporting
        raise RuntimeError(
            f"ONNX export failed: the weights take {size / 2**30:.1f} GiB, over the 2 GiB a "
            "single ONNX file can hold; onnx_files() puts them in a file of their own"
        )
    model = _spell_out_same_padding(model)
    axes = {"x": {0: "batch"}, "y": {0: "batch"}} if dynamic_batch else None
    buf = io.BytesIO()
    # Grad on, even inside a caller's no_grad: without it nn.MultiheadAttention takes its fused
    # fast path, an op the TorchScript exporter lacks (every torchvision ViT would fall back).
    with _quiet(), torch.inference_mode(False), torch.enable_grad():
        try:
            torch.onnx.export(
                model, (example,), buf, input_names=["x"], output_names=["y"],
                opset_version=opset or DEFAULT_OPSET, dynamic_axes=axes, dynamo=False,
            )  # fmt: skip
            return buf.getvalue()
        except Exception as e:  # noqa: BLE001 - an op the TorchScript exporter lacks
            first = e
        if importlib.util.find_spec("onnxscript") is not None:
            try:  # the dynamo exporter covers more of torch
                shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
                program = torch.onnx.export(
                    model, (example,), input_names=["x"], output_names=["y"], opset_version=opset,
                    dynamic_shapes=shapes, dynamo=True, external_data=False, verbose=False,
                )  # fmt: skip
                return program.model_proto.SerializeToString()
            except Exception:  # noqa: BLE001 - the first exporter's reason is the clearer
                pass
    raise RuntimeError(f"ONNX export failed: {_one_line(first)}")


def onnx_files(
    model: nn.Module,
    example: torch.Tensor,
    name: str = "model.onnx",
    opset: int | None = None,
    dynamic_batch: bool = True,
    external_above: int | None = None,
) -> dict[str, bytes]:
    """``model`` in ONNX, as the files to write side by side in one folder.

    Parameters
    ----------
    model, example, opset, dynamic_batch
        As :func:`onnx_bytes`.
    name : str
        File name of the graph; the weights' file is named after it.
    external_above : int, optional
        Weights of at least this many bytes go to a file of their own (default
        :data:`PROTOBUF_LIMIT`, the 2 GiB one ONNX file can hold).

    Returns
    -------
    dict of str to bytes
        ``{name: model}`` (:func:`onnx_bytes`) below ``external_above``; above it
        ``{name: graph, name + ".data": weights}``, the graph naming the weights' file relative to
        its own folder.

    Raises
    ------
    ImportError
        ``onnx`` (or, for external data, ``onnxscript``) is not installed.
    RuntimeError
        The model could not be exported (the exporter's reason, on one line).
    """
    if weight_bytes(model) < (PROTOBUF_LIMIT if external_above is None else external_above):
        return {name: onnx_bytes(model, example, opset, dynamic_batch)}
    _need("onnx")
    _need("onnxscript")  # the dynamo exporter: the TorchScript one writes a file per tensor
    model = _spell_out_same_padding(model)
    shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    with tempfile.TemporaryDirectory() as tmp:
        with _quiet(), torch.inference_mode(False), torch.enable_grad():
            try:
                program = torch.onnx.export(
                    model, (example,), input_names=["x"], output_names=["y"], opset_version=opset,
                    dynamic_shapes=shapes, dynamo=True, verbose=False,
                )  # fmt: skip
                program.save(Path(tmp) / name, external_data=True)
            except Exception as e:  # noqa: BLE001 - reported on one line
                raise RuntimeError(f"ONNX export failed: {_one_line(e)}") from None
        # A model whose tensors are all small keeps them inline: no weights file then.
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.stat().st_size}


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
    ort = _need("onnxruntime")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.log_severity_level = 3  # errors only: the CLI keeps stderr for itself
    try:
        source = data if isinstance(data, bytes) else os.fspath(data)
        return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT's exceptions share no useful base class
        missing = "NOT_IMPLEMENTED" in str(e)  # a kernel the CPU provider lacks, float64 convs
        hint = " (its CPU provider lacks a kernel: is the model float32?)" if missing else ""
        raise RuntimeError(f"ONNX Runtime cannot load the model{hint}: {_one_line(e)}") from None


def ort_runner(session) -> Callable[[np.ndarray], np.ndarray]:
    """A function running ``session`` on one array and returning its first output."""
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: x})[0]

    return run


def _leaves(out) -> list[torch.Tensor]:
    """The tensors of a model output in the order the exporters flatten them."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in _leaves(o)]


def _compare(got: list[np.ndarray], expected: list[np.ndarray], rtol: float, atol: float):
    """``(max_abs_err, Frobenius relative error, every element within atol + rtol·|y|)``."""
    if len(got) != len(expected) or any(
        g.shape != e.shape for g, e in zip(got, expected, strict=False)
    ):
        return float("inf"), float("inf"), False
    g = np.concatenate([a.astype(np.float64).ravel() for a in got])
    e = np.concatenate([a.astype(np.float64).ravel() for a in expected])
    diff = np.abs(g - e)
    rel = float(np.linalg.norm(g - e) / max(float(np.linalg.norm(e)), 1e-30))
    close = bool(np.all(diff <= atol + rtol * np.abs(e)))
    return (float(diff.max()) if diff.size else 0.0), rel, close


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
        (Frobenius norm of the difference over that of PyTorch's output) and ``ok``: the checker
        passed and either every element is within ``atol + rtol·|y|`` or ``rel_err < rtol``.
        The second test is there because random-weight models have outputs far from 1, where
        float32 rounding alone exceeds any fixed elementwise bound; a wrong graph misses both by
        orders of magnitude.

    Raises
    ------
    RuntimeError
        ONNX Runtime cannot load or run the model.
    """
    onnx = _need("onnx")
    with torch.no_grad():
        expected = [t.detach().cpu().numpy() for t in _leaves(model(example))]
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
            raise RuntimeError(f"ONNX Runtime failed to run the model: {_one_line(e)}") from None
    err, rel, close = _compare(got, expected, rtol, atol)
    return {
        "checker": checker,
        "max_abs_err": err,
        "rel_err": rel,
        "ok": checker and (close or rel < rtol),
    }


def export_program(model: nn.Module, example: torch.Tensor, rtol: float = 1e-4) -> dict:
    """``torch.export.export`` the model and compare the exported program with eager.

    Returns
    -------
    dict
        ``{"ok", "max_abs_err", "rel_err"}`` (``ok``: ``rel_err < rtol``), or
        ``{"ok": False, "error": "<one line>"}`` when export or the exported program fails.
    """
    try:
        with _quiet(), torch.no_grad():
            program = torch.export.export(model, (example,))
            got = _leaves(program.module()(example))
            expected = _leaves(model(example))
    except Exception as e:  # noqa: BLE001 - report why, on one line
        return {"ok": False, "error": _one_line(e)}
    err, rel, _ = _compare(
        [t.cpu().numpy() for t in got], [t.cpu().numpy() for t in expected], rtol, 0.0
    )
    return {"ok": rel < rtol, "max_abs_err": err, "rel_err": rel}

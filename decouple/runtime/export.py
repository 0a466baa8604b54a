"""Export of decoupled models: ONNX and ``torch.export``.

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
Runtime read from the graph's folder). :mod:`decouple.runtime.onnx_check` checks the result.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..nn.outputs import flatten_output
from .export_util import compare_outputs, need, one_line, quiet

PROTOBUF_LIMIT = 2**31  # bytes in one serialized protobuf message, so in one ONNX file
DEFAULT_OPSET = 17  # every op used here exists there, and ONNX Runtime runs all of it


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
    need("onnx")
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
    with quiet(), torch.inference_mode(False), torch.enable_grad():
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
    raise RuntimeError(f"ONNX export failed: {one_line(first)}")


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
    need("onnx")
    need("onnxscript")  # the dynamo exporter: the TorchScript one writes a file per tensor
    model = _spell_out_same_padding(model)
    shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    with tempfile.TemporaryDirectory() as tmp:
        with quiet(), torch.inference_mode(False), torch.enable_grad():
            try:
                program = torch.onnx.export(
                    model, (example,), input_names=["x"], output_names=["y"], opset_version=opset,
                    dynamic_shapes=shapes, dynamo=True, verbose=False,
                )  # fmt: skip
                program.save(Path(tmp) / name, external_data=True)
            except Exception as e:  # noqa: BLE001 - reported on one line
                raise RuntimeError(f"ONNX export failed: {one_line(e)}") from None
        # A model whose tensors are all small keeps them inline: no weights file then.
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.stat().st_size}


def export_program(model: nn.Module, example: torch.Tensor, rtol: float = 1e-4) -> dict:
    """``torch.export.export`` the model and compare the exported program with eager.

    Returns
    -------
    dict
        ``{"ok", "max_abs_err", "rel_err", "leaves"}`` (``leaves``: each output leaf's relative
        error by its path; ``ok``: every leaf's is below ``rtol``), or
        ``{"ok": False, "error": "<one line>"}`` when export or the exported program fails.
    """
    try:
        with quiet(), torch.no_grad():
            program = torch.export.export(model, (example,))
            got = flatten_output(program.module()(example))
            expected = flatten_output(model(example))
    except Exception as e:  # noqa: BLE001 - report why, on one line
        return {"ok": False, "error": one_line(e)}
    err, rel, close, per_leaf = compare_outputs(
        [t.detach().cpu().numpy() for t in got.values()],
        [t.detach().cpu().numpy() for t in expected.values()],
        rtol,
        0.0,
        list(expected),
    )
    return {"ok": close, "max_abs_err": err, "rel_err": rel, "leaves": per_leaf}

"""Any model output as named tensor leaves: flattened, described, and recognised.

A model may return one tensor, or tensors nested in tuples, lists, dicts, namedtuples,
dataclasses (HuggingFace's ``ModelOutput`` among them) or plain objects holding tensors.
:func:`flatten_output` names every tensor by its path (``out``, ``aux``, ``[0].boxes``,
``features.0``; a bare tensor is ``output``) in the order the exporters flatten them: depth
first, sequences by position and dicts by insertion order, as ``torch.onnx`` and
``torch.export`` do. Anything else (ints, strings, None) is not a leaf and is ignored.

Two kinds of output are recognised by their structure, never by the model's name: class logits
(:func:`class_logits`: one 2-D floating leaf of shape (batch, classes > 1), what accuracy and
top-1 agreement need) and detections (:func:`detection_sets`: a mapping holding ``boxes`` (K×4)
and ``scores`` (K), a set whose size and order depend on the data, as torchvision's detectors
return per image). :mod:`decouple.nn.output_diff` compares two outputs with these.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping

import torch
import torch.utils._pytree as pytree
from torch import nn

ROOT = "output"  # the path of an output that is one bare tensor
MAX_DEPTH = 64  # deeper than any real output; a guard against self-referencing objects
_SCALARS = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device)


def _key_text(key) -> str:
    if isinstance(key, pytree.SequenceKey):
        return f"[{key.idx}]"
    if isinstance(key, pytree.MappingKey):
        return str(key.key)
    if isinstance(key, pytree.GetAttrKey):
        return key.name
    return str(key)


def _join(prefix: str, key: str) -> str:
    if key.startswith("[") or not prefix:
        return prefix + key
    return f"{prefix}.{key}"


def _pytree_children(obj) -> list[tuple[str, object]] | None:
    """One level of torch's pytree flattening, as ``torch.export`` walks outputs: tuple, list,
    dict, OrderedDict, namedtuple, deque, the structseqs of ``torch.max`` & co, and any type a
    library registered. None for a type pytree does not know."""
    try:
        node = pytree.SUPPORTED_NODES.get(pytree._get_node_type(obj))
    except AttributeError:  # pytree's internals moved: the generic walk still holds
        return None
    if node is None:
        return None
    if node.flatten_with_keys_fn is not None:
        return [(_key_text(k), child) for k, child in node.flatten_with_keys_fn(obj)[0]]
    return [(f"[{i}]", child) for i, child in enumerate(node.flatten_fn(obj)[0])]


def _children(obj) -> list[tuple[str, object]]:
    """The named children of one node of an output; none for a leaf or a non-container."""
    if isinstance(obj, (*_SCALARS, torch.Tensor, nn.Module, type)) or callable(obj):
        return []
    known = _pytree_children(obj)
    if known is not None:
        return known
    if isinstance(obj, Mapping):  # dict subclasses pytree does not know, e.g. ModelOutput
        return [(str(k), v) for k, v in obj.items()]
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return [(f, getattr(obj, f)) for f in obj._fields]
    if isinstance(obj, (list, tuple)):
        return [(f"[{i}]", v) for i, v in enumerate(obj)]
    if dataclasses.is_dataclass(obj):
        return [(f.name, getattr(obj, f.name, None)) for f in dataclasses.fields(obj)]
    if hasattr(obj, "__dict__"):  # an object holding tensors as attributes
        return [(k, v) for k, v in vars(obj).items() if not k.startswith("_")]
    return []


def _nodes(obj, path: str = "", depth: int = 0, active: set | None = None) -> Iterator:
    """Every node of an output with its path, depth first (containers before their children)."""
    yield path, obj
    active = set() if active is None else active
    if isinstance(obj, torch.Tensor) or id(obj) in active:  # a leaf, or a cycle back up
        return
    kids = _children(obj)
    if kids and depth >= MAX_DEPTH:
        raise ValueError(f"the model's output is nested more than {MAX_DEPTH} levels deep")
    active.add(id(obj))
    for key, child in kids:
        yield from _nodes(child, _join(path, key), depth + 1, active)
    active.discard(id(obj))


def flatten_output(out, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a model output, by path, in the order the exporters flatten them.

    Parameters
    ----------
    out : object
        What a model returned: a tensor, or any nesting of sequences, mappings, namedtuples,
        dataclasses and objects with attributes.
    prefix : str
        Put before every path (``"backbone"`` gives ``backbone.0``, and ``backbone`` for a bare
        tensor).

    Returns
    -------
    dict of str to torch.Tensor
        ``{"output": out}`` for a bare tensor; otherwise paths such as ``out``, ``[0].boxes``,
        ``features.0``. Empty when the output holds no tensor.

    Examples
    --------
    >>> x = torch.zeros(1)
    >>> list(flatten_output(({"out": x, "n": 3}, [x, None])))
    ['[0].out', '[1][0]']
    """
    leaves: dict[str, torch.Tensor] = {}
    for path, node in _nodes(out, prefix):
        if isinstance(node, torch.Tensor):
            name = path or ROOT
            n = 2
            while name in leaves:  # keys whose text collides ({"a.b": x, "a": {"b": y}})
                name, n = f"{path or ROOT}#{n}", n + 1
            leaves[name] = node
    return leaves


def class_logits(out) -> torch.Tensor | None:
    """The output's class logits, or None: logits are a single 2-D floating leaf (batch,
    classes > 1). Accuracy, top-1 agreement and ``--max-change`` apply only to them."""
    leaves = list(flatten_output(out).values())
    if len(leaves) != 1:
        return None
    t = leaves[0]
    return t if t.dim() == 2 and t.is_floating_point() and t.shape[1] > 1 else None


def describe_output(out) -> str:
    """What a model returned, in a few words, for messages: ``a Tensor of shape (1, 10)``,
    ``an OrderedDict of 2 tensors (out, aux)``, ``a str, with no tensor``."""
    kind = type(out).__name__
    article = "an" if kind[:1].lower() in "aeiou" else "a"
    if isinstance(out, torch.Tensor):
        return f"{article} {kind} of shape {tuple(out.shape)}"
    leaves = list(flatten_output(out))
    if not leaves:
        return f"{article} {kind}, with no tensor"
    return f"{article} {kind} of {count_leaves(leaves)}"


def count_leaves(paths: list[str], nouns: tuple[str, str] = ("tensor", "tensors"), show: int = 6):
    """``2 tensors (out, aux)``; past ``show`` paths, the first ones and how many more."""
    shown = ", ".join(paths[:show]) + (
        f", ... {len(paths) - show} more" if len(paths) > show else ""
    )
    return f"{len(paths)} {nouns[len(paths) != 1]} ({shown})"


def is_detections(node) -> bool:
    """A mapping holding ``boxes`` (K×4) and ``scores`` (K): one image's detections."""
    if not isinstance(node, Mapping):
        return False
    boxes, scores = node.get("boxes"), node.get("scores")
    return (
        isinstance(boxes, torch.Tensor)
        and isinstance(scores, torch.Tensor)
        and boxes.dim() == 2
        and boxes.shape[1] == 4
        and scores.shape == boxes.shape[:1]
    )


def detection_sets(out, prefix: str = "") -> dict[str, Mapping]:
    """Every set of detections in an output, by path (``[0]``, ``[1]``, ... for a detector's
    list of per-image dicts; ``""`` when the output itself is one)."""
    return {path: node for path, node in _nodes(out, prefix) if is_detections(node)}


def under(path: str, parent: str) -> bool:
    """Whether the leaf at ``path`` lies inside the node at ``parent``."""
    return not parent or path == parent or path.startswith((parent + ".", parent + "["))


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every box of ``a`` (Ka×4) with every box of ``b`` (Kb×4), corners (x1, y1, x2, y2)."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    low = torch.maximum(a[:, None, :2], b[None, :, :2])
    high = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (high - low).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def match_detections(a: Mapping, b: Mapping, iou: float = 0.5) -> list[float]:
    """Match two sets of detections; the absolute score difference of every matched pair.

    Greedy, as detection benchmarks match: the boxes of ``a`` in descending score each take the
    unmatched box of ``b`` with the same label (when both have ``labels``) and the highest IoU,
    if that IoU is at least ``iou``.
    """
    boxes_a, boxes_b = a["boxes"].detach().double().cpu(), b["boxes"].detach().double().cpu()
    if not len(boxes_a) or not len(boxes_b):
        return []
    ious = box_iou(boxes_a, boxes_b)
    la, lb = a.get("labels"), b.get("labels")
    if isinstance(la, torch.Tensor) and isinstance(lb, torch.Tensor):
        ious[la.cpu()[:, None] != lb.cpu()[None, :]] = -1.0
    sa, sb = a["scores"].detach().double().cpu(), b["scores"].detach().double().cpu()
    free = torch.ones(len(boxes_b), dtype=torch.bool)
    diffs = []
    for i in sa.argsort(descending=True).tolist():
        row = ious[i].masked_fill(~free, -1.0)
        j = int(row.argmax())
        if row[j] >= iou:
            free[j] = False
            diffs.append(abs(float(sa[i] - sb[j])))
    return diffs


@contextlib.contextmanager
def captured_output(model: nn.Module, name: str) -> Iterator[list]:
    """Hold what the submodule ``name`` of ``model`` returns while the block runs (a list, empty
    when ``model`` has no such child or the forward pass does not reach it)."""
    got: list = []
    child = getattr(model, name, None)
    if not isinstance(child, nn.Module):
        yield got
        return
    handle = child.register_forward_hook(lambda m, i, o: got.append(o))
    try:
        yield got
    finally:
        handle.remove()

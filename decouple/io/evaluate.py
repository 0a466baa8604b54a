"""Accuracy of a classifier on a labelled set of images: top-1, top-5 and mean cross-entropy;
of two side by side, with the paired interval of the top-1 change.

Only class logits have an accuracy: any other output is refused with one line.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F

from ..nn import shards
from ..nn.outputs import class_logits, describe_output
from ..nn.progress import progress_bar
from .paired_change import paired_change


@torch.no_grad()
def evaluate_batches(
    model: nn.Module,
    batches: Iterable,
    device: str | torch.device = "cpu",
    progress: bool = False,
    total: int | None = None,
) -> dict:
    """Evaluate ``model`` (put in eval mode) on mini-batches of ``(images, labels)``.

    Returns
    -------
    dict
        ``top1`` and ``top5`` as fractions, ``loss`` (mean cross-entropy) and ``n``.

    Raises
    ------
    ValueError
        The model's output is not class logits (:func:`decouple.nn.outputs.class_logits`: one
        (batch, classes) tensor, wherever it is nested), e.g. a segmentation or a detector.
    """
    return _score([model], batches, device, progress, total)[0][0]


@torch.no_grad()
def compare_batches(
    original: nn.Module,
    model: nn.Module,
    batches: Iterable,
    device: str | torch.device = "cpu",
    progress: bool = False,
    total: int | None = None,
) -> dict:
    """:func:`evaluate_batches` of both models in one pass over the images (each batch read
    once), and the top-1 change with its paired interval
    (:func:`~decouple.io.paired_change.paired_change`).

    Returns
    -------
    dict
        ``before`` and ``after`` as :func:`evaluate_batches` gives them, and ``paired``
        (:class:`~decouple.io.paired_change.PairedChange` as a dict).
    """
    (before, after), fixed, broken = _score([original, model], batches, device, progress, total)
    paired = paired_change(before["n"], fixed, broken)
    return {"before": before, "after": after, "paired": paired.to_dict()}


def _score(models, batches, device, progress, total) -> tuple[list[dict], int, int]:
    """Each model's top-1, top-5, loss and ``n``; with two models, the images only the second
    gets right (top-1) and those only the first does."""
    for m in models:
        m.eval()
    k = len(models)
    correct1, correct5, loss = [0] * k, [0] * k, [0.0] * k
    n = fixed = broken = 0
    if shards.world()[1] > 1:  # under torchrun: this process's batches, counts summed below
        batches, total = shards.my_items(batches), None
    for x, y in progress_bar(batches, desc="evaluate", total=total, enabled=progress, unit="batch"):
        x, y = x.to(device), torch.as_tensor(y).to(device)
        if len(x) != len(y):
            raise ValueError(f"need as many labels as images; got {len(x)} and {len(y)}")
        right = []
        for i, m in enumerate(models):
            out = m(x)
            logits = class_logits(out)
            if logits is None:
                raise ValueError(
                    "accuracy needs a classifier, whose output is class logits (batch, classes); "
                    f"the model returns {describe_output(out)}"
                )
            logits = logits.float()
            loss[i] += float(F.cross_entropy(logits, y, reduction="sum"))
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            right.append(top[:, 0] == y)
            correct1[i] += int(right[-1].sum())
            correct5[i] += int((top == y[:, None]).any(dim=1).sum())
        if k == 2:
            fixed += int((right[1] & ~right[0]).sum())
            broken += int((right[0] & ~right[1]).sum())
        n += len(x)
    summed = shards.all_sum(*correct1, *correct5, *loss, n, fixed, broken)
    n, fixed, broken = (int(v) for v in summed[3 * k :])
    if n == 0:
        raise ValueError("no images to evaluate on")
    scores = [
        {"top1": int(summed[i]) / n, "top5": int(summed[k + i]) / n,
         "loss": float(summed[2 * k + i]) / n, "n": n}
        for i in range(k)
    ]  # fmt: skip
    return scores, fixed, broken


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict:
    """:func:`evaluate_batches` on ``images`` ``(n, C, H, W)`` and their ``labels``, in memory."""
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(
            f"need as many labels as images, at least one; got {len(images)} and {len(labels)}"
        )
    starts = range(0, len(images), batch_size)
    pairs = ((images[i : i + batch_size], labels[i : i + batch_size]) for i in starts)
    return evaluate_batches(model, pairs, device, progress, total=len(starts))


@torch.no_grad()
def evaluate_set(
    model: nn.Module,
    data,
    mean=None,
    std=None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict:
    """:func:`evaluate` on an :class:`~decouple.io.images.ImageSet`, preprocessing batch by batch."""
    if data.labels is None:
        raise ValueError(f"{data.name} has no labels")
    totals = {"top1": 0.0, "top5": 0.0, "loss": 0.0}
    batches = range(0, len(data), batch_size)
    for i in progress_bar(batches, desc="evaluate", enabled=progress, unit="batch"):
        x = data.as_float(mean, std, i, i + batch_size)
        part = evaluate(model, x, data.labels[i : i + batch_size], batch_size, device)
        for k in totals:
            totals[k] += part[k] * part["n"]
    n = len(data)
    return {**{k: v / n for k, v in totals.items()}, "n": n}

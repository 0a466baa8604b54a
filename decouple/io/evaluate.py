"""Accuracy of a classifier on a labelled set of images: top-1, top-5 and mean cross-entropy.

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
    model.eval()
    correct1 = correct5 = n = 0
    loss = 0.0
    if shards.world()[1] > 1:  # under torchrun: this process's batches, counts summed below
        batches, total = shards.my_items(batches), None
    for x, y in progress_bar(batches, desc="evaluate", total=total, enabled=progress, unit="batch"):
        x, y = x.to(device), torch.as_tensor(y).to(device)
        if len(x) != len(y):
            raise ValueError(f"need as many labels as images; got {len(x)} and {len(y)}")
        out = model(x)
        logits = class_logits(out)
        if logits is None:
            raise ValueError(
                "accuracy needs a classifier, whose output is class logits (batch, classes); "
                f"the model returns {describe_output(out)}"
            )
        logits = logits.float()
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += int((top[:, 0] == y).sum())
        correct5 += int((top == y[:, None]).any(dim=1).sum())
        n += len(x)
    correct1, correct5, loss, n = shards.all_sum(correct1, correct5, loss, n)
    correct1, correct5, n = int(correct1), int(correct5), int(n)
    if n == 0:
        raise ValueError("no images to evaluate on")
    return {"top1": correct1 / n, "top5": correct5 / n, "loss": loss / n, "n": n}


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

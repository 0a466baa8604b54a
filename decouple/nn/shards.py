"""Work split over processes with ``torch.distributed`` (launched by ``torchrun``).

Each process streams its share of the images; sums (moments, sensitivities, counts of correct
predictions) are added up across processes, so every process plans and refits from the same
totals and reaches the same model; process 0 times what is timed and writes the outputs.

Shares go by mini-batch: batch ``k`` of a set belongs to process ``k mod world size``, and every
image keeps its index in the whole set, so whatever depends on an image's index (held-out
images, the pixels its moments read, its sensitivity probes) is the same however the set is
split. Without a process group (a plain run) every function here is the identity.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

T = TypeVar("T")

_ALONE: ContextVar[bool] = ContextVar("decouple_alone", default=False)


def world() -> tuple[int, int]:
    """``(rank, world size)`` of this process; ``(0, 1)`` without a process group (or inside
    :func:`alone`)."""
    if _ALONE.get() or not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    """Whether this process reports and writes (rank 0, or the only process)."""
    return dist.get_rank() == 0 if dist.is_available() and dist.is_initialized() else True


def mine(k: int) -> bool:
    """Whether mini-batch number ``k`` of a set is this process's to read."""
    rank, size = world()
    return k % size == rank


@contextmanager
def alone() -> Iterator[None]:
    """Work on without the other processes (process 0's report, timed on its own): no share,
    no sum, no broadcast inside."""
    token = _ALONE.set(True)
    try:
        yield
    finally:
        _ALONE.reset(token)


def _reduce_device() -> torch.device:
    # NCCL adds up tensors on this process's GPU only; gloo on the CPU
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum_(*tensors: torch.Tensor) -> None:
    """Replace each tensor by its sum over all processes, in place."""
    if world()[1] == 1:
        return
    device = _reduce_device()
    for t in tensors:
        if t.device == device:
            dist.all_reduce(t)
        else:
            moved = t.to(device)
            dist.all_reduce(moved)
            t.copy_(moved)


def all_sum(*values: float) -> list[float]:
    """Numbers summed over all processes (float64)."""
    if world()[1] == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    all_sum_(t)
    return t.tolist()


def from_main(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` run by process 0 alone, its result handed to every process:
    timings decide plans, and one machine's noise must decide them the same everywhere."""
    if world()[1] == 1:
        return fn(*args, **kwargs)
    box = [fn(*args, **kwargs) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _sequential(loader: DataLoader) -> bool:
    """A loader whose batch ``k`` holds images ``k·b … k·b + b − 1`` of its dataset."""
    sampler = loader.batch_sampler
    return (
        isinstance(sampler, BatchSampler)
        and isinstance(sampler.sampler, SequentialSampler)
        and not sampler.drop_last
        and loader.batch_size is not None
    )


def my_loader(loader: DataLoader) -> tuple[list[int], DataLoader] | None:
    """This process's batches of a sequential ``loader``: the index of each one's first image
    and a loader that reads only them (another process's images are never decoded); None where
    ``loader`` is not sequential."""
    if not (isinstance(loader, DataLoader) and _sequential(loader)):
        return None
    n, b = len(loader.dataset), loader.batch_size
    starts = [s for k, s in enumerate(range(0, n, b)) if mine(k)]
    batches = [list(range(s, min(s + b, n))) for s in starts]
    sub = DataLoader(
        loader.dataset,
        batch_sampler=batches,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        persistent_workers=loader.persistent_workers,
    )
    return starts, sub


def my_items(items: Iterable[T]) -> Iterator[T]:
    """This process's items (mini-batches) of ``items``, in order."""
    if world()[1] == 1:
        yield from items
        return
    mine_only = my_loader(items) if isinstance(items, DataLoader) else None
    if mine_only is not None:
        yield from mine_only[1]
        return
    for k, item in enumerate(items):
        if mine(k):
            yield item


@contextmanager
def process_group(device: str = "cpu") -> Iterator[str]:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment):
    gloo on the CPU, NCCL on GPUs, each process on the GPU of its ``LOCAL_RANK``. Yields the
    device this process works on; a plain run (or a group already up) changes nothing."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1 or not dist.is_available() or dist.is_initialized():
        yield device
        return
    cuda = str(device).startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    # Processes wait for each other in every sum and at the end, while process 0 may time layers
    # or write for long: a wait of hours, not torch's default 30 minutes, counts as hung.
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=12))
    try:
        yield device
        # Leave together: a process that tears its connections down while another still works
        # can abort it. (After a failure no wait: torchrun stops the others.)
        dist.barrier()
    finally:
        dist.destroy_process_group()

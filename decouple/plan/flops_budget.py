"""``--target-flops``: per-layer ranks so that the whole model keeps a fraction of its FLOPs."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..nn.stopwatch import stage
from ..surgery.config import DecoupleConfig
from ..surgery.methods import FactorCache
from .allocate import MIN_SAVING, Allocation, allocate
from .options import rank_options

if TYPE_CHECKING:
    pass


def plan_ranks(
    model: nn.Module,
    config: DecoupleConfig,
    input_shape: tuple[int, ...],
    target_flops: float,
    criterion: str = "energy",
    calib_images: torch.Tensor | Iterable | None = None,
    min_saving: float = MIN_SAVING,
    ridge: float = 1e-4,
    cache: FactorCache | None = None,
    progress: bool = False,
    prune: bool = False,
    baseline_flops: int | None = None,
) -> Allocation:
    """Per-layer ranks for ``model`` so that its FLOPs are at most ``target_flops`` of today's.

    ``target_flops`` is a fraction of the whole model's FLOPs as ``FlopCounterMode`` counts them
    for one input of ``input_shape``; layers not decoupled count at their full cost.
    ``progress`` shows a bar over the layers being priced; ``prune`` also offers channel
    pruning of chains (:mod:`decouple.plan.prune_options`; a refit must follow).
    ``baseline_flops``: what the fraction is of, when not the model's own FLOPs (``compress_``
    passes the count from before it fused 1×1 pairs, so the fusion's saving counts).
    """
    if not 0 < target_flops <= 1:
        raise ValueError(f"target_flops must be a fraction in (0, 1]; got {target_flops!r}")
    options, total, layers_flops, units = rank_options(
        model,
        config,
        input_shape,
        criterion,
        calib_images,
        min_saving,
        ridge,
        cache,
        progress,
        prune,
    )
    with stage("allocation"):
        plan = allocate(
            options,
            total - layers_flops,
            int(target_flops * (baseline_flops or total)),
            units=units,
        )
    plan.criterion = criterion
    return plan

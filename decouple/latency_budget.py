"""Rank allocation under a latency budget, from per-layer latency tables measured on the target.

``--target-flops`` prices every option by its FLOPs; ``--target-latency`` prices the same options
(same ranks, same energy or data losses) by their measured time instead: for each decouplable
layer, the original conv and every candidate rank in every realization are timed on the layer's
real input, in the target runtime, at the target batch size. A rank's cost is its fastest
realization's time; a rank that does not save ``min_saving`` of the layer's time is not offered,
so a layer nothing speeds up stays exact ("kept: not faster"). The same greedy allocator then
spends the budget.

The model's time outside these layers is taken as its measured latency minus the layers' isolated
times; isolated times do not add up exactly to a whole run, so the planned latency is an estimate
and the report always measures the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocate import MIN_SAVING, Allocation, Option, allocate
from .compress import method_and_order, rank_options
from .config import DecoupleConfig
from .latency import LatencyConfig, capture_inputs, measure
from .methods import FactorCache
from .realize import ORIGINAL, realizations, time_candidates


@dataclass
class LatencyPlan:
    """The allocation, the realization of every chosen rank, and the table it was priced from."""

    allocation: Allocation
    realizations: dict[str, str]
    model_ms: float
    table: dict[str, dict[str, float]] = field(default_factory=dict)  # layer -> {"T=2 split": ms}

    def to_dict(self) -> dict:
        a = self.allocation
        return {
            "criterion": a.criterion,
            "model_ms": self.model_ms,
            "target_ms": a.target_flops / 1e6,
            "planned_ms": a.total_flops / 1e6,
            "reached": a.total_flops <= a.target_flops,
            "ranks": a.ranks(),
            "realizations": self.realizations,
            "reasons": a.reasons,
            "table_ms": self.table,
        }


def plan_latency(
    model: nn.Module,
    config: DecoupleConfig,
    input_shape: tuple[int, ...],
    target_latency: float,
    latency: LatencyConfig | None = None,
    criterion: str = "energy",
    calib_images: torch.Tensor | None = None,
    min_saving: float = MIN_SAVING,
    ridge: float = 1e-4,
    cache: FactorCache | None = None,
    progress: bool = False,
) -> LatencyPlan:
    """Per-layer ranks and realizations so the model runs in ``target_latency`` of today's time.

    Parameters
    ----------
    model : nn.Module
        In eval mode, BN already folded if it is to be; on ``latency.device``.
    config : DecoupleConfig
        Methods, orders and ``"skip"`` overrides (its rank/energy are ignored).
    target_latency : float
        Fraction of the model's measured latency, in (0, 1].
    latency : LatencyConfig
        Runtime, batch, device and timing effort.
    criterion, calib_images, min_saving, ridge, cache
        As :func:`decouple.compress.plan_ranks`.
    """
    if not 0 < target_latency <= 1:
        raise ValueError(f"target_latency must be a fraction in (0, 1]; got {target_latency!r}")
    latency = latency or LatencyConfig()
    cache = cache if cache is not None else FactorCache()
    flops_options, _, _ = rank_options(
        model, config, input_shape, criterion, calib_images, min_saving, ridge, cache
    )
    example = latency.example(input_shape, next(model.parameters()).dtype)
    lat = (latency.runtime, latency.layer_rounds, latency.layer_min_run_time, latency.threads)
    model_ms = measure(
        model, example, latency.runtime, latency.min_run_time, latency.threads
    ).median_ms
    inputs = capture_inputs(model, list(flops_options), example)
    options, table, best_real, layers_ns = {}, {}, {}, 0
    for name, opts in tqdm(
        flops_options.items(), desc="timing layers", disable=not progress, leave=False
    ):
        conv = model.get_submodule(name)
        method, order = method_and_order(config, name)
        candidates = {ORIGINAL: conv}
        for o in opts:
            if o.rank == 0:
                continue
            layer = cache.factor(conv, method, o.rank, None, order, config.factor_options()).layer
            for real, module in realizations(layer).items():
                candidates[f"T={o.rank} {real}"] = module
        times = time_candidates(candidates, inputs[name], *lat)
        table[name] = times
        original_ns = int(times[ORIGINAL] * 1e6)
        layers_ns += original_ns
        options[name] = [Option(0, original_ns, 0.0)]
        for o in opts:
            if o.rank == 0:
                continue
            mine = {k: v for k, v in times.items() if k.startswith(f"T={o.rank} ")}
            key = min(mine, key=mine.get)
            ns = int(mine[key] * 1e6)
            if ns <= (1 - min_saving) * original_ns:
                options[name].append(Option(o.rank, ns, o.loss))
                best_real[(name, o.rank)] = key.split(" ", 1)[1]
    model_ns = int(model_ms * 1e6)
    plan = allocate(options, max(model_ns - layers_ns, 0), int(target_latency * model_ns), "ns")
    plan.criterion = criterion
    chosen = {n: best_real[(n, o.rank)] for n, o in plan.choice.items() if o.rank}
    return LatencyPlan(plan, chosen, model_ms, table)

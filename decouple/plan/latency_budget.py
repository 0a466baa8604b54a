"""Rank allocation under a latency budget, from per-layer latency tables measured on the target.

``--target-flops`` prices every option by its FLOPs; ``--target-latency`` prices the same options
(same ranks, same energy or data losses) by their measured time instead: for each decouplable
layer, the original conv and every candidate rank in every realization are timed on the layer's
real input, in the target runtime, at the target batch size. A rank's cost is its fastest
realization's time; a rank that does not save ``min_saving`` of the layer's time is not offered,
so a layer nothing speeds up stays exact ("kept: not faster"). The same greedy allocator then
spends the budget.

The model's time outside these layers is taken as its measured latency minus the layers' isolated
times. Isolated times do not add up exactly to a whole run (a layer alone pays layout conversions
and cache misses that a chain of layers shares), so the plan is then closed on the clock: the
planned model is built and timed whole, the budget handed to the allocator is moved to where
the plans measured so far say the target lies, and the allocation is redone, a few times at
most. The plan kept is the one of least loss among those measured within the budget, else the
fastest measured, else (when even that is no faster than the original model) no change at all.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from ..nn.decoupled import DecoupledConv2d
from ..runtime.latency import LatencyConfig, capture_inputs, compare, measure
from ..runtime.realize import ORIGINAL, realizations, time_candidates
from ..surgery.config import DecoupleConfig
from ..surgery.methods import FactorCache
from ..surgery.rewrite import decouple_with_fold_info
from .allocate import MIN_SAVING, Allocation, Option, allocate
from .options import allocated_config, method_and_order, rank_options


@dataclass
class LatencyPlan:
    """The allocation, the realization of every chosen rank, the table it was priced from, and
    the whole-model measurements that closed the plan on the clock."""

    allocation: Allocation
    realizations: dict[str, str]
    model_ms: float
    table: dict[str, dict[str, float]] = field(default_factory=dict)  # layer -> {"T=2 split": ms}
    target_ms: float = 0.0
    measured_ms: float = 0.0
    steps: list[dict] = field(default_factory=list)  # budget, planned and measured ms per try

    def to_dict(self) -> dict:
        a = self.allocation
        return {
            "criterion": a.criterion,
            "model_ms": self.model_ms,
            "target_ms": self.target_ms,
            "planned_ms": a.total_flops / 1e6,
            "measured_ms": self.measured_ms,
            "reached": self.measured_ms <= self.target_ms,
            "steps": self.steps,
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
    calib_images: torch.Tensor | Iterable | None = None,
    min_saving: float = MIN_SAVING,
    ridge: float = 1e-4,
    cache: FactorCache | None = None,
    progress: bool = False,
    refine: int = 3,
    tolerance: float = 0.1,
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
        As :func:`decouple.plan.flops_budget.plan_ranks`.
    refine : int
        Re-allocations at most after the first plan, each from the last whole-model measurement.
    tolerance : float
        Stop once a plan measures within ``[1 - tolerance, 1]`` of the target.
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
    fixed, target_ms = max(model_ns - layers_ns, 0), target_latency * model_ms
    # (budget, measured ms) of every plan timed whole. The original model is one for free: the
    # budget that buys every layer exact measures as the model itself.
    points = [(model_ns, model_ms)]
    budget, steps, best, seen = int(target_latency * model_ns), [], None, set()
    for _ in range(refine + 1):
        plan, budget = _new_plan(options, fixed, budget, points, seen)
        if plan is None:  # every budget left to try buys a plan measured already
            break
        plan.criterion = criterion
        seen.add(_ranks_key(plan))
        chosen = {n: best_real[(n, o.rank)] for n, o in plan.choice.items() if o.rank}
        ms = _measure_plan(model, config, plan.ranks(), chosen, cache, example, latency, model_ms)
        steps.append({"budget_ms": budget / 1e6, "planned_ms": plan.total_flops / 1e6,
                      "measured_ms": ms})  # fmt: skip
        points.append((budget, ms))
        fits = ms <= target_ms
        loss = sum(o.loss for o in plan.choice.values())
        key = (not fits, loss if fits else ms)  # within budget and least loss; else fastest
        if best is None or key < best[0]:
            best = (key, plan, chosen, ms)
        if fits and ms >= (1 - tolerance) * target_ms:
            break
        budget = _next_budget(points, target_ms * (1 - tolerance / 2))
    (missed, _), plan, chosen, ms = best
    if missed and chosen and ms >= model_ms:
        # Nothing reached the budget and the fastest plan is no faster than the model itself
        # (an overhead-bound model: every decoupled layer adds a call): change nothing.
        plan = _unchanged(options, fixed, budget, criterion)
        chosen, ms = {}, model_ms
    return LatencyPlan(plan, chosen, model_ms, table, target_ms, ms, steps)


def _ranks_key(plan: Allocation) -> tuple:
    return tuple(sorted(plan.ranks().items()))


def _new_plan(options, fixed, budget, points, seen, tries: int = 8):
    """The allocation at ``budget``, or, if it was measured already, at a budget moved halfway
    toward the nearest larger budget measured; ``(None, budget)`` if every try is known."""
    for _ in range(tries):
        plan = allocate(options, fixed, budget, "ns")
        if _ranks_key(plan) not in seen:
            return plan, budget
        above = [b for b, _ in points if b > budget + 1]
        if not above:
            break
        budget = (budget + min(above)) // 2
    return None, budget


def _next_budget(points: list[tuple[int, float]], aim_ms: float) -> int:
    """The budget (table ns) whose plan should measure ``aim_ms``, from the plans timed so far.

    The table's scale is off by an unknown factor (layers alone pay conversions a chain of
    layers shares), but budget and measured time still rise together: interpolate between the
    largest budget measured under the aim and the smallest measured over it. The fixed part of
    the model does not scale, so a plain rescale by measured/planned overshoots; it is used only
    when every plan so far landed on one side and no line can be drawn.
    """
    under = [p for p in points if p[1] <= aim_ms]
    over = [p for p in points if p[1] > aim_ms]
    if under and over:
        (b0, m0), (b1, m1) = max(under), min(over)
        if b1 > b0 and m1 > m0:
            return int(b0 + (aim_ms - m0) * (b1 - b0) / (m1 - m0))
        return (b0 + b1) // 2
    (b0, m0), (b1, m1) = sorted(points)[:2]  # all over the aim: the two cheapest plans
    if b1 > b0 and m1 > m0:
        return max(int(b0 - (m0 - aim_ms) * (b1 - b0) / (m1 - m0)), 0)
    return int(b0 * aim_ms / m0)


def _unchanged(options, fixed, budget, criterion) -> Allocation:
    """Every layer kept exact, because no plan measured faster than the original model."""
    choice = {n: opts[0] for n, opts in options.items()}
    reasons = dict.fromkeys(choice, "kept: no plan measured faster than the original model")
    return Allocation(choice, reasons, fixed, budget, criterion, unit="ns")


def _measure_plan(model, config, ranks, chosen, cache, example, latency, model_ms) -> float:
    """Whole-model latency (ms) of ``model`` decoupled at ``ranks`` in realizations ``chosen``,
    on the scale of ``model_ms``, the original's latency measured first."""
    twin = copy.deepcopy(model)
    decouple_with_fold_info(
        twin, allocated_config(replace(config, fold_bn=False), ranks), cache=cache
    )
    for name, real in chosen.items():
        layer = twin.get_submodule(name)
        if isinstance(layer, DecoupledConv2d):
            layer.set_realization(real)
    # Timed side by side with the original and given as the ratio times the model's latency: on
    # a noisy machine a ratio measured in one run holds where two latencies minutes apart do not.
    side = compare(model, twin, example, latency)
    return model_ms / side["speedup"]

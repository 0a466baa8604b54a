"""Rank allocation under a latency budget, from per-layer latency tables measured on the target.

``--target-flops`` prices every option by its FLOPs; ``--target-latency`` prices the same options
(same ranks, same energy or data losses) by their measured time instead: for each decouplable
layer, the original conv and every candidate rank in every realization are timed on the layer's
real input, in the target runtime, at the target batch size. A rank's cost is its fastest
realization's time; a rank that does not save ``min_saving`` of the layer's time is not offered,
so a layer nothing speeds up stays exact ("kept: not faster"). The same greedy allocator then
spends the budget. With ``LatencyConfig(layer_table="predicted")`` (and ``"auto"``, the default,
where there is a cost model) the table is priced by the runtime's cost model
(:mod:`decouple.runtime.cost_model`) instead of the clock: every candidate in every realization,
in seconds where timing them takes minutes; all that follows is the same.

The model's time outside these layers is taken as its measured latency minus the layers' isolated
times. Isolated times do not add up exactly to a whole run (a layer alone pays layout conversions
and cache misses that a chain of layers shares), so the plan is then closed on the clock: the
planned model is built and timed whole, the budget handed to the allocator is moved to where
the plans measured so far say the target lies, and the allocation is redone, a few times at
most. Then up to :data:`FLOPS_TRIES` plans allocated by FLOPs over the same options are timed
whole too (:mod:`decouple.plan.flops_pricing`). The plan kept is the one of least loss among those
measured within the budget (once more timed afresh, and dropped if it misses on that time:
:func:`~decouple.plan.latency_search.confirmed_pick`), else the fastest measured, else (when even
that is no faster than the original model) no change at all.

In ONNX Runtime the ranks and pruned widths on offer are multiples of its channel block (8 or
16, :func:`~decouple.runtime.cost_model.block_size`; more where ``rank_multiple`` asks): a layer
timed alone at any other count runs unblocked at full speed, but inside the model each such layer
pays reorders to and from the blocked layout of its neighbours, which the table cannot see
(``results/writeups/latency.md``, item 4, has what it changed).

With ``prune`` (calibration images and a refit to follow), the chains the FLOPs budget would
offer for channel pruning are on offer here too, each pruned width priced by the measured time of
its producer, mids and consumer at that width (:func:`timed_units`): on a MobileNetV2-style
network, where the 1×1 convs' low-rank forms add a call each, narrowing a chain is what runs faster.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..nn.progress import progress_bar
from ..nn.stopwatch import stage
from ..runtime.cost_model import CostModel, block_size
from ..runtime.latency import LatencyConfig, capture_inputs, measure
from ..runtime.realize import ORIGINAL, realizations, time_candidates
from ..surgery.config import DecoupleConfig
from ..surgery.methods import FactorCache
from .allocate import MIN_SAVING, Allocation, Option, allocate
from .flops_pricing import FlopsPricing
from .latency_search import confirmed_pick, new_plan, next_budget, ranks_key, unchanged_plan
from .options import rank_options
from .plan_timing import time_plan
from .prune_options import timed_units

MAX_PASSES = 4  # timing passes over the layer tables at most (see _stable_table)
NOISE = 0.03  # whole-model timings this close are a tie, decided by loss
# A plan measured within this fraction under the target ends the search. Every bit of time a plan
# runs under the target is rank, hence accuracy, given away: on ResNet-32 in ONNX Runtime at batch
# 32, with a 10 % band, a plan that ran 1.75x where 1.67x was asked lost 1.28 points; one at 1.64x
# lost 0.79 (results/latency_target.md as of commit 48371f5). The band is just wider than the
# timing noise, so a plan that lands in it can still be told from one over the target.
TOLERANCE = 0.04
REFINE = 4  # re-allocations at most after the first plan
# Realizations timed at every rank, per method with more than one (network decoupling: per order).
SCREEN_KEEP = {"nd": 2, "cp": 1}
# Plans allocated by FLOPs (over the options the table found faster) timed whole beside the
# table's own: the table prices each layer alone, which a whole run does not add up to, so its
# best plan at a speed need not be the most accurate one at that speed. Candidates only (the
# least loss within the target is kept), so they cost at most this many whole-model timings.
FLOPS_TRIES = 2


@dataclass
class LatencyPlan:
    """The allocation, the realization of every chosen rank, the table it was priced from, and
    the whole-model measurements that closed the plan on the clock."""

    allocation: Allocation
    realizations: dict[str, str]
    model_ms: float
    table: dict[str, dict[str, float]] = field(
        default_factory=dict
    )  # layer -> {"nd dw-pw T=2: split": ms}
    target_ms: float = 0.0
    measured_ms: float = 0.0
    steps: list[dict] = field(default_factory=list)  # budget, planned and measured ms per try
    table_passes: int = 1  # timing passes until the plan was stable
    rank_multiple: int = 1  # the ranks and pruned widths on offer were multiples of this
    priced: str = "time"  # how the plan kept was allocated: by the table's times, or by FLOPs
    layer_table: str = "measured"  # the table timed layer by layer, or predicted by a cost model
    retimed: list[dict] = field(default_factory=list)  # picked plans timed again: first, fresh ms

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
            "methods": a.methods(),
            "table_passes": self.table_passes,
            "rank_multiple": self.rank_multiple,
            "priced": self.priced,
            "layer_table": self.layer_table,
            "retimed": self.retimed,
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
    refine: int = REFINE,
    tolerance: float = TOLERANCE,
    noise: float = NOISE,
    prune: bool = False,
    flops_tries: int = FLOPS_TRIES,
    cost_model: CostModel | None = None,
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
    noise : float
        Whole-model times within this fraction of each other count as equal (see :func:`~decouple.plan.latency_search.pick`).
    prune : bool
        Also offer channel pruning of chains (a refit must follow), as the FLOPs budget does.
    flops_tries : int
        Plans allocated by FLOPs timed whole after the table's own (0: the table's alone).
    cost_model : CostModel, optional
        The runtime's cost model at ``latency``'s batch and threads, which prices the table
        where ``latency.layer_table`` is ``"predicted"`` (required then) or ``"auto"``.
    """
    if not 0 < target_latency <= 1:
        raise ValueError(f"target_latency must be a fraction in (0, 1]; got {target_latency!r}")
    latency = latency or LatencyConfig()
    predicted = latency.layer_table == "predicted" or (
        latency.layer_table == "auto" and cost_model is not None
    )
    if predicted and cost_model is None:
        raise ValueError("layer_table 'predicted' needs the runtime's cost model (cost_model=)")
    # The table's prices: each candidate timed alone, or the cost model's prediction of it (one
    # pass: a prediction does not change when asked again).
    timer = cost_model.time_candidates if predicted else time_candidates
    cache = cache if cache is not None else FactorCache()
    config = aligned(config, latency.runtime)
    flops_options, flops_total, flops_layers, flops_units = rank_options(
        model, config, input_shape, criterion, calib_images, min_saving, ridge, cache, progress,
        prune,
    )  # fmt: skip
    example = latency.example(input_shape, next(model.parameters()).dtype)
    lat = (latency.runtime, latency.layer_rounds, latency.layer_min_run_time, latency.threads)
    model_ms = measure(
        model, example, latency.runtime, latency.min_run_time, latency.threads
    ).median_ms
    mids = [m for u in flops_units for m in u.chain.mids]
    inputs = capture_inputs(model, [*flops_options, *mids], example)
    modules = {}  # layer -> {"<option label>: <realization>": module}
    for name, opts in flops_options.items():
        conv = model.get_submodule(name)
        layers = {
            o.label: cache.factor(conv, o.method, o.rank, None, o.order or config.order,
                                  config.factor_options()).layer
            for o in opts if o.rank
        }  # fmt: skip
        keep = {} if predicted else _screen_realizations(opts, layers, inputs[name], lat)
        candidates = {ORIGINAL: conv}
        for o in opts[1:]:
            for real, module in realizations(layers[o.label]).items():
                if real in keep.get((o.method, o.order), (real,)):
                    candidates[f"{o.label}: {real}"] = module
        modules[name] = candidates
    with stage("predicted tables" if predicted else "latency tables"):
        table, passes = _stable_table(
            modules, inputs, lat, flops_options, model_ms, target_latency, min_saving, progress,
            timer, 1 if predicted else MAX_PASSES,
        )  # fmt: skip
    options, best_real, layers_ns = {}, {}, 0
    for name, opts in flops_options.items():
        times = table[name]
        original_ns = int(times[ORIGINAL] * 1e6)
        layers_ns += original_ns
        options[name] = _timed_options(opts, times, min_saving)
        for o in options[name][1:]:
            best_real[(name, o.label)] = _fastest(times, o.label)[0]
    with stage("timing pruned widths"):
        units = timed_units(model, flops_units, inputs, lat, min_saving, timer)
    model_ns = int(model_ms * 1e6)
    fixed, target_ms = max(model_ns - layers_ns, 0), target_latency * model_ms
    steps, tried, seen, how, budget_of = [], [], set(), {}, {}

    def timed(plan: Allocation, budget_ms: float | None, priced: str) -> float:
        """``plan`` timed whole, and recorded as a step and a candidate."""
        plan.criterion = criterion
        seen.add(ranks_key(plan))
        chosen = {
            n: best_real[(n, o.label)] for n, o in plan.choice.items()
            if o.rank and o.method != "prune"
        }  # fmt: skip
        with stage("timing plans", announce=False):
            ms, chosen = time_plan(model, config, plan, chosen, cache, example, latency, model_ms)
        steps.append({"budget_ms": budget_ms, "planned_ms": plan.total_flops / 1e6,
                      "measured_ms": ms, "priced": priced})  # fmt: skip
        if budget_ms is not None:  # a plan of the table's: where it sits among ``points``
            budget_of[id(plan)] = round(budget_ms * 1e6)
        tried.append((ms, plan.loss, plan, chosen))
        how[id(plan)] = priced
        return ms

    def in_band(ms: float) -> bool:
        return (1 - tolerance) * target_ms <= ms <= target_ms

    # (budget, measured ms) of every plan timed whole. The original model is one for free: the
    # budget that buys every layer exact measures as the model itself.
    points = [(model_ns, model_ms)]
    budget = int(target_latency * model_ns)
    for _ in range(refine + 1):
        plan, budget = new_plan(options, fixed, budget, points, seen, units)
        if plan is None:  # every budget left to try buys a plan measured already
            break
        points.append((budget, ms := timed(plan, budget / 1e6, "time")))
        if in_band(ms):
            break
        budget = next_budget(points, target_ms * (1 - tolerance / 2))
    # Plans priced by FLOPs over the same options, timed whole beside those the table priced:
    # the first at the FLOPs whose plan the table prices where its own plans say the aim lies,
    # then moved on the FLOPs plans' own measurements.
    priced = FlopsPricing(
        flops_options, flops_units, flops_total - flops_layers, options, units, fixed
    )
    aim = target_ms * (1 - tolerance / 2)
    fpoints = [(flops_total, model_ms)]
    fbudget = priced.budget_for(next_budget(points, aim)) if flops_tries else 0
    for _ in range(flops_tries):
        plan = priced.plan(fbudget)
        if ranks_key(plan) in seen:
            break
        fpoints.append((priced.flops_of(plan), ms := timed(plan, None, "FLOPs")))
        if in_band(ms):
            break
        fbudget = next_budget(fpoints, aim)

    def retime(plan: Allocation, chosen: dict) -> tuple[float, dict]:
        with stage("timing plans", announce=False):
            ms, chosen = time_plan(model, config, plan, chosen, cache, example, latency, model_ms)
        b = budget_of.get(id(plan))  # a step on must aim by the fresh time, not the lucky one
        points[:] = [(pb, ms if pb == b else pm) for pb, pm in points]
        return ms, chosen

    def step_on() -> bool:
        """One more plan of the table's, aimed under the target by every time so far, and
        cheaper than every plan of the table's that missed it (``new_plan`` may move up)."""
        over = [pb for pb, pm in points if pm > target_ms]
        plan, b = new_plan(options, fixed, next_budget(points, aim), points, seen, units)
        if plan is None or any(b >= pb for pb in over):
            return False
        points.append((b, timed(plan, b / 1e6, "time")))
        return True

    missed, plan, chosen, ms, retimed = confirmed_pick(tried, target_ms, noise, retime, step_on)
    if missed and chosen and ms >= model_ms:
        # Nothing reached the budget and the fastest plan is no faster than the model itself
        # (an overhead-bound model: every decoupled layer adds a call): change nothing.
        plan = unchanged_plan(options, fixed, budget, criterion)
        chosen, ms = {}, model_ms
    return LatencyPlan(
        plan, chosen, model_ms, table, target_ms, ms, steps, passes, config.rank_multiple,
        how.get(id(plan), "time"), "predicted" if predicted else "measured", retimed,
    )  # fmt: skip


def aligned(config: DecoupleConfig, runtime: str) -> DecoupleConfig:
    """``config`` with ranks in multiples of the runtime's channel block as well as its own
    (ONNX Runtime only: the other runtimes have no blocked layout to leave)."""
    if runtime != "onnxruntime":
        return config
    return replace(config, rank_multiple=math.lcm(config.rank_multiple, block_size()))


def _fastest(times: dict[str, float], label: str) -> tuple[str, float]:
    """The fastest realization of option ``label`` in a layer's table, and its time (ms)."""
    mine = {k.removeprefix(f"{label}: "): v for k, v in times.items() if k.startswith(f"{label}: ")}
    real = min(mine, key=mine.get)
    return real, mine[real]


def _timed_options(opts: list[Option], times: dict[str, float], min_saving: float):
    """``opts`` re-priced in ns: each at its fastest realization, kept if it saves enough."""
    original_ns = int(times[ORIGINAL] * 1e6)
    out = [replace(opts[0], cost=original_ns)]
    for o in opts[1:]:
        ns = int(_fastest(times, o.label)[1] * 1e6)
        if ns <= (1 - min_saving) * original_ns:
            out.append(replace(o, cost=ns))
    return out


def _stable_table(
    modules, inputs, lat, flops_options, model_ms, target, min_saving, progress,
    timer=time_candidates, max_passes: int = MAX_PASSES,
):  # fmt: skip
    """Per-layer tables (ms) timed (by ``timer``) until the plan they give no longer changes.

    The rule: time every candidate once (``lat``'s interleaved rounds); then, while the last two
    tables' allocations at the target budget differ, time again the candidates still in play
    (the original and, per option, realizations within 20 % of its fastest) and keep every
    candidate's best time over the passes (noise on a CPU only ever adds time, so the best is
    the least disturbed, as in each pass's best median); at most ``max_passes`` passes. At
    batch 1 a layer takes microseconds and a slow spell during one pass can rank near-equal
    options either way; at larger batches the second pass agrees with the first and costs a
    fraction of it.
    """
    samples: dict[str, dict[str, list[float]]] = {n: {} for n in modules}
    table: dict[str, dict[str, float]] = {}
    last = None
    for p in range(max_passes):
        desc = f"timing layers (pass {p + 1})"
        for name in progress_bar(modules, desc=desc, enabled=progress, unit="layer"):
            todo = modules[name] if p == 0 else _in_play(modules[name], table[name])
            for k, v in timer(todo, inputs[name], *lat).items():
                samples[name].setdefault(k, []).append(v)
            table[name] = {k: min(v) for k, v in samples[name].items()}
        layers_ns = sum(int(t[ORIGINAL] * 1e6) for t in table.values())
        options = {n: _timed_options(o, table[n], min_saving) for n, o in flops_options.items()}
        fixed = max(int(model_ms * 1e6) - layers_ns, 0)
        key = ranks_key(allocate(options, fixed, int(target * model_ms * 1e6), "ns"))
        if key == last:
            return table, p + 1
        last = key
    return table, max_passes


def _screen_realizations(opts, layers, x, lat) -> dict[tuple[str, str], list[str]]:
    """Per network-decoupling order and for CP, the :data:`SCREEN_KEEP` realizations fastest at
    its middle rank: which graph runs a layer fastest depends on the runtime and the shapes far
    more than on the rank, and timing every realization of every rank (each one an ONNX export
    in ONNX Runtime) would multiply the table's cost by up to five."""
    keep = {}
    kinds = ((o.method, o.order) for o in opts if o.rank and o.method in SCREEN_KEEP)
    for kind in dict.fromkeys(kinds):
        mine = [o for o in opts if o.rank and (o.method, o.order) == kind]
        reals = realizations(layers[mine[len(mine) // 2].label])
        if len(mine) < 2 or len(reals) <= SCREEN_KEEP[kind[0]]:
            continue
        times = time_candidates(reals, x, *lat)
        keep[kind] = sorted(times, key=times.get)[: SCREEN_KEEP[kind[0]]]
    return keep


def _in_play(candidates: dict, times: dict[str, float]) -> dict:
    """The original and every option's realizations within 20 % of that option's fastest."""
    best: dict[str, float] = {}
    for k, v in times.items():
        opt = k.split(": ", 1)[0]
        best[opt] = min(best.get(opt, v), v)
    return {
        k: m for k, m in candidates.items()
        if k == ORIGINAL or times[k] <= 1.2 * best[k.split(": ", 1)[0]]
    }  # fmt: skip

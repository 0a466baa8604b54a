"""The whole product flow on one model: fold BN, choose ranks, decouple, calibrate, realize.

``compress_`` strings together :func:`~decouple.surgery.fold_batchnorm_`, a budget from
:mod:`decouple.plan` (when a FLOPs or latency target is given), :func:`~decouple.surgery.decouple_`,
:func:`~decouple.calibrate.calibrate_` (when calibration images are given; without them,
:func:`~decouple.calibrate.correct_biases_`) and
:mod:`decouple.runtime.realize` (when realizations are timed), and returns what each step did.
The CLI and the experiments both call it.
"""

from __future__ import annotations

import copy
import gc
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import replace

import torch
from torch import nn

from .calibrate.bn_bias import BiasCorrection, bn_input_means, correct_biases_
from .calibrate.head_distill import distill_head_
from .calibrate.layerwise import REFIT_MODES, calibrate_
from .calibrate.spill import release_memory
from .nn.flops import count_flops
from .nn.guards import check_module, type_error
from .nn.stopwatch import stage
from .nn.transaction import transaction
from .pipeline_result import CompressResult, TargetMissed, flops_missed, latency_missed
from .plan.allocate import MIN_SAVING
from .plan.flops_budget import plan_ranks
from .plan.latency_budget import plan_latency
from .plan.losses import probe_shapes
from .plan.options import allocated_config
from .predicted_speed import cost_model_for
from .runtime.latency import LatencyConfig
from .runtime.realize import (
    ORIGINAL,
    RealizationChoice,
    choose_realizations_,
    confirm_on_model_,
    realization_names,
)
from .surgery.bn_fold import fold_batchnorm_
from .surgery.chains import prune_chain_
from .surgery.config import DecoupleConfig
from .surgery.linear_fuse import find_linear_pairs, fuse_linear_pairs_
from .surgery.methods import FactorCache, is_factored, recipe_entry
from .surgery.rewrite import LayerRecord, decouplable_convs, decouple_with_fold_info, fused_record
from .surgery.sites import NO_RULE, check_sites, conv_sites

__all__ = ["CompressResult", "TargetMissed", "compress_"]

NOT_CALLED = "kept: never called by the forward pass (an auxiliary head in eval mode, or a layer whose parent reads its weights)"


def compress_(
    model: nn.Module,
    config: DecoupleConfig,
    input_shape: tuple[int, ...],
    target_flops: float | None = None,
    criterion: str | None = None,
    calib_images: torch.Tensor | Iterable | None = None,
    refit: str = "auto",
    ridge: float = 1e-4,
    min_saving: float = MIN_SAVING,
    progress: bool = False,
    cache: FactorCache | None = None,
    target_latency: float | None = None,
    latency: LatencyConfig | None = None,
    realize: bool = False,
    prune: bool = True,
    allow_miss: bool = True,
    bias_correction: bool = True,
    distill_head: bool = True,
) -> CompressResult:
    """Fold BN, optionally allocate ranks under a budget, decouple, optionally calibrate, optionally
    give every layer its fastest realization; in place.

    Parameters
    ----------
    model : nn.Module
        In eval mode. Changed in place.
    config : DecoupleConfig
        Order, BN folding and overrides; with ``target_flops`` its rank/energy are replaced by the
        allocation (``"skip"`` overrides still hold).
    input_shape : tuple of int
        One input's shape ``(C, H, W)``: FLOPs are counted for it.
    target_flops : float, optional
        Fraction of the model's FLOPs to keep, in (0, 1].
    criterion : {"energy", "data"}, optional
        Allocation criterion (default ``energy``); ``data`` needs ``calib_images``.
    calib_images : torch.Tensor or iterable, optional
        Unlabelled, preprocessed images for the data criterion and the refit: a tensor
        ``(n, C, H, W)`` or a source that gives the same batches in the same order on every pass
        (a ``DataLoader`` without shuffling). They stream through a batch at a time.
    refit : {"auto", "last", "alternating", "none"}
        Calibration refit mode (used only with ``calib_images``).
    cache : FactorCache, optional
        Reuse CP/Tucker factorizations across calls (e.g. a sweep over budgets on copies of one
        model); by default one cache lives for this call.
    target_latency : float, optional
        Instead of ``target_flops``: fraction of the model's measured latency to keep, in (0, 1];
        ranks and realizations come from per-layer latency tables (:mod:`decouple.plan.latency_budget`).
    latency : LatencyConfig, optional
        Runtime, batch and device of the timings (``target_latency`` and ``realize``).
    realize : bool
        After decoupling, time every layer's realizations and the conv it replaced on the model's
        real inputs and keep the fastest; a layer nothing beats gets its conv back, except under
        ``target_flops``, whose FLOPs plan holds
        (:func:`decouple.runtime.realize.choose_realizations_`); then check the choice on the whole
        model (:func:`decouple.runtime.realize.confirm_on_model_`). Implied by ``target_latency``.
    prune : bool, default True
        Under ``target_flops`` or ``target_latency``, with ``calib_images`` and a refit, also
        offer channel pruning of chains (a layer feeding a 1×1 conv or linear layer through
        channel-wise steps, not at the end of a residual branch; :mod:`decouple.surgery.chains`),
        priced by the same planner; the consumer is refit by calibration.
    allow_miss : bool, default True
        When the budget is out of reach, go on with the closest plan (the result says it was
        missed); False raises :class:`TargetMissed` as soon as the plan is known, with the
        model as it was.
    bias_correction : bool, default True
        Without ``calib_images``: add to every factored layer's bias the mean error its
        approximation makes, estimated from the model's own BatchNorm statistics
        (:mod:`decouple.calibrate.bn_bias`; data-free, one pass of noise). With images the
        refit corrects the bias instead.
    distill_head : bool, default True
        After calibration, fit a pruned chain in the network's head and every layer after it
        jointly to the original's outputs (:mod:`decouple.calibrate.head_distill`).

    Raises
    ------
    TypeError, ValueError
        As :func:`~decouple.surgery.decouple_` and the steps it runs; what can be checked is
        checked before the model changes, and on any failure the model is restored exactly.
    """
    check_module(model, "compress_")
    if not isinstance(config, DecoupleConfig):
        raise type_error("config", "a DecoupleConfig", config)
    if target_flops is not None and target_latency is not None:
        raise ValueError("give either target_flops or target_latency, not both")
    if calib_images is not None and refit not in REFIT_MODES:
        raise ValueError(f"refit mode must be one of {', '.join(REFIT_MODES)}; got {refit!r}")
    # No conv, or NaN weights: refused now rather than after folding and planning.
    check_sites(model, conv_sites(model, config), specs=False)
    # Calibration refits factored layers in place; copies of any already there undo it.
    with transaction(model, "compress_", save_data=is_factored):
        return _compress(
            model, config, input_shape, target_flops, criterion, calib_images, refit, ridge,
            min_saving, progress, cache, target_latency, latency, realize, prune, allow_miss,
            bias_correction, distill_head,
        )  # fmt: skip


def _compress(
    model, config, input_shape, target_flops, criterion, calib_images, refit, ridge, min_saving,
    progress, cache, target_latency, latency, realize, prune, allow_miss, bias_correction,
    distill_head,
) -> CompressResult:  # fmt: skip
    """:func:`compress_` once its inputs are checked, inside its transaction."""
    latency = latency or LatencyConfig()
    cache = cache if cache is not None else FactorCache()
    means, means_seconds = None, 0.0
    if bias_correction and calib_images is None:  # before folding: it reads the BatchNorms
        start = time.perf_counter()
        with stage("BatchNorm statistics"):
            means = bn_input_means(model, input_shape, seed=config.seed)
        means_seconds = time.perf_counter() - start
    fold_error = None
    folded: dict[str, str] = {}
    if config.fold_bn:
        with stage("BN folding"):
            result = fold_batchnorm_(model)
        folded, fold_error = result.folded, result.error
    fused, fused_away, baseline_flops = {}, {}, None
    if config.fold_bn and fold_error is None:
        with stage("fusing 1×1 pairs"):
            fused, fused_away, baseline_flops = _fuse_linear_(model, config, input_shape)
    plain = replace(config, fold_bn=False)
    reference = copy.deepcopy(model) if calib_images is not None else None
    allocation = lplan = None
    # Pruning needs the refit that calibration does after it: offered only when one follows.
    offer_prune = prune and calib_images is not None and refit != "none"
    if target_latency is not None:
        criterion = criterion or "energy"
        lplan = plan_latency(
            model, plain, input_shape, target_latency, latency, criterion, calib_images,
            min_saving, ridge, cache, progress, prune=offer_prune,
            cost_model=_table_model(latency),
        )  # fmt: skip
        allocation = lplan.allocation
        if not allow_miss and lplan.measured_ms > lplan.target_ms:
            raise latency_missed(lplan, target_latency)
    elif target_flops is not None:
        # Energy by default: with calibration it kept as much accuracy as the data criterion on
        # the CIFAR ResNets (results/README.md), at a fraction of the cost.
        criterion = criterion or "energy"
        allocation = plan_ranks(
            model, plain, input_shape, target_flops, criterion, calib_images, min_saving, ridge,
            cache, progress, prune=offer_prune,
            baseline_flops=baseline_flops,
        )  # fmt: skip
        if not allow_miss and allocation.total_flops > allocation.target_flops:
            raise flops_missed(allocation, target_flops)
    uncalled: set[str] = set()
    if allocation is not None:
        plain = allocated_config(plain, allocation.choice)
    else:  # a fixed rule: a layer its parent reads the weights of (never calls) must stay as it is
        names = decouplable_convs(model, plain)
        with stage("probing layers"):
            uncalled = set(names) - set(probe_shapes(model, names, input_shape))
        plain = replace(
            plain, overrides={**dict(plain.overrides), **dict.fromkeys(uncalled, "skip")}
        )
    # The convs about to be replaced, kept by reference (surgery swaps them out, never edits them)
    # so that a layer no realization speeds up can have its exact conv back.
    originals = {n: model.get_submodule(n) for n in decouplable_convs(model, plain)}
    with stage("decoupling"):
        records, _ = decouple_with_fold_info(model, plain, cache=cache)
    for a, b in fused.items():  # each fused-away conv keeps a record: its folded BN, the report
        while b in fused:  # A→B→C: the record goes before C's, the conv that remains
            b = fused[b]
        at = next((i for i, r in enumerate(records) if r.name == b), len(records))
        records.insert(at, fused_record(a, fused_away[a], b))
    if allocation is not None and allocation.pruned:
        with stage("pruning"):
            _prune_(model, records, allocation.pruned)
    for r in records:
        r.bn_folded = folded.get(r.name)
        r.fused = None if r.name in fused else _fused_into(fused, r.name)
        if allocation is not None and r.name in allocation.reasons:
            r.reason = allocation.reasons[r.name]
        elif r.name in uncalled or (allocation is not None and r.reason == NO_RULE):
            r.reason = NOT_CALLED  # the budget never saw it run, or the probe above
    corrected = None
    if means is not None:
        with stage("bias correction"):
            corrected = _correct_biases_(model, originals, means, fused)
        corrected.seconds += means_seconds
    calibration, seconds, head = [], None, None
    for name, real in (lplan.realizations if lplan is not None else {}).items():
        layer = model.get_submodule(name)  # now: a CP layer run as square may take full kernels
        if realization_names(layer):
            layer.set_realization(real)
    if calib_images is not None and refit != "none":
        # The factors of every rank priced are no longer needed here (a caller's cache keeps its
        # own reference): memory for the pass.
        cache = None
        gc.collect()
        release_memory()
        start = time.perf_counter()
        with stage("calibration"):
            calibration = calibrate_(
                model, reference, calib_images, refit, ridge, progress=progress
            )
        if distill_head and allocation is not None and allocation.pruned:
            with stage("head distillation"):
                head = distill_head_(model, reference, calib_images, list(allocation.pruned))
        seconds = time.perf_counter() - start
    by_name = {r.name: r for r in records}
    choices: dict[str, RealizationChoice] = {}
    whole: dict[str, float] = {}
    timed = stage("realization") if lplan is not None or realize else nullcontext()
    with timed:
        if lplan is not None:
            example = latency.example(input_shape, next(model.parameters()).dtype)
            for name, real in lplan.realizations.items():  # set before calibration (above)
                prefix = f"{lplan.allocation.choice[name].label}: "
                times = {k.removeprefix(prefix): v for k, v in lplan.table[name].items()
                         if k == ORIGINAL or k.startswith(prefix)}  # fmt: skip
                choices[name] = RealizationChoice(name, real, times, min_saving)
            whole = confirm_on_model_(
                model, choices, example, latency.runtime, 2, latency.min_run_time, latency.threads
            )
            for name, c in choices.items():
                layer = model.get_submodule(name)
                _note_latency(by_name[name], layer, c.original_ms, c.best_ms, c.chosen)
            for name, o in lplan.allocation.choice.items():
                if o.rank == 0:
                    by_name[name].latency_before_ms = lplan.table[name][ORIGINAL]
                    by_name[name].latency_after_ms = lplan.table[name][ORIGINAL]
        elif realize:
            example = latency.example(input_shape, next(model.parameters()).dtype)
            args = (
                latency.runtime,
                latency.layer_rounds,
                latency.layer_min_run_time,
                latency.threads,
            )
            # Under a FLOPs budget the plan holds: a slow layer keeps its fastest realization,
            # among those that run the FLOPs the plan counted.
            choices = choose_realizations_(
                model, originals, example, *args, progress=progress, min_gain=latency.min_gain,
                restore=target_flops is None, keep_flops=target_flops is not None,
            )  # fmt: skip
            whole = confirm_on_model_(
                model, choices, example, latency.runtime, 2, latency.min_run_time, latency.threads
            )
            for name, c in choices.items():
                rec = by_name[name]
                if c.chosen == ORIGINAL:
                    rec.action, rec.reason = "kept", c.reason()
                    rec.params_after, rec.structure = rec.params_before, None
                layer = model.get_submodule(name)
                _note_latency(rec, layer, c.original_ms, c.best_ms, c.chosen)
    return CompressResult(
        records, fold_error, allocation, calibration, lplan, choices, whole, seconds, corrected,
        head,
    )  # fmt: skip


def _correct_biases_(model, originals, means, fused) -> BiasCorrection:
    """:func:`correct_biases_` with each fused conv read as the first conv of its chain (whose
    input it now reads); a record saying why when there are no statistics at all."""
    if not means:
        return BiasCorrection(reason="no BatchNorm statistics (none in the model, or its forward "
                              "pass failed on the draws)")  # fmt: skip
    means = dict(means)
    for a, b in fused.items():  # in the order fused: A→B, then B→C
        if a in means:
            means[b] = means[a]
        else:
            means.pop(b, None)
    return correct_biases_(model, originals, means)


def _table_model(latency: LatencyConfig):
    """The cost model that prices a ``predicted`` latency table (fitted once per machine and
    cached), or None for a measured one: ``auto`` is predicted where there is a cost model (on
    the CPU, unless ``DECOUPLE_COST_MODEL=off``)."""
    if latency.layer_table == "measured" or latency.device == "cuda":
        return None
    got = cost_model_for(latency.runtime, latency.batch, latency.threads)
    if got is None and latency.layer_table == "predicted":
        raise ValueError(
            "layer_table 'predicted' needs the cost model, which DECOUPLE_COST_MODEL turns off"
        )
    return None if got is None else got[0]


def _fuse_linear_(model: nn.Module, config: DecoupleConfig, input_shape) -> tuple:
    """Fuse the linear 1×1 pairs that are cheaper as one conv (exact; never a layer an override
    names); returns the pairs, the convs fused away, and the model's FLOPs before, which budgets
    are fractions of."""
    named = {n for n, _ in model.named_modules() if config.spec_for(n) is not None}
    try:
        if not find_linear_pairs(model, named):
            return {}, {}, None
    except Exception:  # noqa: BLE001 - untraceable: nothing can be proved exact, nothing fused
        return {}, {}, None
    param = next(model.parameters())
    example = torch.zeros((1, *input_shape), dtype=param.dtype, device=param.device)
    before = count_flops(model, example)[0]
    convs = dict(model.named_modules())
    pairs = fuse_linear_pairs_(model, named)
    return pairs, {a: convs[a] for a in pairs}, before


def _fused_into(fused: dict[str, str], name: str) -> dict[str, str] | None:
    """The pairs of ``fused`` whose chain ends in conv ``name`` (A→B, B→C for C), in order."""
    group, frontier = {}, {name}
    for a, b in reversed(list(fused.items())):
        if b in frontier:
            group[a] = b
            frontier.add(a)
    return dict(reversed(list(group.items()))) or None


def _prune_(model: nn.Module, records: list[LayerRecord], pruned: dict) -> None:
    """Prune each allocated chain (the consumer keeps its own columns until calibration refits
    it) and say so in the producers' and consumers' records."""
    by_name = {r.name: r for r in records}
    for producer, (chain, keep) in pruned.items():
        prune_chain_(model, chain, keep)
        # Which of the original's outputs it still makes: calibration refits it on those, as it
        # does every layer the plan changed (decouple.calibrate.layerwise).
        model.get_submodule(producer).decouple_kept = torch.as_tensor(keep, dtype=torch.long)
        rec = by_name[producer]
        rec.action, rec.method, rec.rank, rec.max_rank = "pruned", "prune", len(keep), chain.width
        rec.rank_text = f"k={len(keep)}/{chain.width}"
        rec.structure = chain.to_dict(len(keep))
        for name in (producer, chain.consumer):
            by_name[name].params_after = sum(
                p.numel() for p in model.get_submodule(name).parameters()
            )


def _note_latency(rec: LayerRecord, layer, before_ms: float, after_ms: float, real: str) -> None:
    rec.latency_before_ms, rec.latency_after_ms, rec.realization = before_ms, after_ms, real
    if rec.action == "decoupled":
        rec.structure = recipe_entry(layer)  # now with its realization (and kernels, for CP)
        rec.params_after = sum(p.numel() for p in layer.parameters())

"""The whole product flow on one model: fold BN, choose ranks, decouple, calibrate.

``compress_`` strings together :func:`~decouple.bn_fold.fold_batchnorm_`,
:mod:`~decouple.allocate` (when a FLOPs budget is given), :func:`~decouple.surgery.decouple_`
and :func:`~decouple.calibrate.calibrate_` (when calibration images are given), and returns what
each step did. The CLI and the experiments both call it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from .allocate import (
    CRITERIA,
    MIN_SAVING,
    Allocation,
    Option,
    allocate,
    collect_moments,
    conv_flops,
    data_losses,
    decoupled_flops,
    energy_losses,
    factored_options,
    layer_options,
    probe_shapes,
)
from .bn_fold import fold_batchnorm_
from .calibrate import CalibrationRecord, calibrate_
from .config import DecoupleConfig
from .decomposition import max_rank
from .latency import LatencyConfig
from .layers import DecoupledConv2d
from .methods import FactorCache, is_factored, recipe_entry
from .realize import ORIGINAL, RealizationChoice, choose_realizations_, confirm_on_model_
from .report import count_flops
from .surgery import LayerRecord, decouple_with_fold_info, why_not_decouplable

if TYPE_CHECKING:
    from .latency_budget import LatencyPlan


@dataclass
class CompressResult:
    """Records of every step of :func:`compress_`."""

    records: list[LayerRecord]
    fold_error: str | None = None
    allocation: Allocation | None = None
    calibration: list[CalibrationRecord] = field(default_factory=list)
    latency_plan: LatencyPlan | None = None
    realizations: dict[str, RealizationChoice] = field(default_factory=dict)
    whole_model_ms: dict[str, float] = field(default_factory=dict)  # confirm_on_model_

    def extra(self) -> dict:
        """What the report adds beside the per-layer table."""
        out: dict = {}
        if self.fold_error:
            out["bn_fold_error"] = self.fold_error
        if self.latency_plan is not None:
            out["latency_allocation"] = self.latency_plan.to_dict()
        elif self.allocation is not None:
            a = self.allocation
            out["allocation"] = {
                "criterion": a.criterion,
                "target_flops": a.target_flops,
                "planned_flops": a.total_flops,
                "reached": a.total_flops <= a.target_flops,
                "ranks": a.ranks(),
                "reasons": a.reasons,
            }
        if self.calibration:
            out["calibration"] = [c.to_dict() for c in self.calibration]
        if self.realizations:
            out["realizations"] = {n: c.to_dict() for n, c in self.realizations.items()}
        if self.whole_model_ms:
            out["realization_check"] = {
                "whole_model_ms": self.whole_model_ms,
                "kept": min(self.whole_model_ms, key=self.whole_model_ms.get),
            }
        return out


def decouplable_convs(model: nn.Module, config: DecoupleConfig) -> list[str]:
    """Names of the convs that ``decouple_`` may touch under ``config`` (ignoring its ranks)."""
    names, inside = [], []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue  # the convs inside a factored layer are its parts, not candidates
        if is_factored(m):
            inside.append(name)
            continue
        spec = config.spec_for(name)
        if type(m) is nn.Conv2d and why_not_decouplable(m) is None and not (spec and spec.skip):
            names.append(name)
    return names


def method_and_order(config: DecoupleConfig, name: str) -> tuple[str, str]:
    """The method and order layer ``name`` gets (its override's, else the config's)."""
    spec = config.spec_for(name)
    method = (spec.method if spec and spec.method else None) or config.method
    order = (spec.order if spec and spec.order else None) or config.order
    return method, order


def rank_options(
    model: nn.Module,
    config: DecoupleConfig,
    input_shape: tuple[int, ...],
    criterion: str = "energy",
    calib_images: torch.Tensor | None = None,
    min_saving: float = MIN_SAVING,
    ridge: float = 1e-4,
    cache: FactorCache | None = None,
) -> tuple[dict[str, list[Option]], int, int]:
    """Every decouplable layer's options priced in FLOPs, with the model's and those layers' FLOPs.

    Each layer is priced with its own method (``config.method`` or its override); ``cache`` keeps
    the CP and Tucker factorizations for the decoupling that follows.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}; got {criterion!r}")
    if criterion == "data" and calib_images is None:
        raise ValueError("the data criterion needs calibration images")
    names = decouplable_convs(model, config)
    p = next(model.parameters())
    total, _ = count_flops(model, torch.zeros((1, *input_shape), dtype=p.dtype, device=p.device))
    shapes = probe_shapes(model, names, input_shape)
    moments = collect_moments(model, names, calib_images) if criterion == "data" else {}
    options, layers_flops = {}, 0
    for name in names:
        conv = model.get_submodule(name)
        method, order = method_and_order(config, name)
        in_hw, out_hw = shapes[name]
        original = conv_flops(conv, out_hw)
        layers_flops += original
        if method != "nd":
            options[name] = factored_options(
                conv, method, in_hw, out_hw, min_saving,
                moments.get(name), ridge, cache, config.factor_options(),
            )  # fmt: skip
            continue
        full = max_rank(tuple(conv.weight.shape), order, conv.groups)
        costs = [decoupled_flops(conv, order, t, in_hw, out_hw) for t in range(1, full + 1)]
        losses = (
            energy_losses(conv, order)
            if criterion == "energy"
            else data_losses(conv, order, moments[name], ridge)
        )
        options[name] = layer_options(losses, original, costs, min_saving)
    return options, total, layers_flops


def allocated_config(config: DecoupleConfig, ranks: dict[str, int]) -> DecoupleConfig:
    """``config`` with the allocated per-layer ranks as overrides (0: skip); its ``"skip"``
    overrides are kept, its global rank or energy dropped."""
    skips = {k: s for k, s in config.overrides if s.skip}
    chosen = {}
    for n, t in ranks.items():
        method, order = method_and_order(config, n)
        chosen[n] = "skip" if t == 0 else {"rank": t, "method": method, "order": order}
    return replace(config, rank=None, energy=None, overrides={**skips, **chosen})


def plan_ranks(
    model: nn.Module,
    config: DecoupleConfig,
    input_shape: tuple[int, ...],
    target_flops: float,
    criterion: str = "energy",
    calib_images: torch.Tensor | None = None,
    min_saving: float = MIN_SAVING,
    ridge: float = 1e-4,
    cache: FactorCache | None = None,
) -> Allocation:
    """Per-layer ranks for ``model`` so that its FLOPs are at most ``target_flops`` of today's.

    ``target_flops`` is a fraction of the whole model's FLOPs as ``FlopCounterMode`` counts them
    for one input of ``input_shape``; layers not decoupled count at their full cost.
    """
    if not 0 < target_flops <= 1:
        raise ValueError(f"target_flops must be a fraction in (0, 1]; got {target_flops!r}")
    options, total, layers_flops = rank_options(
        model, config, input_shape, criterion, calib_images, min_saving, ridge, cache
    )
    plan = allocate(options, total - layers_flops, int(target_flops * total))
    plan.criterion = criterion
    return plan


def compress_(
    model: nn.Module,
    config: DecoupleConfig,
    input_shape: tuple[int, ...],
    target_flops: float | None = None,
    criterion: str | None = None,
    calib_images: torch.Tensor | None = None,
    refit: str = "auto",
    ridge: float = 1e-4,
    min_saving: float = MIN_SAVING,
    progress: bool = False,
    cache: FactorCache | None = None,
    target_latency: float | None = None,
    latency: LatencyConfig | None = None,
    realize: bool = False,
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
    calib_images : torch.Tensor, optional
        Unlabelled, preprocessed images for the data criterion and the refit.
    refit : {"auto", "last", "alternating", "none"}
        Calibration refit mode (used only with ``calib_images``).
    cache : FactorCache, optional
        Reuse CP/Tucker factorizations across calls (e.g. a sweep over budgets on copies of one
        model); by default one cache lives for this call.
    target_latency : float, optional
        Instead of ``target_flops``: fraction of the model's measured latency to keep, in (0, 1];
        ranks and realizations come from per-layer latency tables (:mod:`decouple.latency_budget`).
    latency : LatencyConfig, optional
        Runtime, batch and device of the timings (``target_latency`` and ``realize``).
    realize : bool
        After decoupling, time every layer's realizations and the conv it replaced on the model's
        real inputs and keep the fastest; a layer nothing beats gets its conv back
        (:func:`decouple.realize.choose_realizations_`); then check the choice on the whole
        model (:func:`decouple.realize.confirm_on_model_`). Implied by ``target_latency``.
    """
    if target_flops is not None and target_latency is not None:
        raise ValueError("give either target_flops or target_latency, not both")
    latency = latency or LatencyConfig()
    cache = cache if cache is not None else FactorCache()
    fold_error = None
    folded: dict[str, str] = {}
    if config.fold_bn:
        result = fold_batchnorm_(model)
        folded, fold_error = result.folded, result.error
    plain = replace(config, fold_bn=False)
    reference = copy.deepcopy(model) if calib_images is not None else None
    allocation = lplan = None
    if target_latency is not None:
        from .latency_budget import plan_latency  # it builds on rank_options above

        criterion = criterion or "energy"
        lplan = plan_latency(
            model, plain, input_shape, target_latency, latency, criterion, calib_images,
            min_saving, ridge, cache, progress,
        )  # fmt: skip
        allocation = lplan.allocation
    elif target_flops is not None:
        # Energy by default: with calibration it kept as much accuracy as the data criterion on
        # the CIFAR ResNets (results/README.md), at a fraction of the cost.
        criterion = criterion or "energy"
        allocation = plan_ranks(
            model, plain, input_shape, target_flops, criterion, calib_images, min_saving, ridge,
            cache,
        )  # fmt: skip
    if allocation is not None:
        plain = allocated_config(plain, allocation.ranks())
    # The convs about to be replaced, kept by reference (surgery swaps them out, never edits them)
    # so that a layer no realization speeds up can have its exact conv back.
    originals = {n: model.get_submodule(n) for n in decouplable_convs(model, plain)}
    records, _ = decouple_with_fold_info(model, plain, cache=cache)
    for r in records:
        r.bn_folded = folded.get(r.name)
        if allocation is not None and r.name in allocation.reasons:
            r.reason = allocation.reasons[r.name]
    calibration = []
    if calib_images is not None and refit != "none":
        calibration = calibrate_(model, reference, calib_images, refit, ridge, progress=progress)
    by_name = {r.name: r for r in records}
    choices: dict[str, RealizationChoice] = {}
    whole: dict[str, float] = {}
    if lplan is not None:
        example = latency.example(input_shape, next(model.parameters()).dtype)
        for name, real in lplan.realizations.items():
            layer = model.get_submodule(name)
            if isinstance(layer, DecoupledConv2d):
                layer.set_realization(real)
            prefix = f"T={lplan.allocation.choice[name].rank} "
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
        args = (latency.runtime, latency.layer_rounds, latency.layer_min_run_time, latency.threads)
        choices = choose_realizations_(
            model, originals, example, *args, progress=progress, min_gain=latency.min_gain
        )
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
    return CompressResult(records, fold_error, allocation, calibration, lplan, choices, whole)


def _note_latency(rec: LayerRecord, layer, before_ms: float, after_ms: float, real: str) -> None:
    rec.latency_before_ms, rec.latency_after_ms, rec.realization = before_ms, after_ms, real
    if rec.action == "decoupled":
        rec.structure = recipe_entry(layer)  # now with its realization

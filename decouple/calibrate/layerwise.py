"""Calibration of a whole model: each factored layer refit in forward order, on real inputs.

No gradient steps. For each factored layer in forward order, with the decoupled network's own
inputs ``X`` (so earlier layers' errors are corrected, not compounded) and the original layer's
outputs ``Y`` as targets, :mod:`decouple.calibrate.refit` solves for one factor in closed form;
``auto`` keeps per layer whichever of data-free, ``last`` and ``alternating`` has the lowest
output error on held-out calibration images.

Images stream through both networks a mini-batch at a time (:mod:`decouple.calibrate.stream`):
the decoupled network's inputs to a layer are taken after every earlier layer was refit, the
original network's outputs of the same layer are the targets, and only the layer's second moments
are kept, so memory does not grow with the number of images.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..nn.factorized import FactorizedConv2d
from ..nn.geometry import kernel_of
from ..nn.progress import progress_bar
from ..nn.transaction import in_place
from ..surgery.methods import FACTORED_LAYERS
from .cp_kernels import refit_cp_kernels, takes_full_kernels
from .moments import Moments, positions_for
from .prune import refit_on
from .reduced_rank import MAX_MOMENT_ELEMENTS, moments_fit, refit_lowrank, ridges
from .refit import (
    MAX_SYSTEM,
    Factors,
    alternate,
    first_factor_system,
    refit_factored,
    refit_last,
    refit_pointwise_out,
)
from .stream import (
    LayerStream,
    advance_together,
    batches,
    count_images,
    forward_order,
    release_memory,
)

REFIT_MODES = ("none", "last", "alternating", "auto")


@dataclass
class CalibrationRecord:
    """Held-out relative output error of one layer before and after the refit."""

    name: str
    mode: str
    error_before: float
    error_after: float
    errors: dict = field(default_factory=dict)
    skipped: str | None = None  # a mode not tried, and why

    def to_dict(self) -> dict:
        return asdict(self)


def holdout_mask(n: int, fraction: float) -> torch.Tensor:
    """Every ``1/fraction``-th image is held out (deterministic, spread over the set)."""
    return held_out(0, n, fraction)


def held_out(start: int, count: int, fraction: float) -> torch.Tensor:
    """The part of :func:`holdout_mask` for images ``start … start + count − 1``."""
    mask = torch.zeros(count, dtype=torch.bool)
    if fraction > 0:
        step = max(2, round(1 / fraction))
        mask[(step - 1 - start) % step :: step] = True
    return mask


def layer_moments(
    xs: Iterator[tuple[int, torch.Tensor]],
    ys: Iterator[tuple[int, torch.Tensor]],
    layer: nn.Module,
    holdout: float,
    images: int | None = None,
) -> tuple[Moments, Moments]:
    """Fit and held-out moments of ``layer`` from matching batches of its inputs and targets,
    read at :func:`~decouple.calibrate.moments.positions_for` pixels per image of ``images``.

    With nothing held out (a set smaller than ``1/holdout``) the fit moments serve for both.
    """
    fit, val = Moments.zeros(layer), Moments.zeros(layer)
    positions = positions_for(layer, images)
    for (start, x), (_, y) in zip(xs, ys, strict=True):
        held = held_out(start, len(x), holdout)
        index = torch.arange(start, start + len(x))
        x, y = x.to("cpu"), y.to("cpu", torch.float32)  # targets as the in-memory version kept them
        for part, rows in ((fit, ~held), (val, held)):
            if rows.any():  # the images are gathered where they are: no copy of a whole batch
                part.add(layer, x, y, positions=positions, index=index, rows=rows.nonzero()[:, 0])
    fit.all_sum_()  # under torchrun: every process's share (a no-op otherwise)
    val.all_sum_()
    return fit, (val if val.count else fit)


def _reads_features(layer: nn.Module) -> bool:
    """A CP or Tucker layer: refit as its last 1×1 conv, on the features its head makes."""
    return isinstance(layer, FactorizedConv2d) and layer.method != "svd"


def _refit_target(module: nn.Module) -> bool:
    """A layer calibration refits: a factored layer, or the consumer or producer of a pruned
    chain."""
    return isinstance(module, FACTORED_LAYERS) or any(
        hasattr(module, a) for a in ("decouple_chain", "decouple_kept")
    )


@in_place(save_data=_refit_target)  # refits write into the layers: copies undo a failure
@torch.no_grad()
def calibrate_(
    model: nn.Module,
    reference: nn.Module,
    images: torch.Tensor | Iterable,
    mode: str = "auto",
    ridge: float = 1e-4,
    rounds: int = 2,
    holdout: float = 0.125,
    progress: bool = False,
    batch_size: int = 32,
    keep_bytes: int | None = None,
) -> list[CalibrationRecord]:
    """Refit every factored layer of ``model`` in place, in forward order.

    Network decoupling layers refit either factor (see :mod:`decouple.calibrate.refit`); CP and
    Tucker layers refit their last 1×1 conv (``last``; ``alternating`` means the same for them);
    the consumer of a pruned chain (:mod:`decouple.surgery.chains`) is refit whole on the channels
    it still reads, whatever the mode, and its producer (marked ``decouple_kept``: the original's
    output channels it still makes) on those outputs of the original, which the layers changed
    before it moved.
    Images stream through both networks in mini-batches, so memory does not grow with their
    number (:mod:`decouple.calibrate.stream`).

    Parameters
    ----------
    model : nn.Module
        The decoupled network.
    reference : nn.Module
        The network before decoupling (after any BatchNorm folding), with a conv of the same
        name for every decoupled layer; its outputs are the targets.
    images : torch.Tensor or iterable
        Unlabelled calibration images ``(n, C, H, W)``, preprocessed as the model expects, or a
        source of such batches that gives the same images in the same order on every pass (a
        ``DataLoader`` without shuffling; ``(images, labels)`` items are fine).
    mode : {"auto", "last", "alternating", "none"}
    ridge : float
        Ridge strength relative to the mean diagonal of the normal equations.
    holdout : float
        Fraction of images kept out of the fit to choose the mode (``auto``) and to report errors:
        every ``1/holdout``-th image of the set.
    batch_size : int
        Images per mini-batch when ``images`` is a tensor.
    keep_bytes : int, optional
        Activations kept in memory between layers, per network; the rest go to a temporary
        folder. Default: 768 MiB, less where memory is short
        (:func:`~decouple.calibrate.stream.default_keep_bytes`).
    """
    if mode not in REFIT_MODES:
        raise ValueError(f"refit mode must be one of {', '.join(REFIT_MODES)}; got {mode!r}")
    layers = {n: m for n, m in model.named_modules() if _refit_target(m)}
    if mode == "none" or not layers:
        return []
    model.eval()
    reference.eval()
    source = batches(images, batch_size)
    n = count_images(images)
    device = next(model.parameters()).device
    first = next(iter(batches(images, batch_size, shard=False)()))[1][:1].to(device)
    names = forward_order(model, list(layers), first)
    candidates = ("last", "alternating") if mode == "auto" else (mode,)
    records: list[CalibrationRecord] = []
    # CP and Tucker refit only their last 1×1 conv: the model is cut just before it, so the
    # features it reads (R of them) are made once, by the pass, not recomputed from the input.
    # A CP layer that may take full kernels reads its input patches: its head may change.
    full = {n for n in names if takes_full_kernels(layers[n], mode) and moments_fit(layers[n])}
    features = {n for n in names if _reads_features(layers[n]) and n not in full}
    reads = {n: f"{n}.pointwise_out" if n in features else n for n in names}
    with (
        LayerStream(model, [reads[n] for n in names], source, device, keep_bytes) as xs,
        LayerStream(reference, names, source, device, keep_bytes) as ys,
    ):
        advance_together((xs, reads[names[0]]), (ys, names[0]))  # each image read once
        per_layer = _count_batches(images, batch_size)
        total = None if per_layer is None else per_layer * len(names)
        bar = progress_bar(total=total, desc="calibrate", unit="batch", enabled=progress)
        for name in names:
            layer = layers[name]
            bar.set_postfix_str(name)
            # CP and Tucker refit only their last 1×1 conv: the moments of the features it reads
            # (R of them) serve, where the k×k patches' (C·k² of them, R > C·k² rarely) cost
            # (C·k²/R)² times more to sum.
            read = layer.pointwise_out if name in features else layer
            if not moments_fit(read):  # e.g. a linear layer of 25,088 inputs: 5 GB of moments
                bar.update(per_layer or 0)
                records.append(_too_large(layer, name))
                continue
            inputs = _ticking(xs.run(reads[name], "input"), bar)
            targets = ys.run(name, "output")
            kept = getattr(layer, "decouple_kept", None)
            if kept is not None:  # a pruned chain's producer: the original's outputs it kept
                targets = ((s, y[:, kept.to(y.device)]) for s, y in targets)
            m_fit, m_val = layer_moments(inputs, targets, read, holdout, n)
            if hasattr(layer, "decouple_chain") or kept is not None:
                records.append(_refit_pruned(layer, name, m_fit, m_val, ridge))
                continue
            if getattr(layer, "method", "") == "svd":
                anchor = kernel_of(reference.get_submodule(name))
                records.append(
                    _refit_lowrank(layer, name, m_fit, m_val, candidates, mode, ridge, anchor)
                )
                continue
            if name in full:
                original = kernel_of(reference.get_submodule(name))
                best, err = refit_cp_kernels(layer, original, m_fit, m_val, ridge)
                records.append(CalibrationRecord(name, best, err["data-free"], err[best], err))
                continue
            if isinstance(layer, FactorizedConv2d):
                records.append(_refit_factorized(layer, name, m_fit, m_val, mode, ridge))
                continue
            start = Factors.of(layer)
            err = {"data-free": m_val.relative_error(start.weight(), start.bias)}
            last = refit_last(start, m_fit, ridge)
            fitted = {"last": last}
            skipped = None
            if "alternating" in candidates:
                size = first_factor_system(start)
                if size <= MAX_SYSTEM:
                    fitted["alternating"] = alternate(last, m_fit, ridge, rounds)
                else:  # time and memory grow as the system's cube and square
                    skipped = f"alternating: its system has {size:,} elements (> {MAX_SYSTEM:,})"
            tried = [c for c in candidates if c in fitted] or ["last"]
            for c in tried:
                err[c] = m_val.relative_error(fitted[c].weight(), fitted[c].bias)
            best = min(err, key=err.get) if mode == "auto" else tried[0]
            if best != "data-free":
                fitted[best].load_into(layer)
            records.append(CalibrationRecord(name, best, err["data-free"], err[best], err, skipped))
            release_memory()  # each layer's temporaries (moments, solves) go back to the OS
        bar.close()
    return records


def _count_batches(images, batch_size: int) -> int | None:
    if isinstance(images, torch.Tensor):
        return -(-len(images) // batch_size)
    try:
        return len(images)
    except TypeError:
        return None


def _ticking(items: Iterator, bar) -> Iterator:
    for item in items:
        yield item
        bar.update(1)


@torch.no_grad()
def _refit_factorized(
    layer: FactorizedConv2d, name: str, m_fit: Moments, m_val: Moments, mode: str, ridge: float
) -> CalibrationRecord:
    """Refit the last 1×1 conv of a CP/Tucker layer if it measures better (``auto``) or always;
    ``m_fit``, ``m_val``: the moments of the features it reads against the layer's targets."""
    out = layer.pointwise_out
    g, r = out.groups, out.in_channels // out.groups
    now = out.weight.detach().double().cpu().reshape(g, -1, r)  # (g, N/g, R)
    bias = None if out.bias is None else out.bias.detach().double().cpu()
    err = {"data-free": m_val.relative_error(out.weight, out.bias)}
    same = torch.eye(r, dtype=torch.float64).expand(g, r, r)  # the features are read as they are
    new_out, new_bias = refit_pointwise_out(same, now, bias, m_fit, ridge)
    err["last"] = m_val.relative_error(new_out.reshape(out.weight.shape), new_bias)
    best = min(err, key=err.get) if mode == "auto" else "last"
    if best == "last":
        out.weight.copy_(new_out.reshape(out.weight.shape).to(out.weight.device, out.weight.dtype))
        if new_bias is not None:
            out.bias.copy_(new_bias.to(out.bias.device, out.bias.dtype))
    return CalibrationRecord(name, best, err["data-free"], err[best], err)


@torch.no_grad()
def _refit_pruned(
    layer: nn.Module, name: str, m_fit: Moments, m_val: Moments, ridge: float
) -> CalibrationRecord:
    """The consumer of a pruned chain: least squares on the channels it still reads (``full``),
    at the ridge best on held-out images; kept as it is (its own columns) if that measures
    better. The producer likewise, on every input feature, against the outputs it kept."""
    err = {"data-free": m_val.relative_error(layer.weight, layer.bias)}
    if layer.bias is None or m_fit.xx.shape[0] != 1:  # a bias-free or grouped producer: as it is
        why = "a bias-free or grouped layer: kept as pruned"
        return CalibrationRecord(name, "data-free", err["data-free"], err["data-free"], err, why)
    every = torch.arange(m_fit.xx.shape[-1] - 1)  # every input feature (C·kh·kw of them)
    best_w = None
    for lam in ridges(ridge):
        w, b = refit_on(m_fit, every, lam)
        e = m_val.relative_error(w.reshape(layer.weight.shape), b)
        if e < err.get("full", float("inf")):
            err["full"], best_w = e, (w, b)
    best = min(err, key=err.get)
    if best == "full":
        w, b = best_w
        layer.weight.copy_(
            w.reshape(layer.weight.shape).to(layer.weight.device, layer.weight.dtype)
        )
        layer.bias.copy_(b.to(layer.bias.device, layer.bias.dtype))
    return CalibrationRecord(name, best, err["data-free"], err[best], err)


def _too_large(layer: nn.Module, name: str) -> CalibrationRecord:
    why = f"its moments would exceed {MAX_MOMENT_ELEMENTS:,} elements: kept data-free"
    return CalibrationRecord(name, "data-free", float("nan"), float("nan"), {}, why)


@torch.no_grad()
def _refit_lowrank(
    layer: nn.Module,
    name: str,
    m_fit: Moments,
    m_val: Moments,
    candidates,
    mode: str,
    ridge: float,
    anchor: torch.Tensor,
) -> CalibrationRecord:
    """A low-rank layer: ``last`` refits its second factor, ``alternating`` both by reduced-rank
    regression (the closed-form optimum that alternating rounds would approach); ``auto`` keeps
    whichever (or the data-free factors) measures best on held-out images. Each refit tries the
    ridges of :func:`~decouple.calibrate.reduced_rank.ridges`, pulled towards ``anchor``, the
    original layer's kernel."""
    f = layer.factors()
    bias = None if layer.bias is None else layer.bias.detach().double().cpu()
    err = {"data-free": m_val.relative_error(f.reconstruct(), bias)}
    fitted = {}
    for lam in ridges(ridge):  # few samples per feature (a 1x1 map) need a stronger ridge
        if "last" in candidates:
            out, new_bias, kernel = refit_factored(f, bias, m_fit, lam)
            e = m_val.relative_error(kernel, new_bias)
            if e < err.get("last", float("inf")):
                fitted["last"], err["last"] = (out, f.inp, new_bias), e
        if "alternating" in candidates:
            out, inp, new_bias, kernel = refit_lowrank(f, bias, m_fit, lam, anchor)
            e = m_val.relative_error(kernel, new_bias)
            if e < err.get("alternating", float("inf")):
                fitted["alternating"], err["alternating"] = (out, inp, new_bias), e
    best = min(err, key=err.get) if mode == "auto" else mode
    if best != "data-free":
        out, inp, new_bias = fitted[best]
        for part, w in ((layer.pointwise_in, inp), (layer.pointwise_out, out)):
            part.weight.copy_(
                w.reshape(part.weight.shape).to(part.weight.device, part.weight.dtype)
            )
        if new_bias is not None:
            layer.bias.copy_(new_bias.to(layer.bias.device, layer.bias.dtype))
    return CalibrationRecord(name, best, err["data-free"], err[best], err)

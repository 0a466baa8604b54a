"""Calibration of a whole model: each factored layer refit in forward order, on real inputs.

No gradient steps. For each factored layer in forward order, with the decoupled network's own
inputs ``X`` (so earlier layers' errors are corrected, not compounded) and the original layer's
outputs ``Y`` as targets, :mod:`decouple.calibrate.refit` solves for one factor in closed form;
``auto`` keeps per layer whichever of data-free, ``last`` and ``alternating`` has the lowest
output error on held-out calibration images.

The whole calibration set goes through each network once: targets from one pass of the original
network, and one pass of the decoupled network during which each layer is refit just before it
runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..nn.factorized import FactorizedConv2d
from ..surgery.methods import FACTORED_LAYERS
from .moments import Moments
from .refit import Factors, alternate, refit_factored, refit_last

REFIT_MODES = ("none", "last", "alternating", "auto")


@dataclass
class CalibrationRecord:
    """Held-out relative output error of one layer before and after the refit."""

    name: str
    mode: str
    error_before: float
    error_after: float
    errors: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def capture_outputs(
    model: nn.Module, names: list[str], images: torch.Tensor, batch_size: int = 256
):
    """Outputs of the named submodules of ``model`` over ``images`` (float32, on the CPU)."""
    outs: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def keep(name: str, out: torch.Tensor) -> None:
        # A copy: an in-place ReLU after the conv would otherwise rewrite what we kept.
        outs[name].append(out.detach().to("cpu", torch.float32, copy=True))

    hooks = [
        model.get_submodule(n).register_forward_hook(lambda mod, inp, out, n=n: keep(n, out))
        for n in names
    ]
    try:
        for i in range(0, len(images), batch_size):
            model(images[i : i + batch_size])
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in outs.items()}


def holdout_mask(n: int, fraction: float) -> torch.Tensor:
    """Every ``1/fraction``-th image is held out (deterministic, spread over the set)."""
    mask = torch.zeros(n, dtype=torch.bool)
    if fraction > 0:
        step = max(2, round(1 / fraction))
        mask[step - 1 :: step] = True
    return mask


def _moments(layer: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 64) -> Moments:
    m = Moments.zeros(layer)
    for i in range(0, len(x), batch):
        m.add(layer, x[i : i + batch], y[i : i + batch])
    return m


@torch.no_grad()
def calibrate_(
    model: nn.Module,
    reference: nn.Module,
    images: torch.Tensor,
    mode: str = "auto",
    ridge: float = 1e-4,
    rounds: int = 2,
    holdout: float = 0.125,
    progress: bool = False,
) -> list[CalibrationRecord]:
    """Refit every factored layer of ``model`` in place, in forward order.

    Network decoupling layers refit either factor (see the module docstring); CP and Tucker
    layers refit their last 1×1 conv (``last``; ``alternating`` means the same for them).

    Parameters
    ----------
    model : nn.Module
        The decoupled network.
    reference : nn.Module
        The network before decoupling (after any BatchNorm folding), with a conv of the same
        name for every decoupled layer; its outputs are the targets.
    images : torch.Tensor
        Unlabelled calibration images ``(n, C, H, W)``, preprocessed as the model expects.
        They go through the decoupled network as one batch.
    mode : {"auto", "last", "alternating", "none"}
    ridge : float
        Ridge strength relative to the mean diagonal of the normal equations.
    holdout : float
        Fraction of images kept out of the fit to choose the mode (``auto``) and to report errors.
    """
    if mode not in REFIT_MODES:
        raise ValueError(f"refit mode must be one of {', '.join(REFIT_MODES)}; got {mode!r}")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, FACTORED_LAYERS)]
    if mode == "none" or not layers:
        return []
    model.eval()
    reference.eval()
    targets = capture_outputs(reference, [n for n, _ in layers], images)
    held = holdout_mask(len(images), holdout)
    fit = ~held if held.any() and (~held).sum() > 0 else torch.ones_like(held)
    candidates = ("last", "alternating") if mode == "auto" else (mode,)
    records: list[CalibrationRecord] = []
    bar = tqdm(total=len(layers), desc="calibrate", disable=not progress, leave=False)

    def hook(layer: nn.Module, args, name: str) -> None:
        x, y = args[0], targets[name]
        m_fit = _moments(layer, x[fit], y[fit])
        m_val = _moments(layer, x[held], y[held]) if held.any() else m_fit
        if isinstance(layer, FactorizedConv2d):
            records.append(_refit_factorized(layer, name, m_fit, m_val, mode, ridge))
            bar.update(1)
            return
        start = Factors.of(layer)
        err = {"data-free": m_val.relative_error(start.weight(), start.bias)}
        last = refit_last(start, m_fit, ridge)
        fitted = {"last": last}
        if "alternating" in candidates:
            fitted["alternating"] = alternate(last, m_fit, ridge, rounds)
        for c in candidates:
            err[c] = m_val.relative_error(fitted[c].weight(), fitted[c].bias)
        best = min(err, key=err.get) if mode == "auto" else mode
        if best != "data-free":
            fitted[best].load_into(layer)
        records.append(CalibrationRecord(name, best, err["data-free"], err[best], err))
        bar.update(1)

    handles = [
        m.register_forward_pre_hook(lambda mod, args, n=n: hook(mod, args, n)) for n, m in layers
    ]
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
        bar.close()
    return records


@torch.no_grad()
def _refit_factorized(
    layer: FactorizedConv2d, name: str, m_fit: Moments, m_val: Moments, mode: str, ridge: float
) -> CalibrationRecord:
    """Refit the last 1×1 conv of a CP/Tucker layer if it measures better (``auto``) or always."""
    f = layer.factors()
    bias = None if layer.bias is None else layer.bias.detach().double().cpu()
    err = {"data-free": m_val.relative_error(f.reconstruct(), bias)}
    out, new_bias, kernel = refit_factored(f, bias, m_fit, ridge)
    err["last"] = m_val.relative_error(kernel, new_bias)
    best = min(err, key=err.get) if mode == "auto" else "last"
    if best == "last":
        w = layer.pointwise_out.weight
        w.copy_(out.reshape(w.shape).to(w.device, w.dtype))
        if new_bias is not None:
            layer.bias.copy_(new_bias.to(layer.bias.device, layer.bias.dtype))
    return CalibrationRecord(name, best, err["data-free"], err[best], err)

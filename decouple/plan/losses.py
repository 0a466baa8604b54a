"""What a layer's options lose: data-free kernel energy, or measured output error on calibration images.

* ``energy``: the fraction of the kernel's squared norm not reproduced, ``‖W − Ŵ‖² / ‖W‖²``;
* ``data``: the layer's squared relative output error on held-out calibration images, after the
  closed-form refit of its last factor (what calibration will do), with the original network's
  inputs (:func:`collect_moments`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..calibrate.layerwise import held_out
from ..calibrate.moments import Moments
from ..calibrate.refit import Factors, refit_last
from ..calibrate.stream import batches
from ..factor.nd import decouple_weight

CRITERIA = ("energy", "data")


@torch.no_grad()
def probe_shapes(model: nn.Module, names: list[str], input_shape) -> dict[str, tuple]:
    """Spatial size of each named conv's input and output, from one forward pass."""
    shapes = {}

    def record(name, inp, out) -> None:  # a forward hook that returns a value replaces the output
        shapes.setdefault(name, (tuple(inp[0].shape[2:]), tuple(out.shape[2:])))

    hooks = [
        model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: record(n, i, o))
        for n in names
    ]
    try:
        p = next(model.parameters())
        model(torch.zeros((1, *input_shape), dtype=p.dtype, device=p.device))
    finally:
        for h in hooks:
            h.remove()
    return shapes


@torch.no_grad()
def collect_moments(
    model: nn.Module,
    names: list[str],
    images: torch.Tensor | Iterable,
    holdout: float = 0.125,
    batch_size: int = 64,
) -> dict[str, tuple[Moments, Moments]]:
    """Fit and held-out moments of every named conv, on ``model``'s own inputs and outputs.

    ``images`` is a tensor or a re-iterable source of batches (see
    :func:`decouple.calibrate.stream.batches`); they go through once, a batch at a time.
    """
    moments = {
        n: (Moments.zeros(model.get_submodule(n)), Moments.zeros(model.get_submodule(n)))
        for n in names
    }
    current = {}

    def hook(mod, inp, out, name):
        fit, val = moments[name]
        mask = current["held"]
        if (~mask).any():
            fit.add(mod, inp[0].cpu()[~mask], out.cpu()[~mask])
        if mask.any():
            val.add(mod, inp[0].cpu()[mask], out.cpu()[mask])

    hooks = [
        model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: hook(m, i, o, n))
        for n in names
    ]
    device = next(model.parameters()).device
    any_held = False
    try:
        for start, x in batches(images, batch_size)():
            current["held"] = held_out(start, len(x), holdout)
            any_held |= bool(current["held"].any())
            model(x.to(device))
    finally:
        for h in hooks:
            h.remove()
    if not any_held:  # nothing held out: judge on the fit itself
        moments = {n: (f, f) for n, (f, _) in moments.items()}
    return moments


def energy_losses(conv: nn.Conv2d, order: str) -> list[float]:
    """``1 − energy(T)`` for ``T = 1 … full``: the squared relative kernel error."""
    full = decouple_weight(conv.weight, None, order, conv.groups)
    return [float(1 - e) for e in full.layer_energy()]


def data_losses(
    conv: nn.Conv2d, order: str, moments: tuple[Moments, Moments], ridge: float = 1e-4
) -> list[float]:
    """Squared relative output error (held out) at ``T = 1 … full``, after a last-factor refit."""
    fit, val = moments
    full = decouple_weight(conv.weight, None, order, conv.groups)
    losses = []
    for t in range(1, full.max_rank + 1):
        fac = refit_last(Factors.from_decoupling(full.truncated(t), conv.bias), fit, ridge)
        losses.append(val.relative_error(fac.weight(), fac.bias) ** 2)
    return losses

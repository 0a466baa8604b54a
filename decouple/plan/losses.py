"""What a layer's options lose: data-free kernel energy, or measured output error on calibration images.

* ``energy``: the fraction of the kernel's squared norm not reproduced, ``‖W − Ŵ‖² / ‖W‖²``;
* ``data``: the layer's squared relative output error on held-out calibration images, after the
  closed-form refit of its last factor (what calibration will do), with the original network's
  inputs (:func:`collect_moments`);
* ``output``: ``data`` times the layer's measured effect on the network's output
  (:func:`output_sensitivity`), so that a sum over layers estimates the squared relative error
  of the network's logits rather than counting every layer alike.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import torch
from torch import nn

from ..calibrate.layerwise import held_out
from ..calibrate.moments import Moments, positions_for
from ..calibrate.reduced_rank import moments_fit
from ..calibrate.refit import Factors, refit_last_ranks
from ..calibrate.stream import batches, count_images
from ..factor.nd import decouple_weight
from ..nn import shards
from ..nn.geometry import positions
from ..nn.output_diff import squared_change
from ..nn.outputs import detection_sets, flatten_output, under

CRITERIA = ("energy", "data", "output")
SENSITIVITY_NOISE = 0.1  # relative RMS of the noise put on a layer's output to measure its effect
SENSITIVITY_IMAGES = 256  # images enough to rank layers; bounds the cost on large models


@torch.no_grad()
def probe_shapes(model: nn.Module, names: list[str], input_shape) -> dict[str, tuple]:
    """Spatial size of each named conv's input and output, from one forward pass (a linear
    layer's: its positions, :func:`~decouple.nn.geometry.positions`). A layer the forward pass
    never calls is left out."""
    shapes = {}

    def record(name, mod, inp, out) -> None:  # a hook that returns a value replaces the output
        shapes.setdefault(name, (positions(inp[0], mod), positions(out, mod)))

    hooks = [
        model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: record(n, m, i, o))
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
    :func:`decouple.calibrate.stream.batches`); they go through once, a batch at a time. A layer
    whose moments would be too large (:func:`~decouple.calibrate.reduced_rank.moments_fit`) has
    none: it is priced by its kernel energy.
    """
    names = [n for n in names if moments_fit(model.get_submodule(n))]
    count = count_images(images)
    positions = {n: positions_for(model.get_submodule(n), count) for n in names}
    moments = {
        n: (Moments.zeros(model.get_submodule(n)), Moments.zeros(model.get_submodule(n)))
        for n in names
    }
    current = {}

    def hook(mod, inp, out, name):
        fit, val = moments[name]
        mask = current["held"]
        index, at = current["index"], positions[name]
        if (~mask).any():
            fit.add(mod, inp[0].cpu()[~mask], out.cpu()[~mask], positions=at, index=index[~mask])
        if mask.any():
            val.add(mod, inp[0].cpu()[mask], out.cpu()[mask], positions=at, index=index[mask])

    hooks = [
        model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: hook(m, i, o, n))
        for n in names
    ]
    device = next(model.parameters()).device
    any_held = False
    try:
        for start, x in batches(images, batch_size)():
            current["held"] = held_out(start, len(x), holdout)
            current["index"] = torch.arange(start, start + len(x))
            any_held |= bool(current["held"].any())
            model(x.to(device))
    finally:
        for h in hooks:
            h.remove()
    for fit, val in moments.values():  # under torchrun: every process's share
        fit.all_sum_()
        val.all_sum_()
    if not shards.all_sum(any_held)[0]:  # nothing held out: judge on the fit itself
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
    start = Factors.from_decoupling(full.truncated(full.max_rank), conv.bias)
    fits = refit_last_ranks(start, fit, range(1, full.max_rank + 1), ridge)  # one build
    return [val.relative_error(f.weight(), f.bias) ** 2 for _, f in sorted(fits.items())]


def output_sensitivity(
    model: nn.Module,
    names: list[str],
    images: torch.Tensor | Iterable,
    noise: float = SENSITIVITY_NOISE,
    max_images: int = SENSITIVITY_IMAGES,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, float]:
    """How much each named layer's output error moves the network's output.

    The factor that turns a layer's squared relative output error into the network's squared
    relative output change, to first order: for white noise of relative RMS ``σ`` on layer
    ``l``'s output (scaled to each image's RMS there), the output moves by
    ``σ²·rms_l²·‖J_l‖²_F`` per image, with ``J_l`` the Jacobian of the output with respect to the
    layer's. A layer whose errors later layers wash out (or a residual branch next to a large
    identity) weighs little, one feeding the classifier directly weighs much.

    ``‖J_l‖²_F = E‖J_lᵀ v‖²`` for Gaussian ``v`` in output space (Hutchinson), so one backward
    pass of a random projection of the output gives every layer's term at once: the cost of about
    three forward passes, where adding noise to one layer at a time costs one pass per layer. A
    model that cannot be differentiated (an op without a gradient, a forward under ``no_grad``)
    falls back to that (:func:`noise_sensitivity`, which ``noise`` and the seed also drive).
    """
    try:
        return _jacobian_sensitivity(model, names, images, max_images, batch_size, seed)
    except (RuntimeError, _NoGradient):
        return noise_sensitivity(model, names, images, noise, max_images, batch_size, seed)


class _NoGradient(Exception):
    """The output does not depend differentiably on some layer's."""


BACKWARD_ELEMENTS = 1 << 20  # input numbers per backward chunk: its activations stay in memory


def _jacobian_sensitivity(model, names, images, max_images, batch_size, seed) -> dict[str, float]:
    moved = dict.fromkeys(names, 0.0)
    norm = 0.0
    device = next(model.parameters()).device
    probes: dict[str, list[torch.Tensor]] = {}
    scales: dict[str, list[torch.Tensor]] = {}
    shares: dict[str, list[torch.Tensor]] = {}

    def hook(mod, inp, out, name):  # a zero added to the output: its gradient is J_lᵀ v
        delta = torch.zeros_like(out, requires_grad=True)
        probes.setdefault(name, []).append(delta)
        scales.setdefault(name, []).append(out.detach().pow(2).flatten(1).mean(1))
        shares.setdefault(name, []).append(_mean_share(inp[0].detach()))
        return out + delta

    hooks = [
        model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: hook(m, i, o, n))
        for n in names
    ]
    try:
        for start, x in batches(images, batch_size)():
            x = x[: max(0, max_images - start)]  # the first max_images of the whole set
            if not len(x):
                break
            step = max(1, BACKWARD_ELEMENTS // max(1, x[0].numel()))
            for i in range(0, len(x), step):
                probes.clear()
                scales.clear()
                shares.clear()
                with torch.enable_grad():
                    out = model(x[i : i + step].to(device))
                    leaves = _comparable_leaves(out)
                    norm += sum(float(t.detach().double().square().sum()) for t in leaves)
                    dot = sum(
                        (t * _probe(t, start + i, k, seed)).sum() for k, t in enumerate(leaves)
                    )
                    wanted = [(n, k) for n in names for k in range(len(probes.get(n, [])))]
                    if not wanted or not isinstance(dot, torch.Tensor) or not dot.requires_grad:
                        raise _NoGradient
                    grads = torch.autograd.grad(
                        dot, [probes[n][k] for n, k in wanted], allow_unused=True
                    )
                for (n, k), g in zip(wanted, grads, strict=True):
                    if g is not None:
                        per_image = _moved(g.detach().double(), shares[n][k])
                        moved[n] += float((per_image * scales[n][k].double()).sum())
    finally:
        for h in hooks:
            h.remove()
        probes.clear()
    *totals, norm = shards.all_sum(*moved.values(), norm)  # under torchrun: every share's
    if norm == 0:
        return dict.fromkeys(names, 1.0)
    return {n: m / norm for n, m in zip(moved, totals, strict=True)}


def _mean_share(x: torch.Tensor) -> torch.Tensor:
    """Per image, the share of a conv input's energy that is constant over the image; 0 for
    other inputs. Each image's own: it does not depend on how images are batched or shared.

    A layer's approximation error is a fixed linear map of its input, so it is about as constant
    over the image as the input is: after ReLUs much of it is. Such an error survives global
    pooling whole, where white noise of the same size is averaged away.
    """
    if x.dim() != 4:
        return torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    x = x.double()
    total = x.square().sum((1, 2, 3)).clamp_min(1e-300)
    return x.mean((2, 3)).square().sum(1) * x.shape[2] * x.shape[3] / total


def _moved(g: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
    """Per image, ``‖J_lᵀ v‖²`` for an error whose ``share`` is constant over positions: the
    white part moves the output by ``Σ g²``, the constant part by ``Σ_c (Σ_p g_cp)²``."""
    white = g.square().flatten(1).sum(1)
    if g.dim() != 4:
        return white
    constant = g.sum((2, 3)).square().sum(1)
    share = share.to(g.device)
    return (1 - share) * white + share * constant


def _seeded(seed: int, image: int, k: int) -> torch.Generator:
    """The random stream of image number ``image`` (in the whole set) for draw ``k``: draws do
    not depend on how the images are batched or shared between processes."""
    return torch.Generator().manual_seed((seed * 1_000_003 + image) * 1_009 + k)


def _probe(t: torch.Tensor, first: int, k: int, seed: int) -> torch.Tensor:
    """A Gaussian probe shaped like output leaf ``k``, ``t``, drawn per image where ``t`` has
    one row per image of a batch whose first is image number ``first``."""
    if t.dim() == 0:
        rows = torch.randn((), generator=_seeded(seed, first, k), dtype=t.dtype)
    else:
        rows = torch.stack(
            [
                torch.randn(t.shape[1:], generator=_seeded(seed, first + b, k), dtype=t.dtype)
                for b in range(t.shape[0])
            ]
        )
    return rows.to(t.device)


def _comparable_leaves(out) -> list[torch.Tensor]:
    """The floating-point leaves of an output that compare element by element (detections,
    whose set depends on the data, left out), as :func:`squared_change` compares them."""
    leaves = flatten_output(out)
    sets = detection_sets(out)
    return [
        t for p, t in leaves.items()
        if t.is_floating_point() and not any(under(p, s) for s in sets)
    ]  # fmt: skip


@torch.no_grad()
def noise_sensitivity(
    model: nn.Module,
    names: list[str],
    images: torch.Tensor | Iterable,
    noise: float = SENSITIVITY_NOISE,
    max_images: int = SENSITIVITY_IMAGES,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, float]:
    """:func:`output_sensitivity` by perturbation: seeded Gaussian noise of relative RMS ``noise`` is added to one layer's output at a time (per
    image, scaled to that image's RMS), and the network's squared relative output change is
    measured on the first ``max_images`` images. Divided by ``noise²``, it is the factor that
    turns the layer's squared relative output error into the network's, to first order: a layer
    whose errors later layers wash out (or a residual branch next to a large identity) weighs
    little, one feeding the classifier directly weighs much.
    """
    moved = dict.fromkeys(names, 0.0)
    norm = 0.0
    device = next(model.parameters()).device
    for start, x in batches(images, batch_size)():
        x = x[: max(0, max_images - start)].to(device)  # the first max_images of the whole set
        if not len(x):
            break
        clean = model(x)  # any structure: summed over the leaves comparable element by element
        norm += squared_change(clean, clean)[1]
        for name in names:
            # noise drawn per image and layer (by name: the same whichever layers are priced)
            key = zlib.crc32(name.encode())

            def hook(mod, inp, out, k=key, first=start):
                rms = out.pow(2).flatten(1).mean(1).sqrt().view(-1, *([1] * (out.dim() - 1)))
                z = _probe(out, first, k, seed)
                if out.dim() == 4:  # the share of the error constant over positions, as above
                    share = _mean_share(inp[0]).to(out.dtype).view(-1, 1, 1, 1)
                    flat = _probe(out[:, :, :1, :1], first, k + 1, seed)
                    z = (1 - share).sqrt() * z + share.sqrt() * flat
                return out + noise * rms * z

            h = model.get_submodule(name).register_forward_hook(hook)
            try:
                moved[name] += squared_change(clean, model(x))[0]
            finally:
                h.remove()
    *totals, norm = shards.all_sum(*moved.values(), norm)  # under torchrun: every share's
    if norm == 0:
        return dict.fromkeys(names, 1.0)
    return {n: m / norm / noise**2 for n, m in zip(moved, totals, strict=True)}

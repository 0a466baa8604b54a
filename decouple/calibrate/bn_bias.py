"""Data-free bias correction from the model's own BatchNorm statistics (Nagel et al., ICCV 2019).

A factored layer computes ``Ŵ·x`` where the original computed ``W·x``. Over the data its output
is off on average by ``(W − Ŵ)·E[x]``, and a mean error is the part of a low-rank error that
every later layer carries forward whole (ReLUs shift, pooling keeps it, the logits drift
together). No image is needed to remove it: every BatchNorm keeps the running mean and variance
of its input, so its output over the training data has mean ``β`` and standard deviation
``|γ|·σ/√(σ² + ε)``, per channel. :func:`bn_input_means` draws every BatchNorm's output from
that Gaussian (a forward hook replaces the output; each BatchNorm draws its own noise, so nothing
upstream matters) and lets the network's own ops (activations, residual sums, padding, pooling)
carry it to each layer's input, where the per-channel mean is read. A layer whose input does
not come from BatchNorms (a stem reading the image) reads NaN, since the images fed are NaN, and
gets no statistic, as does one reached through a BatchNorm that never saw data (mean 0 and
variance 1 as built: an untrained model's). The draws are independent from pixel to pixel, real
activations are not quite: a max-pool raises the mean of independent draws more than that of
neighbours that move together, and not at all if they move as one (then it is their average).
During the pass a max-pool's output is halfway between the two, the mean of its max and its
average (on the digits demo, the real mean after its max-pool sat between the two as well).
:func:`correct_biases_` then adds to each factored layer's bias the mean over
output pixels of ``(W − Ŵ) ∗ μ`` on an input of the layer's size holding the means, so that
border pixels, whose taps partly read padding, count as they are.

Run :func:`bn_input_means` before BatchNorm folding: folding removes the statistics it reads.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from ..nn.discover import is_plain_layer
from ..nn.geometry import kernel_of
from .synthetic import tracked_batchnorms

SAMPLES = 32  # inputs drawn: at 32×32 a channel's mean then averages ≥ 2,048 draws
BATCH = 8  # inputs per forward pass (bounds the activations held at ImageNet size)


@dataclass(frozen=True)
class InputMeans:
    """A layer's input channel means, and the spatial size it reads them at (``()``: linear)."""

    mean: torch.Tensor  # (C,) float64
    size: tuple[int, ...]


@dataclass
class BiasCorrection:
    """What :func:`correct_biases_` did: layers corrected, layers left and why, and its cost."""

    layers: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    samples: int = SAMPLES  # the draws the means came from (bn_input_means' default)
    seconds: float = 0.0
    reason: str | None = None  # why nothing was corrected at all (no BatchNorm, ...)

    def to_dict(self) -> dict:
        return asdict(self)


def never_updated(m: nn.modules.batchnorm._BatchNorm) -> bool:
    """Whether ``m`` still holds the statistics it was built with (mean 0, variance 1): an
    untrained model's, which describe no data."""
    return bool((m.running_mean == 0).all() and (m.running_var == 1).all())


def _bn_noise_hook(gen: torch.Generator):
    def hook(m: nn.modules.batchnorm._BatchNorm, inputs, output: torch.Tensor) -> torch.Tensor:
        if never_updated(m):  # no statistics: what reads it gets none either
            return torch.full_like(output, float("nan"))
        var = m.running_var.double()
        scale = var / (var + m.eps)
        std = scale.sqrt() * (m.weight.double().abs() if m.weight is not None else 1.0)
        mean = m.bias.double() if m.bias is not None else torch.zeros_like(var)
        shape = (1, -1) + (1,) * (output.dim() - 2)
        z = torch.randn(output.shape, generator=gen, dtype=torch.float64)
        noise = mean.cpu().view(shape) + std.cpu().view(shape) * z
        return noise.to(output.dtype).to(output.device)

    return hook


_AVERAGES = {F.max_pool1d: F.avg_pool1d, F.max_pool2d: F.avg_pool2d, F.max_pool3d: F.avg_pool3d}
_ADAPTIVE = {
    F.adaptive_max_pool1d: F.adaptive_avg_pool1d,
    F.adaptive_max_pool2d: F.adaptive_avg_pool2d,
    F.adaptive_max_pool3d: F.adaptive_avg_pool3d,
}
_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode")


class _PoolsHalfway(TorchFunctionMode):
    """Max-pooling as the mean of the max and the average of the same windows (see the module's
    docstring). A dilated max-pool, which no average pool matches, and one asked for its indices
    (torch calls ``max_pool2d_with_indices`` then: what reads them needs the max) stay as they
    are."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ADAPTIVE:
            a = {**dict(zip(("input", "output_size"), args, strict=False)), **kwargs}
            average = _ADAPTIVE[func](a["input"], a["output_size"])
        elif func in _AVERAGES:
            a = {**dict(zip(_POOL_ARGS, args, strict=False)), **kwargs}
            if not all(d == 1 for d in _tuple(a.get("dilation", 1))):
                return func(*args, **kwargs)
            average = _AVERAGES[func](
                a["input"], a["kernel_size"], a.get("stride"), a.get("padding", 0),
                a.get("ceil_mode", False), count_include_pad=False,
            )  # fmt: skip
        else:
            return func(*args, **kwargs)
        return (func(*args, **kwargs) + average) / 2


def _tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _channel_sum(x: torch.Tensor, linear: bool) -> torch.Tensor:
    """Sum over everything but the channel axis (a linear layer's last, a conv's second)."""
    x = x.detach().double()
    return (x.reshape(-1, x.shape[-1]) if linear else x.transpose(0, 1).flatten(1).T).sum(0)


@torch.no_grad()
def bn_input_means(
    model: nn.Module,
    input_shape: tuple[int, ...],
    samples: int = SAMPLES,
    seed: int = 0,
) -> dict[str, InputMeans]:
    """Mean of every input channel of every conv and linear layer of ``model``, when each
    BatchNorm's output follows its running statistics.

    Parameters
    ----------
    model : nn.Module
        In eval mode, BatchNorms not folded yet. Not changed.
    input_shape : tuple of int
        One input's shape ``(C, H, W)``.
    samples : int
        Inputs pushed through (in batches of :data:`BATCH`).
    seed : int
        Seed of the Gaussian draws.

    Returns
    -------
    dict of str to InputMeans
        Only for layers all of whose input channels come from BatchNorms; empty when the model
        has none (or its forward pass fails on the draws).
    """
    norms = tracked_batchnorms(model)
    if not norms:
        return {}
    gen = torch.Generator().manual_seed(seed)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    sizes: dict[str, tuple[int, ...]] = {}

    def record(name: str, linear: bool):
        def pre(m, inputs) -> None:
            x = inputs[0]
            s = _channel_sum(x, linear)
            sums[name] = sums[name] + s if name in sums else s
            counts[name] = counts.get(name, 0) + x.numel() // x.shape[-1 if linear else 1]
            sizes.setdefault(name, () if linear else tuple(x.shape[2:]))

        return pre

    hooks = [m.register_forward_hook(_bn_noise_hook(gen)) for m in norms]
    hooks += [
        m.register_forward_pre_hook(record(n, isinstance(m, nn.Linear)))
        for n, m in model.named_modules()
        if is_plain_layer(m)
    ]
    p = next(model.parameters())
    try:
        with _PoolsHalfway():
            for start in range(0, samples, BATCH):
                n = min(BATCH, samples - start)
                # NaN images: a layer reading them (not through a BatchNorm) gets no statistic
                model(torch.full((n, *input_shape), float("nan"), dtype=p.dtype, device=p.device))
    except Exception:  # noqa: BLE001 - a forward pass the draws break: no statistics at all
        return {}
    finally:
        for h in hooks:
            h.remove()
    means = {n: InputMeans(s / counts[n], sizes[n]) for n, s in sums.items()}
    return {n: m for n, m in means.items() if bool(torch.isfinite(m.mean).all())}


def _mean_shift(original: nn.Module, layer: nn.Module, means: InputMeans) -> torch.Tensor:
    """The mean error of ``layer`` against ``original`` per output channel, over the output
    pixels of an input of ``means.size`` holding the means (padding read as the conv reads it)."""
    w = kernel_of(original).detach().double()
    delta = w - layer.reconstructed_weight().detach().double().reshape(w.shape)
    if isinstance(original, nn.Linear):
        return delta.flatten(1) @ means.mean.to(delta)
    x = means.mean.to(delta).view(1, -1, *(1,) * len(means.size)).expand(1, -1, *means.size)
    return original._conv_forward(x.contiguous(), delta, None).mean((0, 2, 3))


@torch.no_grad()
def correct_biases_(
    model: nn.Module,
    originals: dict[str, nn.Module],
    means: dict[str, InputMeans],
) -> BiasCorrection:
    """Add ``(W − Ŵ)·μ`` to the bias of every factored layer of ``model``; in place.

    Parameters
    ----------
    model : nn.Module
        After decoupling.
    originals : dict of str to nn.Module
        ``{name: the conv or linear layer it replaced}`` (what ``W`` is read from; a fused
        layer's is the fused conv).
    means : dict of str to InputMeans
        Each layer's input channel means (:func:`bn_input_means`, keyed as the layer now reads
        its input: a fused conv by the first conv of its pair).
    """
    start = time.perf_counter()
    done = BiasCorrection()
    for name, original in originals.items():
        layer = model.get_submodule(name)
        if layer is original or not hasattr(layer, "reconstructed_weight"):
            continue  # kept, or pruned: nothing approximated by a factorization
        if name not in means:
            done.skipped[name] = "no BatchNorm statistics for its input"
        elif getattr(layer, "bias", None) is None:
            done.skipped[name] = "no bias to correct (BatchNorm not folded into it)"
        else:
            shift = _mean_shift(original, layer, means[name])
            layer.bias.add_(shift.to(layer.bias))
            done.layers.append(name)
    done.seconds = time.perf_counter() - start
    return done


def bias_correction_line(bias: dict) -> str:
    """The report's line on the data-free bias correction (:mod:`decouple.calibrate.bn_bias`)."""
    if bias.get("reason"):
        return f"bias correction: none ({bias['reason']}; --calib refits biases on images)"
    line = (
        f"bias correction: {len(bias['layers'])} factored layers given back the mean error of "
        f"their approximation, from the model's BatchNorm statistics (data-free: "
        f"{bias['samples']} noise draws, {bias['seconds']:.2f} s; --no-bias-correction to skip)"
    )
    if bias["skipped"]:
        why: dict[str, int] = {}
        for reason in bias["skipped"].values():
            why[reason] = why.get(reason, 0) + 1
        line += "; left as factored: " + ", ".join(f"{n} ({r})" for r, n in why.items())
    return line

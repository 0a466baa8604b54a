"""Calibration images made from the model's own statistics, for users who have none (ZeroQ).

Cai et al., "ZeroQ: A Novel Zero Shot Quantization Framework" (CVPR 2020): every BatchNorm keeps
the running mean and variance of its input over the training data. Inputs whose batch statistics
at every BatchNorm match those running ones look like training data to the network, layer by
layer, which is what calibration needs (each layer's input second moments). Starting from
Gaussian noise, the pixels are optimized by Adam on

    Σ_BN  ‖μ_batch − μ_running‖² / C  +  ‖σ_batch − σ_running‖² / C

with the weights frozen and no labels. The model must hold its BatchNorm layers (run this
before folding them into the convs).

Each made image is then also used mirrored left to right (:func:`with_mirrors`): vision networks
are trained on randomly mirrored images (every ImageNet and CIFAR recipe), so a mirror is as
likely an input as its image, and it doubles the calibration set for nothing where making twice
as many images costs twice the minutes. Pass ``mirror=False`` for a model that was not (text,
digits).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..nn.progress import progress_bar

STEPS = 200  # Adam steps per batch: ZeroQ's loss has flattened by then on CIFAR ResNets
LEARNING_RATE = 0.1


@dataclass
class Synthesized:
    """What :func:`synthesize_images` made, and what it cost."""

    count: int
    steps: int
    seed: int
    seconds: float
    bn_layers: int
    loss_before: float  # the BatchNorm statistics loss of the starting noise, per batch (mean)
    loss_after: float
    mirrored: bool = False  # the made images were followed by their mirrors (2 × count in all)

    def to_dict(self) -> dict:
        return asdict(self)


def tracked_batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        and m.running_mean is not None
    ]  # fmt: skip


def bn_statistics_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ZeroQ's loss of the batch ``x``: how far every BatchNorm's batch statistics are from its
    running ones (mean over the layers)."""
    norms = tracked_batchnorms(model)
    if not norms:
        raise ValueError("the model has no BatchNorm with running statistics to match")
    terms: list[torch.Tensor] = []

    def hook(m, inputs, output) -> None:
        a = inputs[0].transpose(0, 1).flatten(1)  # (C, everything else)
        mean, var = a.mean(1), a.var(1, unbiased=False)
        std = (var + m.eps).sqrt()
        run_std = (m.running_var + m.eps).sqrt()
        terms.append(((mean - m.running_mean) ** 2).mean() + ((std - run_std) ** 2).mean())

    handles = [m.register_forward_hook(hook) for m in norms]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(terms).mean()


def with_mirrors(x: torch.Tensor) -> torch.Tensor:
    """The images ``x`` ``(n, ..., W)``, then each mirrored left to right (the last axis).

    Image ``i``'s mirror is image ``n + i``: when ``n`` is a multiple of 8, an image and its
    mirror fall on the same side of every held-out split that takes every 2nd, 4th or 8th image
    (calibration's and ``--max-change``'s), so no held-out image has its mirror calibrated on.
    """
    if x.dim() < 2:
        raise ValueError(f"mirroring needs images of at least 2 axes; got shape {tuple(x.shape)}")
    return torch.cat([x, x.flip(-1)])


def synthesize_images(
    model: nn.Module,
    input_shape: tuple[int, ...],
    count: int = 256,
    steps: int = STEPS,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
    mirror: bool = True,
) -> tuple[torch.Tensor, Synthesized]:
    """``count`` inputs of ``input_shape`` whose BatchNorm statistics match the model's own, then
    (``mirror``) each mirrored left to right.

    Parameters
    ----------
    model : nn.Module
        In eval mode, with its BatchNorm layers (not folded yet). Its weights do not change.
    input_shape : tuple of int
        One input's ``(C, H, W)``, preprocessed as the model expects (the result is in the
        model's input space: no further normalisation applies).
    count, steps, seed, batch_size
        How many inputs, Adam steps per batch, the seed of the starting noise, and how many
        are optimized together (each batch matches the statistics on its own, as in ZeroQ).
    mirror : bool
        Follow the made inputs by their mirrors (:func:`with_mirrors`; images only, inputs of
        ``(C, H, W)`` with ``W > 1``). Off for a model not trained on mirrored images.

    Returns
    -------
    (torch.Tensor, Synthesized)
        The inputs ``(count, *input_shape)``, or ``(2 · count, *input_shape)`` mirrored, and
        what it took.
    """
    if count < 1 or steps < 0 or batch_size < 1:
        raise ValueError(f"count and batch_size must be >= 1, steps >= 0; got {count}, "
                         f"{batch_size}, {steps}")  # fmt: skip
    if model.training:
        raise ValueError("synthesize_images needs the model in eval mode (model.eval())")
    norms = tracked_batchnorms(model)
    if not norms:
        raise ValueError("the model has no BatchNorm with running statistics to match")
    p = next(model.parameters())
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    grads = {q: q.requires_grad for q in model.parameters()}
    out, before, after = [], [], []
    try:
        for q in grads:
            q.requires_grad_(False)  # only the pixels move
        bar = progress_bar(total=count, desc="synthesizing images", enabled=progress, unit="img")
        for lo in range(0, count, batch_size):
            n = min(batch_size, count - lo)
            x = torch.randn((n, *input_shape), generator=gen, dtype=p.dtype).to(p.device)
            x.requires_grad_(True)
            opt = torch.optim.Adam([x], lr=LEARNING_RATE)
            with torch.no_grad():
                before.append(float(bn_statistics_loss(model, x)))
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                loss = bn_statistics_loss(model, x)
                loss.backward()
                opt.step()
            with torch.no_grad():
                after.append(float(bn_statistics_loss(model, x)))
            out.append(x.detach())
            bar.update(n)
        bar.close()
    finally:
        for q, g in grads.items():
            q.requires_grad_(g)
    mirror = mirror and can_mirror(input_shape)
    info = Synthesized(
        count, steps, seed, time.perf_counter() - start, len(norms),
        sum(before) / len(before), sum(after) / len(after), mirror,
    )  # fmt: skip
    x = torch.cat(out)
    return (with_mirrors(x) if mirror else x), info


def can_mirror(input_shape: tuple[int, ...]) -> bool:
    """Whether inputs of ``input_shape`` (one input's) are images with a width to mirror (a
    signal's time axis is not mirrored: reversed speech is no likely input)."""
    return len(input_shape) >= 3 and input_shape[-1] > 1


def synthetic_line(made: dict) -> str:
    """The report's line for ``--calib synthetic``: ``made`` is :class:`Synthesized`'s dict, with
    ``cached`` (the file the images were read back from, or None)."""
    return (
        f"calibration images: {made['count']} synthesized from the model's BatchNorm "
        f"statistics (ZeroQ, {made['steps']} steps, {made['seconds']:.1f} s; statistics "
        f"loss {made['loss_before']:.3g} -> {made['loss_after']:.3g})"
        + ("; each also used mirrored (--no-mirror to skip)" if made.get("mirrored") else "")
        + (f"; read back from the cache {made['cached']}" if made.get("cached") else "")
    )

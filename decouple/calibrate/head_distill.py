"""A pruned head refit jointly against the network's own output: a few hundred gradient steps.

Calibration refits each changed layer alone, in closed form, on that layer's output
(:mod:`decouple.calibrate.layerwise`). A pruned chain (:mod:`decouple.surgery.chains`) is the one
place where that falls short: the producer keeps a few of its channels and the consumer is refit
on them, but the two are joined by a nonlinearity (ReLU6, pooling), so no closed form fits them
together, and neither fit looks at what the layers after them make of the error. Where the chain
sits in the network's head (everything from the producer's input on reads nothing else: the
MobileNet/EfficientNet head conv → pool → classifier), that head is a small network of its own.
Its inputs on the calibration images are cached once, and its parameters (the producer, the
consumer and every layer after them) are fit by Adam to the original network's outputs on the
same images: the Kullback–Leibler divergence of the predicted class distribution for logits
(distillation, Hinton et al. 2015, with no labels), else the relative squared error. One image in
eight is held out; the parameters kept are those of the step with the lowest held-out loss, and
the layers stay as calibrated if no step beats them. Nothing before the cut changes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import fx, nn
from torch.nn import functional as F

from ..surgery.chains import LeafTracer
from .layerwise import holdout_mask
from .stream import _capture, batches

STEPS = 1000  # Adam steps: on the shared MobileNetV2-style net the held-out loss flattens by then
LEARNING_RATE = 1e-3
BATCH = 128
CHECK_EVERY = 50  # steps between held-out checks
HOLDOUT = 8  # every 8th image is held out
MIN_IMAGES = 16
EXACT = 1e-8  # a held-out loss this low is rounding: the head is exact, nothing to tune
MIN_GAIN = 0.01
MAX_BYTES = 1 << 29  # cached head inputs and targets: at most 512 MiB (later images unused)


@dataclass
class HeadDistillation:
    """What :func:`distill_head_` did: the layers it tuned and the held-out loss before and after."""

    start: str  # the cut: this layer's input
    layers: list[str] = field(default_factory=list)
    loss: str = ""  # "kl" (class logits) or "relative squared error"
    images: int = 0  # fit on
    held_out: int = 0
    loss_before: float = 0.0
    loss_after: float = 0.0
    agreement_before: float | None = None  # held-out top-1 agreement with the original (logits)
    agreement_after: float | None = None
    best_step: int = 0  # 0: no step beat the calibrated layers, which are kept
    steps: int = 0
    seconds: float = 0.0
    skipped: str | None = None  # why nothing was tuned

    def to_dict(self) -> dict:
        return asdict(self)


def head_graph(
    model: nn.Module, start: str, graph: fx.Graph | None = None
) -> fx.GraphModule | None:
    """The part of ``model`` from the input of layer ``start`` to its output, as a module of its
    own that shares ``model``'s layers; None unless that part reads nothing else (a residual
    from before the cut, a second input) and calls no module that also runs before it.
    ``graph``: the model's trace by :class:`LeafTracer`, when the caller has it."""
    if graph is None:
        graph = _trace(model)
    if graph is None:
        return None
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == start]
    if len(calls) != 1 or len(calls[0].args) != 1 or calls[0].kwargs:
        return None
    cut = calls[0].args[0]
    if not isinstance(cut, fx.Node):
        return None
    after: set[fx.Node] = set()
    for n in graph.nodes:
        if any(a is cut or a in after for a in n.all_input_nodes):
            after.add(n)
    for n in after:
        if any(a is not cut and a not in after and a.op != "get_attr" for a in n.all_input_nodes):
            return None
    if not any(n.op == "output" for n in after):
        return None
    modules = {n.target for n in after if n.op == "call_module"}
    if modules & {n.target for n in graph.nodes if n.op == "call_module" and n not in after}:
        return None
    head = fx.Graph()
    env = {cut: head.placeholder("x")}
    for n in graph.nodes:
        if n in after or (n.op == "get_attr" and any(u in after for u in n.users)):
            env[n] = head.node_copy(n, lambda a: env[a])
    return fx.GraphModule(model, head).eval()


def _trace(model: nn.Module) -> fx.Graph | None:
    try:
        return LeafTracer().trace(model)
    except Exception:  # noqa: BLE001 - an untraceable model has no head to cut
        return None


def _loss(out: torch.Tensor, target: torch.Tensor, kl: bool) -> torch.Tensor:
    if kl:
        return F.kl_div(
            F.log_softmax(out, 1), F.log_softmax(target, 1), log_target=True, reduction="batchmean"
        )
    return (out - target).square().sum() / target.square().sum().clamp_min(1e-30)


@torch.no_grad()
def _cache(model, reference, start, images, batch_size) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's inputs on ``model`` and the original's outputs, image by image, up to
    :data:`MAX_BYTES`. Every process reads all images: each tunes alike."""
    layer = model.get_submodule(start)
    device = next(model.parameters()).device
    xs, ys, used = [], [], 0
    for _, x in batches(images, batch_size, shard=False)():
        x = x.to(device)
        a = _capture(layer, lambda x=x: model(x), "input").detach()
        y = reference(x)
        if not isinstance(y, torch.Tensor):
            raise TypeError("the model's output is not one tensor")
        used += a.numel() * a.element_size() + y.numel() * y.element_size()
        if used > MAX_BYTES and xs:
            break
        xs.append(a)
        ys.append(y.detach())
    return torch.cat(xs), torch.cat(ys)


def distill_head_(
    model: nn.Module,
    reference: nn.Module,
    images: torch.Tensor | Iterable,
    starts: list[str],
    steps: int = STEPS,
    lr: float = LEARNING_RATE,
    seed: int = 0,
    batch_size: int = 32,
) -> HeadDistillation | None:
    """Tune the head of ``model`` from the last of ``starts`` whose input cuts it off.

    Parameters
    ----------
    model : nn.Module
        The compressed, calibrated network; changed in place (after the cut only).
    reference : nn.Module
        The original network (BatchNorms folded as in ``model``): its outputs are the targets.
    images : torch.Tensor or iterable
        The calibration images, as :func:`~decouple.calibrate.layerwise.calibrate_` takes them.
    starts : list of str
        Candidate cuts: the producers of the pruned chains (the latest that cuts is taken).
    steps, lr, seed
        Adam steps and step size, and the seed of the mini-batch draws.

    Returns
    -------
    HeadDistillation or None
        None when no candidate cuts the network (no layer was tuned).
    """
    graph = _trace(model)  # once: every candidate cut reads it
    cuts = {s: head_graph(model, s, graph) for s in starts} if graph is not None else {}
    heads = {s: g for s, g in cuts.items() if g is not None}
    if not heads:
        return None
    # The latest cut: the smallest head. On the MobileNetV2-style net at 2.5× the earliest took
    # in 23 of its layers, 8 times the seconds, and kept less of the original's top-1.
    start = min(heads, key=lambda s: len(heads[s].graph.nodes))
    head = heads[start]
    clock = time.perf_counter()
    called = {n.target for n in head.graph.nodes if n.op == "call_module"}
    layers = sorted(t for t in called if any(True for _ in head.get_submodule(t).parameters()))
    done = HeadDistillation(start, layers, steps=steps)
    try:
        x, y = _cache(model, reference, start, images, batch_size)
    except TypeError as e:
        done.skipped = str(e)
        return done
    kl = y.dim() == 2 and y.is_floating_point()
    done.loss = "kl" if kl else "relative squared error"
    held = holdout_mask(len(x), 1 / HOLDOUT)  # as calibration holds out: every 8th image
    if len(x) < MIN_IMAGES:
        done.skipped = f"{len(x)} images (fewer than {MIN_IMAGES})"
        return done
    fx_, fy, hx, hy = x[~held], y[~held], x[held], y[held]
    done.images, done.held_out = len(fx_), len(hx)
    tuned = (p for t in layers for p in head.get_submodule(t).parameters())
    params = list({id(p): p for p in tuned if p.is_floating_point()}.values())
    grads = [p.requires_grad for p in params]
    start_state = [p.detach().clone() for p in params]

    @torch.no_grad()
    def held_out() -> tuple[float, float | None]:
        out = head(hx)
        agree = float((out.argmax(1) == hy.argmax(1)).float().mean()) if kl else None
        return float(_loss(out, hy, kl)), agree

    done.loss_before, done.agreement_before = held_out()
    if done.loss_before < EXACT:
        done.skipped = "its outputs already match the original's"
        done.loss_after, done.agreement_after = done.loss_before, done.agreement_before
        done.seconds = time.perf_counter() - clock
        return done
    # Adam's steps are as long on a flat loss as on a steep one: a step must gain 1 % to count.
    best, best_state = done.loss_before * (1 - MIN_GAIN), start_state
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    try:
        for p in params:
            p.requires_grad_(True)
        for step in range(1, steps + 1):
            idx = torch.randint(0, len(fx_), (min(BATCH, len(fx_)),), generator=gen)
            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                _loss(head(fx_[idx]), fy[idx], kl).backward()
            opt.step()
            if step % CHECK_EVERY == 0 or step == steps:
                loss, _ = held_out()
                if loss < best:
                    best, done.best_step = loss, step
                    best_state = [p.detach().clone() for p in params]
    finally:
        with torch.no_grad():
            for p, v, g in zip(params, best_state, grads, strict=True):
                p.copy_(v)
                p.requires_grad_(g)
    done.loss_after, done.agreement_after = held_out()
    done.seconds = time.perf_counter() - clock
    return done


def head_line(d: dict) -> str:
    """The report's line on :func:`distill_head_`."""
    if d.get("skipped"):
        return f"head distillation: none from {d['start']} ({d['skipped']})"
    agree = ""
    if d.get("agreement_before") is not None:
        agree = (f"; held-out top-1 agreement {100 * d['agreement_before']:.2f} -> "
                 f"{100 * d['agreement_after']:.2f} %")  # fmt: skip
    kept = "" if d["best_step"] else " (no step beat the calibrated layers: kept)"
    return (
        f"head distillation: {len(d['layers'])} layers from {d['start']} on fit to the original's "
        f"outputs ({d['loss']}, {d['images']} images, best of {d['steps']} steps, "
        f"{d['seconds']:.1f} s; --no-distill-head to skip): held-out loss {d['loss_before']:.4g} "
        f"-> {d['loss_after']:.4g}{agree}{kept}"
    )

"""The fastest exact realization of every factored layer, measured where the model will run.

A decoupled layer can run as several graphs that compute the same function
(:data:`decouple.nn.decoupled.REALIZATIONS`; a CP layer as four ops or three,
:data:`decouple.nn.factorized.CP_REALIZATIONS`); which is fastest depends on the runtime, the device and
the input shape, and sometimes none beats the dense conv it replaced (depthwise convs are
memory-bound). :func:`choose_realizations_` times every candidate on the layer's real input,
interleaved over a few rounds, keeps the fastest, and puts the original conv back where nothing
beats it by a margin ("kept: not faster"). The margin (``min_gain``, 5 % by default) is the noise
floor of such timings: a layer that is only as fast as its conv would cost accuracy for nothing,
and a win inside the noise is not a win.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..nn.decoupled import REALIZATIONS, DecoupledConv2d
from ..nn.factorized import CP_REALIZATIONS, CPConv2d
from ..nn.progress import progress_bar
from ..nn.transaction import in_place
from ..surgery.methods import is_factored
from .latency import LatencyConfig, capture_inputs, fastest, prepare, side_by_side

ORIGINAL = "original"
AS_IS = "as is"  # Tucker and low-rank layers have one realization
CALL_OVERHEAD = "call overhead"  # an identity, timed to take the runtime's fixed cost off
# Realizations that run more multiply-adds than the plan priced (a CP layer's square depthwise
# conv does kh·kw per term where the separable pair does kh + kw): never where FLOPs are the ask.
ADDS_FLOPS = ("square",)
# Every realization name of every layer kind (none is shared between kinds).
ALL_REALIZATIONS = (*dict.fromkeys(r for rs in REALIZATIONS.values() for r in rs), *CP_REALIZATIONS)


def realization_names(layer: nn.Module) -> tuple[str, ...]:
    """The realizations ``layer`` can run as; empty where it has one way only."""
    if isinstance(layer, DecoupledConv2d):
        return REALIZATIONS[layer.order]
    if isinstance(layer, CPConv2d):
        return CP_REALIZATIONS if layer.spatial == "separable" else ()  # full: square only
    return ()


def realizations(layer: nn.Module) -> dict[str, nn.Module]:
    """Every realization of ``layer``, as shallow copies sharing its parameters."""
    names = realization_names(layer)
    if not names:
        return {AS_IS: layer}
    out = {}
    for name in names:
        twin = copy.copy(layer)  # own ``realization`` attribute, same parameters and submodules
        out[name] = twin.set_realization(name)
    return out


@dataclass
class RealizationChoice:
    """What was timed for one layer (best median per candidate, ms) and what was kept."""

    name: str
    chosen: str
    times_ms: dict[str, float]
    min_gain: float = 0.0

    @property
    def original_ms(self) -> float:
        return self.times_ms[ORIGINAL]

    @property
    def best_ms(self) -> float:
        return self.times_ms[self.chosen]

    def reason(self) -> str:
        if self.chosen == ORIGINAL:
            others = {k: v for k, v in self.times_ms.items() if k != ORIGINAL}
            k = min(others, key=others.get)
            margin = f" - {self.min_gain:.0%}" if self.min_gain else ""
            return (
                f"kept: not faster (best realization {k} {others[k]:.3f} ms "
                f"> original {self.original_ms:.3f} ms{margin})"
            )
        return f"{self.chosen}: {self.best_ms:.3f} ms vs original {self.original_ms:.3f} ms"

    def to_dict(self) -> dict:
        return asdict(self)


def time_candidates(
    candidates: dict[str, nn.Module],
    x: torch.Tensor,
    runtime: str = "eager",
    rounds: int = 3,
    min_run_time: float = 0.05,
    threads: int | None = None,
) -> dict[str, float]:
    """Best median (ms) of each module on input ``x`` in ``runtime``, net of the call overhead.

    A module timed alone pays the runtime's fixed cost of a call (PyTorch's dispatch, ONNX
    Runtime's ``run`` and input binding: about 8 and 25 µs on this project's CPU), which the
    layers of one model pay once in all. So an identity module is timed alongside, in the same
    interleaved rounds, and its time is taken off every candidate's. At ImageNet sizes that is
    noise; for a CIFAR ResNet at batch 1 it is a third of a layer's time, and left in, the
    layers' times add up to more than the whole model's.
    """
    prepared = {k: prepare(m, x, runtime, threads) for k, m in candidates.items()}
    prepared[CALL_OVERHEAD] = prepare(nn.Identity(), x, runtime, threads)
    times = fastest(prepared, rounds, min_run_time, threads)
    overhead = times.pop(CALL_OVERHEAD)
    return {k: max(t - overhead, 1e-6) for k, t in times.items()}


def factored_names(model: nn.Module) -> list[str]:
    """Names of the factored layers of ``model`` (not the convs inside them)."""
    names, inside = [], []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if is_factored(m):
            names.append(name)
            inside.append(name)
    return names


@in_place()  # all or nothing: a failed timing leaves the model as it was
def choose_realizations_(
    model: nn.Module,
    originals: dict[str, nn.Conv2d],
    example: torch.Tensor,
    runtime: str = "eager",
    rounds: int = 3,
    min_run_time: float = 0.05,
    threads: int | None = None,
    progress: bool = False,
    min_gain: float = 0.05,
    restore: bool = True,
    keep_flops: bool = False,
) -> dict[str, RealizationChoice]:
    """Give every factored layer of ``model`` its fastest realization, in place.

    Parameters
    ----------
    model : nn.Module
        A decoupled model in eval mode, on the device to time on.
    originals : dict of str to nn.Conv2d
        The conv each factored layer replaced (after BN folding), by module name. A layer whose
        realizations are all slower than its original gets the original back; layers without an
        entry are only given their fastest realization.
    example : torch.Tensor
        The batch the model will run on (its shape decides the timings).
    runtime : {"eager", "channels-last", "onnxruntime"}
    rounds, min_run_time : int, float
        Interleaved rounds per layer and seconds per timing.
    min_gain : float
        A realization replaces the original only if it takes at most ``1 - min_gain`` of its time.
    restore : bool
        Whether a layer nothing beats gets its original conv back. False where the plan is the
        user's ask (a FLOPs budget: putting convs back would spend FLOPs the budget does not
        have); the original is still timed, so the report shows what each layer costs.
    keep_flops : bool
        Only realizations with the FLOPs the plan counted (not :data:`ADDS_FLOPS`): a FLOPs
        budget's model must still meet it.

    Returns
    -------
    dict of str to RealizationChoice
        Per layer: the times of every candidate and the one kept.
    """
    names = factored_names(model)
    inputs = capture_inputs(model, names, example)
    choices = {}
    for name in progress_bar(names, desc="timing realizations", enabled=progress, unit="layer"):
        layer = model.get_submodule(name)
        candidates = realizations(layer)
        if keep_flops:
            candidates = {k: m for k, m in candidates.items() if k not in ADDS_FLOPS}
        if name in originals:
            candidates[ORIGINAL] = originals[name]
        times = time_candidates(candidates, inputs[name], runtime, rounds, min_run_time, threads)
        chosen = min((k for k in times if k != ORIGINAL), key=times.get)
        if restore and ORIGINAL in times and times[chosen] > (1 - min_gain) * times[ORIGINAL]:
            chosen = ORIGINAL
        if chosen == ORIGINAL:
            model.set_submodule(name, originals[name])
        elif realization_names(layer):
            layer.set_realization(chosen)
        choices[name] = RealizationChoice(name, chosen, times, min_gain)
    return choices


@in_place()  # all or nothing: a failed timing leaves the model as it was
def confirm_on_model_(
    model: nn.Module,
    choices: dict[str, RealizationChoice],
    example: torch.Tensor,
    runtime: str = "eager",
    rounds: int = 2,
    min_run_time: float = 0.3,
    threads: int | None = None,
) -> dict[str, float]:
    """Check the per-layer choice on the whole model; switch to a uniform one where that is faster.

    Layers timed alone miss what happens between them: a runtime that keeps a chain of convs in
    a blocked layout (ONNX Runtime's NCHWc, oneDNN) pays a layout conversion at every layer that
    leaves it, which a layer's own timing barely shows. So the whole model is timed as chosen
    per layer and, for every realization ``R``, with ``R`` in every layer where ``R`` itself
    beat the original conv by the same margin (the other layers as chosen); the fastest is kept.
    No layer is ever given a realization that lost to its original conv.

    Parameters
    ----------
    model : nn.Module
        The model after :func:`choose_realizations_`, changed in place.
    choices : dict of str to RealizationChoice
        Its result; updated to the realizations kept.
    example, runtime, rounds, min_run_time, threads
        As :func:`choose_realizations_`, for whole-model timings.

    Returns
    -------
    dict of str to float
        Best median (ms) of each whole-model configuration: ``"per layer"`` and ``"R where
        faster"`` for each realization ``R``; the fastest is the one applied.
    """
    configs: dict[str, dict[str, str]] = {"per layer": {}}
    for real in ALL_REALIZATIONS:
        switch = {}
        for name, c in choices.items():
            t = c.times_ms.get(real)
            if real not in realization_names(model.get_submodule(name)):
                continue  # e.g. a full-kernel CP layer (calibration's choice): square only
            if c.chosen not in (ORIGINAL, AS_IS) and t is not None and c.chosen != real:
                if t <= (1 - c.min_gain) * c.original_ms:
                    switch[name] = real
        if switch:
            configs[f"{real} where faster"] = switch
    if len(configs) == 1:
        return {}
    twins = {}
    for key, switch in configs.items():
        twins[key] = twin = copy.deepcopy(model)
        for name, real in switch.items():
            twin.get_submodule(name).set_realization(real)
    # As a latency plan is timed: interleaved rounds of half ``min_run_time``, each model prepared
    # twice (an ONNX Runtime session can run a few per cent off for as long as it lives).
    config = LatencyConfig(runtime=runtime, min_run_time=min_run_time, threads=threads)
    measured = side_by_side(twins, example, config, rounds=2 * rounds)
    times = {k: v.median_ms for k, v in measured.items()}
    best = min(times, key=times.get)
    for name, real in configs[best].items():
        model.get_submodule(name).set_realization(real)
        choices[name].chosen = real
    return times

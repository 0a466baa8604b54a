"""The fastest exact realization of every factored layer, measured where the model will run.

A decoupled layer can run as several graphs that compute the same function
(:data:`decouple.layers.REALIZATIONS`); which is fastest depends on the runtime, the device and
the input shape, and sometimes none beats the dense conv it replaced (depthwise convs are
memory-bound). :func:`choose_realizations_` times every candidate on the layer's real input,
interleaved over a few rounds, keeps the fastest, and puts the original conv back where nothing
beats it ("kept: not faster").
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .latency import capture_inputs, fastest, prepare
from .layers import REALIZATIONS, DecoupledConv2d
from .methods import is_factored

ORIGINAL = "original"
AS_IS = "as is"  # CP and Tucker layers have one realization


def realizations(layer: nn.Module) -> dict[str, nn.Module]:
    """Every realization of ``layer``, as shallow copies sharing its parameters."""
    if not isinstance(layer, DecoupledConv2d):
        return {AS_IS: layer}
    out = {}
    for name in REALIZATIONS[layer.order]:
        twin = copy.copy(layer)  # own ``realization`` attribute, same parameters and submodules
        out[name] = twin.set_realization(name)
    return out


@dataclass
class RealizationChoice:
    """What was timed for one layer (best median per candidate, ms) and what was kept."""

    name: str
    chosen: str
    times_ms: dict[str, float]

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
            return (
                f"kept: not faster (best realization {k} {others[k]:.3f} ms "
                f">= original {self.original_ms:.3f} ms)"
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
    """Best median (ms) of each module on input ``x`` in ``runtime``."""
    prepared = {k: prepare(m, x, runtime, threads) for k, m in candidates.items()}
    return fastest(prepared, rounds, min_run_time, threads)


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


def choose_realizations_(
    model: nn.Module,
    originals: dict[str, nn.Conv2d],
    example: torch.Tensor,
    runtime: str = "eager",
    rounds: int = 3,
    min_run_time: float = 0.05,
    threads: int | None = None,
    progress: bool = False,
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

    Returns
    -------
    dict of str to RealizationChoice
        Per layer: the times of every candidate and the one kept.
    """
    names = factored_names(model)
    inputs = capture_inputs(model, names, example)
    choices = {}
    for name in tqdm(names, desc="timing realizations", disable=not progress, leave=False):
        layer = model.get_submodule(name)
        candidates = realizations(layer)
        if name in originals:
            candidates[ORIGINAL] = originals[name]
        times = time_candidates(candidates, inputs[name], runtime, rounds, min_run_time, threads)
        chosen = min(times, key=times.get)
        if chosen == ORIGINAL:
            model.set_submodule(name, originals[name])
        elif isinstance(layer, DecoupledConv2d):
            layer.set_realization(chosen)
        choices[name] = RealizationChoice(name, chosen, times)
    return choices

"""A plan's predicted speedup from the latency cost model, for every report.

Measuring a plan's latency (``--latency``) exports and times both models; the cost model
(:mod:`decouple.runtime.cost_model`) predicts it from one forward pass on the ``meta`` device
(shapes only, no arithmetic), so every report can say whether the plan is expected to run
faster, and a FLOPs plan predicted slower than the original says so in one line.

The cost model comes from ``$DECOUPLE_COST_MODEL`` (a JSON file of one ``CostModel.to_dict``
or a list of them, e.g. fitted on the machine the model will run on; ``off``: no prediction), else from the cache (:mod:`decouple.io.cost_model_cache`), else it is fitted here
by the micro-benchmark (10 to 30 s, once per machine, runtime, batch and threads) and cached.
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from .io import cost_model_cache
from .io.cache import OFF
from .io.errors import InputError
from .runtime.cost_model import FORMAT, CostModel, block_size, census, fit_cost_model, versions
from .runtime.latency import cpu_name

ENV = "DECOUPLE_COST_MODEL"


def cost_model_for(runtime: str, batch: int, threads: int | None = None):
    """``(CostModel, where it came from)`` for ``runtime`` at ``batch``, or None when
    ``$DECOUPLE_COST_MODEL`` is ``off``."""
    threads = threads or torch.get_num_threads()
    given = os.environ.get(ENV)
    if given is not None and given.strip().lower() in OFF:
        return None
    if given:
        return _given(given, runtime, batch), f"{ENV}={given}"
    key = {"format": FORMAT, "runtime": runtime, "batch": batch, "threads": threads,
           "processor": cpu_name(), "versions": versions(runtime), "block": block_size()}  # fmt: skip
    path = cost_model_cache.path_for(key)
    if path is not None and (data := cost_model_cache.load(path)) is not None:
        try:
            return CostModel.from_dict(data), f"fitted on this machine, read from {path}"
        except (ValueError, TypeError):
            pass  # a foreign or older file: fit again
    start = time.perf_counter()
    model = fit_cost_model(runtime, batch, threads)
    where = f"fitted on this machine in {time.perf_counter() - start:.0f} s"
    if path is not None:
        cost_model_cache.store(path, model.to_dict())
        where += f", cached in {path}"
    return model, where


def _given(path: str, runtime: str, batch: int) -> CostModel:
    """The cost model for ``runtime`` in the file ``path``: one model, or a list of them (the
    one of this batch if there is one, else the first of this runtime)."""
    try:
        data = json.loads(Path(path).expanduser().read_text())
        models = [CostModel.from_dict(d) for d in (data if isinstance(data, list) else [data])]
    except (OSError, ValueError, TypeError) as e:
        raise InputError(f"{ENV}={path}: not a cost model ({e})") from None
    mine = [m for m in models if m.runtime == runtime]
    if not mine:
        raise InputError(f"{ENV}={path} has no cost model for {runtime}")
    return next((m for m in mine if m.batch == batch), mine[0])


@torch.no_grad()
def predict_speed(
    before: nn.Module, after: nn.Module, input_shape, runtime: str, batch: int = 1,
    threads: int | None = None,
) -> dict | None:  # fmt: skip
    """Predicted time of ``before`` and ``after`` (ms) at ``batch`` in ``runtime`` and their
    ratio, with the cost model's provenance; None when prediction is off."""
    got = cost_model_for(runtime, batch, threads)
    if got is None:
        return None
    model, source = got
    x = torch.zeros((batch, *input_shape), device="meta")
    ms = [
        model.predict_ms(census(copy.deepcopy(m).to("meta"), x, runtime)) for m in (before, after)
    ]
    return {
        "runtime": runtime, "batch": batch, "threads": model.threads,
        "before_ms": ms[0], "after_ms": ms[1], "speedup": ms[0] / max(ms[1], 1e-12),
        "fit_error": model.fit_error, "source": source,
    }  # fmt: skip


def predicted_line(pred: dict, measured: bool) -> str:
    """The cost model's verdict on the plan, in one line; a plan predicted slower says so."""
    line = (
        f"predicted speed: {faster(pred['speedup'])} ({pred['before_ms']:.2f} -> "
        f"{pred['after_ms']:.2f} ms; cost model of {pred['runtime']}, batch {pred['batch']}, "
        f"{pred['threads']} threads, median fit error {100 * pred['fit_error']:.0f} %)"
    )
    if pred["speedup"] < 1:
        line += (
            "; predicted SLOWER than the original: --target-latency plans by measured time"
            + ("" if measured else ", --latency measures this plan")
            + (
                ", --rank-multiple 8 keeps ranks in ONNX Runtime's blocked layout"
                if pred["runtime"] == "onnxruntime"
                else ""
            )  # fmt: skip
        )
    return line


def faster(speedup: float) -> str:
    """``1.25x faster`` or ``1.33x slower``."""
    return f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"

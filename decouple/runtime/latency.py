"""Measured latency: the clock is the truth, FLOPs are a hint.

Depthwise convs are memory-bound, so a decoupled layer with a third of the FLOPs can run no faster
than the conv it replaces. Everything here times real runs with ``torch.utils.benchmark`` (warm-up,
then equal blocks of calls timed by ``Timer.timeit``; median and interquartile range over the
blocks; thread count and device recorded).

A *runtime* says how a module is run:

* ``eager``: PyTorch eager, inference mode, contiguous (NCHW) tensors;
* ``channels-last``: PyTorch eager with the model and input in ``torch.channels_last`` (NHWC).
  It is a property of the whole run, not of one layer: the format propagates from layer to layer,
  so switching it per layer would add a copy at every switch;
* ``onnxruntime``: the module exported to ONNX and run by ONNX Runtime on the CPU, with as many
  intra-op threads as PyTorch uses.
"""

from __future__ import annotations

import copy
import logging
import math
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..nn import shards

RUNTIMES = ("eager", "channels-last", "onnxruntime")


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}; got {runtime!r}")
    return runtime


@dataclass(frozen=True)
class Latency:
    """One timing: median and interquartile range of the per-call time, in milliseconds."""

    median_ms: float
    iqr_ms: float
    runs: int
    runtime: str
    device: str
    threads: int
    batch: int

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        return f"{self.median_ms:.3f} ms (IQR {self.iqr_ms:.3f}, {self.runs} runs)"


def device_name(device: torch.device | str) -> str:
    """``cpu`` or the CUDA device's name, for the record."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``), else what ``platform`` knows: timings
    from different machines must not be read side by side."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass
class Prepared:
    """A module made ready for a runtime: call ``fn(arg)`` to run it once."""

    fn: Callable
    arg: object


def prepare(
    module: nn.Module, example: torch.Tensor, runtime: str = "eager", threads: int | None = None
) -> Prepared:
    """Make ``module`` runnable on ``example`` in ``runtime`` without changing ``module``.

    ``channels-last`` runs a converted copy; ``onnxruntime`` an exported copy (CPU only).
    """
    check_runtime(runtime)
    if runtime == "onnxruntime":
        from .export import onnx_bytes
        from .onnx_check import ort_session

        _check_on_cpu(module)
        example = example.detach().cpu()
        session = ort_session(onnx_bytes(module, example), threads)
        name = session.get_inputs()[0].name
        return Prepared(lambda a: session.run(None, {name: a}), example.numpy())
    if runtime == "channels-last":
        module = copy.deepcopy(module).to(memory_format=torch.channels_last)
        example = example.contiguous(memory_format=torch.channels_last)

    def run(x):
        with torch.inference_mode():
            return module(x)

    return Prepared(run, example)


def _check_on_cpu(module: nn.Module) -> None:
    p = next(module.parameters(), None)
    if p is not None and p.device.type != "cpu":
        raise ValueError("the onnxruntime runtime times on the CPU; move the model to the CPU")


def _benchmark():
    """``torch.utils.benchmark``, imported on first use: its import pulls in
    ``torch.utils.cpp_extension``, which logs a CUDA warning on machines without CUDA, and the
    CLI keeps stderr for its own one-line messages."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import benchmark
    finally:
        logger.setLevel(level)
    return benchmark


def time_prepared(
    prepared: Prepared,
    min_run_time: float = 0.5,
    warmup: int = 2,
    threads: int | None = None,
    blocks: int = 5,
):
    """Time ``prepared`` in ``blocks`` equal blocks of calls after ``warmup`` untimed calls.

    One timed call sets the block size so that the blocks together take about ``min_run_time``
    (at least 3 blocks of at least one call: a median needs three); ``Timer.timeit`` of
    ``torch.utils.benchmark`` times every block.
    (``blocked_autorange`` first grows its block tenfold until the timer's overhead is 1e-4 of
    it: for a 1 ms layer that alone costs 0.1 s per timing, whatever ``min_run_time`` says, and
    often leaves a single block, so no spread.)

    Returns
    -------
    (torch.utils.benchmark.Measurement, int)
        The blocks merged (one time per call for each block: median and IQR over blocks), and
        the number of calls timed.
    """
    # under torchrun process 0 times alone and tells the others: a plan decided by timings must
    # come out the same in every process
    return shards.from_main(_time_prepared, prepared, min_run_time, warmup, threads, blocks)


def _time_prepared(prepared: Prepared, min_run_time, warmup, threads, blocks):
    benchmark = _benchmark()
    for _ in range(warmup):
        prepared.fn(prepared.arg)
    timer = benchmark.Timer(
        stmt="fn(arg)",
        globals={"fn": prepared.fn, "arg": prepared.arg},
        num_threads=threads or torch.get_num_threads(),
    )
    one = max(timer.timeit(1).median, 1e-9)
    blocks = max(3, min(blocks, round(min_run_time / one)))  # a slow call: 3 blocks of 1 call
    number = max(1, round(min_run_time / blocks / one))
    runs = [timer.timeit(number) for _ in range(blocks)]
    return benchmark.Measurement.merge(runs)[0], number * blocks


def measure(
    module: nn.Module,
    example: torch.Tensor,
    runtime: str = "eager",
    min_run_time: float = 0.5,
    threads: int | None = None,
) -> Latency:
    """Latency of ``module(example)`` in ``runtime`` (a whole model or one layer).

    Parameters
    ----------
    module : nn.Module
        In eval mode, on the device to time on (``onnxruntime``: the CPU).
    example : torch.Tensor
        A batch on the same device; its first dimension is recorded as the batch size.
    runtime : {"eager", "channels-last", "onnxruntime"}
    min_run_time : float
        Seconds of timed calls at least (``torch.utils.benchmark`` picks the block size).
    threads : int, optional
        CPU threads (default: ``torch.get_num_threads()``).
    """
    threads = threads or torch.get_num_threads()
    prepared = prepare(module, example, runtime, threads)
    m, calls = time_prepared(prepared, min_run_time, threads=threads)
    dev = "cpu" if runtime == "onnxruntime" else device_name(example.device)
    return Latency(
        median_ms=m.median * 1e3,
        iqr_ms=m.iqr * 1e3,
        runs=calls,
        runtime=runtime,
        device=dev,
        threads=threads,
        batch=int(example.shape[0]),
    )


def fastest(
    candidates: dict[str, Prepared], rounds: int = 3, min_run_time: float = 0.05, threads=None
) -> dict[str, float]:
    """Best median (ms) of each candidate over ``rounds`` interleaved timings.

    Interleaving (A, B, C, A, B, C, …) and keeping each candidate's best round keeps a burst of
    machine noise from deciding the choice.
    """
    best: dict = {}
    _best_rounds(candidates, rounds, min_run_time, threads, 1, best, {})
    return {k: m.median * 1e3 for k, m in best.items()}


def _best_rounds(prepared: dict[str, Prepared], rounds, min_run_time, threads, warmup, best, calls):
    """Time each of ``prepared`` in ``rounds`` interleaved rounds, keeping in ``best`` its fastest
    round's measurement so far and adding the calls timed to ``calls``."""
    for _ in range(rounds):
        for key, prep in prepared.items():
            m, n = time_prepared(prep, min_run_time, warmup=warmup, threads=threads)
            calls[key] = calls.get(key, 0) + n
            if key not in best or m.median < best[key].median:
                best[key] = m


@torch.no_grad()
def capture_inputs(model: nn.Module, names: list[str], example: torch.Tensor) -> dict:
    """The input each named module receives when ``model`` runs on ``example``."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name, inp) -> None:  # a forward hook that returns a value replaces the output
        seen.setdefault(name, inp[0].detach().clone())

    hooks = [
        model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: keep(n, i)) for n in names
    ]
    try:
        model(example)
    finally:
        for h in hooks:
            h.remove()
    return seen


LAYER_TABLES = ("auto", "measured", "predicted")  # how a latency budget prices layers


@dataclass(frozen=True)
class LatencyConfig:
    """Where and how latency is measured.

    Parameters
    ----------
    runtime : {"eager", "channels-last", "onnxruntime"}
    batch : int
        Batch size of the timed input.
    device : str
        ``cpu`` or ``cuda`` (``onnxruntime`` runs on the CPU only).
    threads : int, optional
        CPU threads for PyTorch and ONNX Runtime (default: ``torch.get_num_threads()``).
    min_run_time : float
        Seconds of timed calls per whole-model measurement.
    layer_rounds, layer_min_run_time : int, float
        Interleaved rounds and seconds per timing when layers are compared.
    min_gain : float
        A decoupled layer is kept only if its fastest realization takes at most ``1 - min_gain``
        of its original conv's time (the noise floor of the timings), in [0, 1).
    layer_table : {"auto", "measured", "predicted"}
        How a latency budget prices each layer's options: every candidate timed alone on the
        target (``measured``), or predicted by the runtime's cost model
        (:mod:`decouple.runtime.cost_model`), which takes seconds where timing takes minutes.
        ``auto`` (the default): predicted where there is a cost model (on the CPU, unless
        ``DECOUPLE_COST_MODEL=off``), else measured. Either way the plans are timed whole, and
        the one kept is chosen on those timings.
    """

    runtime: str = "eager"
    batch: int = 1
    device: str = "cpu"
    threads: int | None = None
    min_run_time: float = 1.0
    layer_rounds: int = 3
    layer_min_run_time: float = 0.05
    min_gain: float = 0.05
    layer_table: str = "auto"

    def __post_init__(self) -> None:
        check_runtime(self.runtime)
        for name in ("batch", "layer_rounds"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {v!r}")
        if self.threads is not None and (
            isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1
        ):
            raise ValueError(f"threads must be an integer >= 1 or None; got {self.threads!r}")
        for name in ("min_run_time", "layer_min_run_time"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name} must be a positive number of seconds; got {v!r}")
        g = self.min_gain
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 <= g < 1:
            raise ValueError(f"min_gain must be a fraction in [0, 1); got {g!r}")
        if self.layer_table not in LAYER_TABLES:
            raise ValueError(
                f"layer_table must be one of {', '.join(LAYER_TABLES)}; got {self.layer_table!r}"
            )
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be one of cpu, cuda; got {self.device!r}")
        if self.device == "cuda" and self.layer_table == "predicted":
            raise ValueError("layer_table 'predicted' is for the CPU (the cost model is fitted "
                             "there); on cuda the table is measured")  # fmt: skip
        if self.device == "cuda" and self.runtime != "eager":
            raise ValueError(f"on cuda the runtime must be eager; got {self.runtime!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda asked for, but torch.cuda.is_available() is False")

    def example(self, input_shape: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
        """A seeded random batch of ``input_shape`` on the device (values do not change speed
        except through denormals, which random normals avoid)."""
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((self.batch, *input_shape), generator=gen, dtype=dtype)
        return x.to(self.device)

    def to_dict(self) -> dict:
        return {**asdict(self), "threads": self.threads or torch.get_num_threads()}


def side_by_side(
    modules: dict[str, nn.Module],
    example: torch.Tensor,
    config: LatencyConfig,
    rounds: int = 4,
    sessions: int = 2,
) -> dict[str, Latency]:
    """Whole-model latency of each of ``modules``, measured side by side.

    They are timed in ``rounds`` interleaved rounds (A, B, …, A, B, …) of half
    ``config.min_run_time`` each, and each keeps its best round's median: a slow spell of the
    machine lands on a round or two of any of them, not on one's only timing (noise on a CPU
    only ever adds time). Each is prepared ``sessions`` times over the rounds (in ONNX Runtime a
    fresh export and session, whose speed can sit a few per cent off the last one's for as long
    as it lives), so that one unlucky session does not decide either.
    """
    threads = config.threads or torch.get_num_threads()
    per_session = max(1, math.ceil(rounds / sessions))
    best, calls = {}, {}
    for start in range(0, rounds, per_session):
        prepared = {k: prepare(m, example, config.runtime, threads) for k, m in modules.items()}
        n = min(per_session, rounds - start)
        _best_rounds(prepared, n, config.min_run_time / 2, threads, 2, best, calls)
        del prepared  # these sessions go before the next are made
    dev = "cpu" if config.runtime == "onnxruntime" else device_name(example.device)
    return {
        k: Latency(best[k].median * 1e3, best[k].iqr * 1e3, calls[k], config.runtime, dev,
                   threads, int(example.shape[0]))
        for k in modules
    }  # fmt: skip


def compare(
    before: nn.Module,
    after: nn.Module,
    example: torch.Tensor,
    config: LatencyConfig,
    rounds: int = 4,
) -> dict:
    """Whole-model latency of ``before`` and ``after``, measured :func:`side_by_side`, and the
    speedup of ``after``."""
    out = side_by_side({"before": before, "after": after}, example, config, rounds)
    b, a = out["before"], out["after"]
    return {
        "runtime": config.runtime,
        "device": b.device,
        "processor": cpu_name(),
        "threads": b.threads,
        "batch": b.batch,
        "before": b.to_dict(),
        "after": a.to_dict(),
        "speedup": b.median_ms / a.median_ms,
    }

"""A latency cost model per runtime: FLOPs, bytes moved and op count, fitted by a micro-benchmark.

FLOPs alone mispredict speed (ShuffleNet V2): a depthwise conv does a few multiply-adds per
byte it reads, so it runs at the memory's pace; a CP layer at a high rank moves an R-channel
tensor twice; every op pays a fixed cost; and ONNX Runtime runs convs in a blocked layout
(NCHWc) that pads channels to whole blocks and cannot take a count that is not a multiple of 4
at all (such a conv runs unblocked, with reorders around it; ``results/aligned_ranks.md``).
The model prices each op of a forward pass as a sum of non-negative coefficients times its features (:data:`FEATURES`): multiply-adds and bytes per
kind of op (dense conv or matmul, depthwise, other grouped, unblocked, elementwise), one per
conv, one per op. :func:`census` lists a model's ops with these features from one forward pass
(``TorchDispatchMode``, so functional convs inside factored layers count too, and on the
``meta`` device it costs no arithmetic); :meth:`CostModel.predict_ms` adds their times.

The coefficients are fitted, once per machine, runtime and batch, to small graphs of the blocks
the methods produce, timed in the runtime net of its call overhead (:func:`benchmark_graphs`,
:func:`fit_cost_model`), relative error weighted, as autotuners fit theirs. It is a hint that
ranks plans before anything is exported; the clock (``--latency``) stays the truth.
"""

from __future__ import annotations

import copy
import functools
import math
import platform
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .latency import check_runtime, cpu_name

FORMAT = 2  # bump when the features or the micro-benchmark change: cached fits are then refitted
KINDS = ("dense", "depthwise", "grouped", "unblocked", "other")
FEATURES = (
    *(f"gmac_{k}" for k in KINDS[:4]), *(f"mbyte_{k}" for k in KINDS), "conv_op", "op"
)  # fmt: skip

_aten = torch.ops.aten
_CONVS = {_aten.convolution.default, _aten._convolution.default}
_MATMULS = {_aten.addmm.default, _aten.mm.default, _aten.bmm.default, _aten.linear.default}
# Ops that make tensors rather than read them: no work in a deployed graph.
_FACTORIES = {
    _aten.empty.memory_format,
    _aten.randn.default,
    _aten.zeros.default,
    _aten.ones.default,
}
# Folded into the conv before them (BatchNorm) or fused with it (clipped ReLUs) by ONNX
# Runtime's graph optimizer; PyTorch eager runs each as an op of its own.
_FUSED_IN_ORT = {
    _aten.native_batch_norm.default, _aten._native_batch_norm_legit_no_training.default,
    _aten.relu.default, _aten.relu_.default, _aten.hardtanh.default, _aten.hardtanh_.default,
    _aten.clamp.default, _aten.clamp_min.default,
}  # fmt: skip


@dataclass(frozen=True)
class OpRecord:
    """One op of a forward pass: its kind (a dense conv or matmul, a depthwise conv with one
    filter per channel, another grouped conv such as a depth multiplier > 1, a conv the
    runtime's blocked layout cannot take, anything else), its multiply-adds (10⁹) and the bytes
    it reads and writes (10⁶)."""

    op: str
    kind: str
    gmac: float
    mbyte: float

    def features(self) -> list[float]:
        """The values of :data:`FEATURES`: each kind's MACs and bytes in columns of their own
        (a depthwise conv is paced by memory, a dense one by arithmetic), and a count of ops."""
        row = dict.fromkeys(FEATURES, 0.0)
        if self.kind != "other":
            row[f"gmac_{self.kind}"] = self.gmac
            row["conv_op"] = 1.0
        row[f"mbyte_{self.kind}"] = self.mbyte
        row["op"] = 1.0
        return list(row.values())


def _tensors(tree) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in tree_flatten(tree)[0]:
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _mbyte(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 1e6


@functools.cache  # read once: census asks for every conv
def block_size() -> int:
    """Channels per block of ONNX Runtime's NCHWc layout on this CPU (MLAS: 16 with AVX-512,
    else 8)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 8
    return 16 if " avx512f" in flags else 8


def _blocked_conv(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, block: int):
    """The MACs and bytes of a conv as ONNX Runtime's NCHWc layout runs it, channels padded to
    whole blocks; None when its channel counts are not multiples of 4, which that layout does
    not take (the conv then runs unblocked, with reorders around it)."""
    c, n = x.shape[1], out.shape[1]
    if n % 4 or (c % 4 and c > 4):
        return None
    pad_c, pad_n = -(-c // block) * block, -(-n // block) * block
    scale_c, scale_n = pad_c / c, pad_n / n
    per_out = math.prod(weight.shape[1:]) * (scale_c if weight.shape[1] == c else 1.0)
    macs = out.numel() * scale_n * per_out / 1e9
    moved = (x.numel() * scale_c + out.numel() * scale_n + weight.numel()) * out.element_size()
    return macs, moved / 1e6


def _record(func, args, kwargs, out, runtime: str) -> OpRecord | None:
    if getattr(func, "is_view", False) or func in _FACTORIES:
        return None
    if runtime == "onnxruntime" and func in _FUSED_IN_ORT:
        return None
    moved = _mbyte(_tensors((args, kwargs))) + _mbyte(_tensors(out))
    name = str(func.overloadpacket.__name__)
    if func in _CONVS:
        weight, groups = args[1], args[8]  # both overloads: (input, weight, ..., groups, ...)
        macs = out.numel() * math.prod(weight.shape[1:]) / 1e9
        if runtime == "onnxruntime":
            blocked = _blocked_conv(args[0], weight, out, block_size())
            if blocked is None:
                return OpRecord(name, "unblocked", macs, moved)
            macs, moved = blocked
        if groups == 1:
            return OpRecord(name, "dense", macs, moved)
        if weight.shape[1] == 1 and weight.shape[0] == groups:  # one filter per channel
            return OpRecord(name, "depthwise", macs, moved)
        return OpRecord(name, "grouped", macs, moved)  # a depth multiplier > 1: a slower kernel
    if func in _MATMULS:
        a = args[1] if func == _aten.addmm.default else args[0]
        return OpRecord(name, "dense", out.numel() * a.shape[-1] / 1e9, moved)
    return OpRecord(name, "other", 0.0, moved)


class _Census(TorchDispatchMode):
    def __init__(self, runtime: str, example: torch.Tensor) -> None:
        super().__init__()
        self.runtime = runtime
        self.ops: list[OpRecord] = []
        self.live: dict[int, weakref.ref] = {}  # tensors computed from the input, by id
        self._mark(example)

    def _mark(self, t: torch.Tensor) -> None:
        self.live[id(t)] = weakref.ref(t)

    def _is_live(self, t: torch.Tensor) -> bool:
        ref = self.live.get(id(t))
        return ref is not None and ref() is t  # an id can be reused once a tensor is freed

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if any(self._is_live(t) for t in _tensors((args, kwargs))):
            for t in _tensors(out):
                self._mark(t)
        elif self.runtime == "onnxruntime":  # weights only: folded into a constant on export
            return out
        if (r := _record(func, args, kwargs, out, self.runtime)) is not None:
            self.ops.append(r)
        return out


@torch.no_grad()
def census(model: nn.Module, example: torch.Tensor, runtime: str = "onnxruntime") -> list[OpRecord]:
    """Every op that does work in ``model(example)`` as ``runtime`` runs it, in call order.

    Views and tensor factories are left out; under ``onnxruntime`` so are BatchNorms and
    (clipped) ReLUs, which its graph optimizer folds or fuses into the conv before them, and ops
    on weights alone (a factored layer's fused kernel), which the export folds into constants.
    ``model`` and ``example`` may be on the ``meta`` device: only shapes are read.
    """
    check_runtime(runtime)
    mode = _Census(runtime, example)
    with mode:
        model(example)
    return mode.ops


@dataclass(frozen=True)
class CostModel:
    """Fitted coefficients (ms per unit of each of :data:`FEATURES`) and where they hold.

    ``fit_error`` is the median relative error of the fit over the micro-benchmark's ops.
    """

    runtime: str
    batch: int
    threads: int
    processor: str
    versions: str
    coefficients: dict
    fit_error: float
    graphs_timed: int

    def __post_init__(self) -> None:
        check_runtime(self.runtime)
        if set(self.coefficients) != set(FEATURES):
            raise ValueError(f"coefficients must be exactly {', '.join(FEATURES)}")
        for k, v in self.coefficients.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"coefficient {k} must be a number >= 0; got {v!r}")

    def op_ms(self, op: OpRecord) -> float:
        return sum(self.coefficients[k] * v for k, v in zip(FEATURES, op.features(), strict=True))

    def predict_ms(self, ops: list[OpRecord]) -> float:
        """The predicted time of a forward pass made of ``ops`` (:func:`census`)."""
        return sum(self.op_ms(op) for op in ops)

    @torch.no_grad()
    def time_candidates(self, candidates: dict[str, nn.Module], x: torch.Tensor, *timing):
        """Predicted time (ms) of each module on input ``x``: the signature of
        :func:`~decouple.runtime.realize.time_candidates` (its timing settings are ignored), so
        that a latency table can be priced by the model instead of the clock."""
        return {
            k: max(self.predict_ms(census(m, x, self.runtime)), 1e-6) for k, m in candidates.items()
        }

    def to_dict(self) -> dict:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> CostModel:
        d = dict(d)
        if d.pop("format", None) != FORMAT:
            raise ValueError(f"not a cost model of format {FORMAT}")
        return cls(**d)


def versions(runtime: str) -> str:
    """The software whose speed the coefficients describe."""
    text = f"torch {torch.__version__}"
    if runtime == "onnxruntime":
        import onnxruntime

        text += f", onnxruntime {onnxruntime.__version__}"
    return text


class _Residual(nn.Module):
    """``x + f(x)``: a residual add after a 1×1 conv."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


def _blocks(c: int) -> dict[str, nn.Module]:
    """Blocks mapping ``c`` channels to ``c``, one per kind of layer the methods produce."""

    def conv(i, o, k=1, g=1):
        pad = (k[0] // 2, k[1] // 2) if isinstance(k, tuple) else k // 2
        return nn.Conv2d(i, o, k, padding=pad, groups=g)

    def cp(r):
        return nn.Sequential(conv(c, r), conv(r, r, (3, 1), r), conv(r, r, (1, 3), r), conv(r, c))

    def cp_square(r):  # CPConv2d's "square" realization: one depthwise 3×3 of the outer products
        return nn.Sequential(conv(c, r), conv(r, r, 3, r), conv(r, c))

    def tucker(r):
        return nn.Sequential(conv(c, r), conv(r, r, 3), conv(r, c))

    return {
        "dense 3x3": nn.Sequential(conv(c, c, 3), nn.ReLU()),
        "1x1 pair": nn.Sequential(conv(c, 4 * c), nn.ReLU(), conv(4 * c, c)),
        "depthwise": nn.Sequential(conv(c, c, 3, c), nn.ReLU(), conv(c, c)),
        "nd T=2": nn.Sequential(conv(c, 2 * c, 3, c), conv(2 * c, c)),
        "cp": cp(c),
        "cp unaligned": cp(c + 3),
        "cp square": cp_square(c),
        "cp square, 2x rank": cp_square(2 * c),
        "tucker": tucker(c // 2),
        "tucker unaligned": tucker(c // 2 + 1),
        "residual": _Residual(c),
    }


def benchmark_graphs(
    batch: int, depth: int = 3, max_gmac: float = 2.0
) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """The micro-benchmark: small graphs of ``depth`` blocks of one kind each, at ``batch``.

    Graphs, not single ops, because a runtime's cost of an op depends on its neighbours: ONNX
    Runtime reorders a tensor into its blocked layout once for a run of blocked convs, and back
    around every conv it cannot block. Channels and sizes pair as in ResNets and MobileNets (16
    at 32² to 512 at 7²); each kind of block: a dense 3×3, a widening 1×1 pair, a depthwise
    separable block, network decoupling at ``T=2``, CP (four ops) and Tucker-2 at aligned and
    unaligned ranks, CP as three ops (its ``square`` realization) at ranks of one and two times
    the channels, a residual add. Graphs over ``max_gmac`` at this batch are left out (the fit is
    linear, and they would take seconds each).
    """
    gen = torch.Generator().manual_seed(0)
    out = []
    for c, hw in ((16, 32), (32, 16), (64, 8), (64, 56), (128, 28), (256, 14), (512, 7)):
        x = torch.randn(batch, c, hw, hw, generator=gen)
        for label, block in _blocks(c).items():
            graph = nn.Sequential(*(copy.deepcopy(block) for _ in range(depth))).eval()
            if sum(op.gmac for op in census(graph, x)) <= max_gmac:
                out.append((f"{label}, {c} ch at {hw}²", graph, x))
    return out


def fit(features: np.ndarray, times_ms: np.ndarray, floor_ms: float = 0.01) -> tuple[dict, float]:
    """Non-negative coefficients minimizing the relative error of ``features @ coef`` against
    ``times_ms``; and the median relative error of the fit.

    Errors are relative to ``max(time, floor_ms)``: an op faster than the noise of taking the
    call overhead off (about 10 µs) must not pull the fit towards zero.
    """
    from scipy.optimize import nnls

    features, times_ms = np.asarray(features, float), np.asarray(times_ms, float)
    weights = 1.0 / np.maximum(times_ms, floor_ms)
    scale = np.maximum(np.abs(features).max(axis=0), 1e-12)  # columns of like size for nnls
    coef, _ = nnls(features / scale * weights[:, None], times_ms * weights)
    coef = coef / scale
    error = float(np.median(np.abs(features @ coef - times_ms) / np.maximum(times_ms, floor_ms)))
    return dict(zip(FEATURES, map(float, coef), strict=True)), error


def fit_cost_model(
    runtime: str,
    batch: int = 1,
    threads: int | None = None,
    timer: Callable[[nn.Module, torch.Tensor], float] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CostModel:
    """Time :func:`benchmark_graphs` in ``runtime`` at ``batch`` and fit a :class:`CostModel`.

    ``timer(module, x)`` returns milliseconds net of the call overhead (default: the best of two
    interleaved rounds of :func:`~decouple.runtime.realize.time_candidates`); a test injects one.
    Takes about 5 to 30 s on 2 cores (more at larger batches).
    """
    check_runtime(runtime)
    threads = threads or torch.get_num_threads()
    if timer is None:
        from .realize import time_candidates

        def timer(m, x):
            return time_candidates({"op": m}, x, runtime, rounds=2, min_run_time=0.03,
                                   threads=threads)["op"]  # fmt: skip

    ops = benchmark_graphs(batch)
    rows, times = [], []
    for i, (_, m, x) in enumerate(ops):
        rows.append(
            [sum(col) for col in zip(*(op.features() for op in census(m, x, runtime)), strict=True)]
        )
        times.append(timer(m, x))
        if progress is not None:
            progress(i + 1, len(ops))
    coefficients, error = fit(np.array(rows), np.array(times))
    return CostModel(
        runtime=runtime,
        batch=batch,
        threads=threads,
        processor=cpu_name() or platform.machine(),
        versions=versions(runtime),
        coefficients=coefficients,
        fit_error=error,
        graphs_timed=len(ops),
    )

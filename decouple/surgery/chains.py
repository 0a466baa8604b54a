"""Chains a channel can be pruned along, and the surgery that prunes it.

A *chain* is a plain conv or linear layer (the producer, one group) whose output reaches a 1×1
conv or linear layer (the consumer, one group) through channel-wise steps only: activations,
BatchNorms, depthwise convs (one filter per channel), pooling, dropout, and a flatten after a
global pool. Each value on the way has exactly one user, so nothing else (a residual add, a
concatenation) reads the channels. Dropping channel ``j`` then removes output ``j`` of the
producer, channel ``j`` of every step, and input ``j`` of the consumer, and changes nothing else.

:func:`find_chains` reads them from a ``torch.fx`` trace; :func:`prune_chain_` does the surgery
with the consumer's new weights (a refit on the kept channels, from
:mod:`decouple.calibrate.prune`), or with the consumer's own columns, or for reload only the
shapes. Every module it builds is a plain ``nn.Conv2d``, ``nn.Linear`` or ``nn.BatchNorm2d``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn import functional as F

from ..nn.discover import is_plain_conv2d, is_plain_linear
from .methods import FACTORED_LAYERS

# Steps that act on each channel alone and hold no per-channel state.
_STATELESS = (
    nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Mish, nn.Identity, nn.Dropout, nn.AvgPool2d,
    nn.MaxPool2d,
)  # fmt: skip
_FUNCTIONS = {F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardtanh, torch.relu, torch.sigmoid,
              torch.tanh, F.dropout}  # fmt: skip
_GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


class LeafTracer(fx.Tracer):
    """Convs, linear and factored layers stay leaves: a trace names the module objects called.

    Every ``nn.Conv2d`` stays a leaf, plain or not (:mod:`decouple.nn.discover`): a leaf only
    means the graph calls the module object; tracing into a custom forward would gain nothing.
    """

    def __init__(self, opened=frozenset()) -> None:
        super().__init__()
        self.opened = frozenset(opened)  # factored layers traced into: their parts become calls

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.opened:
            return False
        return isinstance(m, (*FACTORED_LAYERS, nn.Conv2d)) or super().is_leaf_module(m, qualname)


@dataclass(frozen=True)
class Chain:
    """A producer, the per-channel modules after it (depthwise convs, BatchNorms) and the
    consumer; ``width`` is the producer's output channels."""

    producer: str
    mids: tuple[str, ...]
    consumer: str
    width: int
    joins_sum: bool = False  # the consumer's output is added to another value (a residual)

    def to_dict(self, kept: int) -> dict:
        return {"width": kept, "mids": list(self.mids), "consumer": self.consumer}


def _out_channels(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def _is_producer(m: nn.Module) -> bool:
    return (is_plain_conv2d(m) and m.groups == 1) or is_plain_linear(m)


def _is_consumer(m: nn.Module) -> bool:
    if is_plain_linear(m):
        return True
    return is_plain_conv2d(m) and m.groups == 1 and m.kernel_size == (1, 1)


def _is_global(m: nn.Module) -> bool:
    size = m.output_size
    return size in (1, (1, 1))


def _step(node: fx.Node, model: nn.Module, channels: int, pooled: bool):
    """``(state_module_name or None, pooled)`` when ``node`` acts on each channel alone, else
    None."""
    if node.op == "call_module":
        m = model.get_submodule(node.target)
        if isinstance(m, _STATELESS):
            return None, pooled
        if isinstance(m, _GLOBAL_POOLS) and _is_global(m):
            return None, True
        if isinstance(m, nn.Flatten) and pooled and m.start_dim == 1:
            return None, pooled
        if isinstance(m, nn.BatchNorm2d) and m.num_features == channels:
            return node.target, pooled
        if is_plain_conv2d(m) and m.groups == m.in_channels == m.out_channels == channels:
            return node.target, pooled
        return False
    if node.op == "call_function":
        if node.target in _FUNCTIONS:
            return None, pooled
        if node.target is F.adaptive_avg_pool2d and node.args[1:] in ((1,), ((1, 1),)):
            return None, True
        if node.target is torch.flatten and pooled and node.args[1:] == (1,):
            return None, pooled
    if node.op == "call_method" and node.target in ("relu", "sigmoid", "tanh"):
        return None, pooled
    return False


def find_chains(model: nn.Module, names: list[str] | None = None) -> list[Chain]:
    """Every chain of ``model`` whose producer and consumer are in ``names`` (default: all), in
    graph order; none when the model cannot be traced."""
    try:
        graph = LeafTracer().trace(model)
    except Exception:  # noqa: BLE001 - an untraceable model has no chains we can prove
        return []
    calls: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    allowed = set(names) if names is not None else None
    chains = []
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1:
            continue
        p = model.get_submodule(node.target)
        if not _is_producer(p) or (allowed is not None and node.target not in allowed):
            continue
        width, mids, pooled, cur = _out_channels(p), [], False, node
        while len(cur.users) == 1:
            nxt = next(iter(cur.users))
            if nxt.args[:1] != (cur,) or any(cur in a for a in (nxt.args[1:], nxt.kwargs.values())):
                break  # the channels enter as the first argument only
            if nxt.op == "call_module" and calls[nxt.target] == 1:
                q = model.get_submodule(nxt.target)
                if _is_consumer(q) and _in_channels(q) == width:
                    if allowed is None or nxt.target in allowed:
                        joins = _joins_sum(nxt)
                        chains.append(Chain(node.target, tuple(mids), nxt.target, width, joins))
                    break
            step = _step(nxt, model, width, pooled)
            if step is False or (step[0] is not None and calls[nxt.target] != 1):
                break  # a module with per-channel state must serve this chain alone
            state, pooled = step
            if state is not None:
                mids.append(state)
            cur = nxt
    return chains


_SUMS = {operator.add, operator.iadd, torch.add}


def _joins_sum(node: fx.Node) -> bool:
    """Whether ``node``'s value, after steps that read no other computed value (activations,
    a layer scale, stochastic depth), is added to another value: the end of a residual branch."""
    cur = node
    while len(cur.users) == 1:
        nxt = next(iter(cur.users))
        others = [a for a in nxt.all_input_nodes if a is not cur and a.op != "get_attr"]
        is_sum = nxt.target in _SUMS or (nxt.op == "call_method" and nxt.target in ("add", "add_"))
        if others:
            return is_sum
        if nxt.op == "output":
            return False
        cur = nxt
    return False  # read by several: a block's input (a skip's source), not a branch's end


def _in_channels(m: nn.Module) -> int:
    return m.in_channels if isinstance(m, nn.Conv2d) else m.in_features


def _sliced_out(m: nn.Module, keep: torch.Tensor) -> nn.Module:
    """``m`` with only the output channels ``keep`` (a producer, depthwise conv or BatchNorm)."""
    k = len(keep)
    like = dict(device=m.weight.device, dtype=m.weight.dtype)
    if isinstance(m, nn.BatchNorm2d):
        new = nn.BatchNorm2d(k, m.eps, m.momentum, m.affine, m.track_running_stats, **like)
        for key, v in m.state_dict().items():
            if v.dim() == 1:
                getattr(new, key).data.copy_(v[keep])
        return new.train(m.training)
    if isinstance(m, nn.Linear):
        new = nn.Linear(m.in_features, k, bias=m.bias is not None, **like)
    else:
        depthwise = m.groups > 1
        new = nn.Conv2d(
            k if depthwise else m.in_channels, k, m.kernel_size, m.stride, m.padding, m.dilation,
            groups=k if depthwise else 1, bias=m.bias is not None, padding_mode=m.padding_mode,
            **like,
        )  # fmt: skip
    with torch.no_grad():
        new.weight.copy_(m.weight[keep])
        if m.bias is not None:
            new.bias.copy_(m.bias[keep])
    return new.train(m.training)


def prune_chain_(
    model: nn.Module,
    chain: Chain,
    keep: torch.Tensor | list[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> None:
    """Keep only channels ``keep`` along ``chain``, in place.

    Parameters
    ----------
    keep : sequence of int
        The producer's output channels to keep.
    weight, bias : torch.Tensor, optional
        The consumer's new weight ``(N, k)`` and bias ``(N,)`` (its refit on the kept channels);
        by default its own columns for ``keep`` and its own bias. The consumer always gets a bias.
    """
    keep = torch.as_tensor(keep, dtype=torch.long)
    if keep.numel() < 1 or len(set(keep.tolist())) != keep.numel():
        raise ValueError("keep must name distinct channels, at least one")
    if int(keep.min()) < 0 or int(keep.max()) >= chain.width:
        raise ValueError(f"keep must lie in [0, {chain.width})")
    for name in (chain.producer, *chain.mids):
        model.set_submodule(name, _sliced_out(model.get_submodule(name), keep))
    q = model.get_submodule(chain.consumer)
    new = _consumer_on(q, keep.numel())
    n = _out_channels(q)
    w = q.weight.reshape(n, -1)[:, keep] if weight is None else weight
    b = (q.bias if q.bias is not None else torch.zeros(n)) if bias is None else bias
    with torch.no_grad():
        new.weight.copy_(w.reshape(new.weight.shape))
        new.bias.copy_(b)
    new.decouple_chain = chain  # read back by pruned_chains (a recipe from the model alone)
    model.set_submodule(chain.consumer, new.train(q.training))


def _consumer_on(q: nn.Module, k: int) -> nn.Module:
    """A 1×1 conv or linear layer like ``q`` that reads ``k`` channels, with a bias (weights
    unset)."""
    like = dict(device=q.weight.device, dtype=q.weight.dtype)
    n = _out_channels(q)
    if isinstance(q, nn.Linear):
        return nn.Linear(k, n, bias=True, **like)
    return nn.Conv2d(k, n, 1, q.stride, q.padding, q.dilation, bias=True,
                     padding_mode=q.padding_mode, **like)  # fmt: skip


def pruned_modules(model: nn.Module, chain: Chain, kept: int) -> dict[str, nn.Module]:
    """Copies of the chain's producer, mids and consumer as a pruning to its first ``kept``
    channels would leave them, ``model`` untouched: their shapes are what a latency budget
    times (the weights are the kept channels', the consumer's unset)."""
    keep = torch.arange(kept)
    out = {n: _sliced_out(model.get_submodule(n), keep) for n in (chain.producer, *chain.mids)}
    out[chain.consumer] = _consumer_on(model.get_submodule(chain.consumer), kept)
    return out


def pruned_chains(model: nn.Module) -> dict:
    """The recipe entries (producer -> chain) of the chains pruned in ``model``."""
    out = {}
    for m in model.modules():
        chain = getattr(m, "decouple_chain", None)
        if isinstance(chain, Chain):
            out[chain.producer] = chain.to_dict(m.weight.shape[1])
    return out


def prune_shape_(model: nn.Module, chain: Chain, kept: int) -> None:
    """Give ``chain`` the shapes of a pruning that kept ``kept`` channels (weights are loaded
    afterwards): what reloading a saved pruned model needs."""
    prune_chain_(model, chain, torch.arange(kept))

"""A model cut just before each calibrated layer, into segments that each run once.

Calibration walks a network layer by layer over the whole calibration set. Holding every image's
activations is what made ImageNet-size calibration run out of memory; re-running the network
from its input for every layer costs time quadratic in depth. So the ``torch.fx`` graph is cut
just before every calibrated layer: what crosses a cut is every value still needed after it (a
ResNet block's input rides beside its branch), stored once per image when it is made
(:mod:`decouple.calibrate.stream`), and each segment runs exactly once per image. A layer's input
is then a stored value at the start of its segment, and its output is caught while its segment
runs: calibration costs one forward pass of each network, not one per layer of a block.

Factored layers and convs stay leaves of the graph, so each segment calls the model's own module
objects: a layer refit in place is what the segment runs next.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn

from ..surgery.chains import LeafTracer
from ..surgery.methods import FACTORED_LAYERS

_INPLACE_FUNCTIONS = {"iadd", "isub", "imul", "itruediv", "iand", "ior", "ixor"}


def _mutates(user: fx.Node, root: nn.Module | None) -> bool:
    """Whether ``user`` may change its input in place (``ReLU(inplace=True)``, ``x += y``, …)."""
    if user.kwargs.get("inplace"):
        return True
    if user.op == "call_module":
        return root is not None and bool(getattr(root.get_submodule(user.target), "inplace", False))
    name = getattr(user.target, "__name__", str(user.target))
    return name in _INPLACE_FUNCTIONS or (name.endswith("_") and not name.endswith("__"))


@dataclass(frozen=True)
class Segment:
    """Part of a graph: ``module(*takes) -> gives``, by the names of the graph's values.

    ``gives`` are the values it makes that are needed after it, and any value it read and may
    have changed in place (stored again, so a copy on disk never goes stale); ``drops`` are the
    values needed before it and no more after; ``changes`` the values it takes and may change in
    place.
    """

    module: fx.GraphModule
    takes: tuple[str, ...]
    gives: tuple[str, ...]
    drops: tuple[str, ...]
    changes: tuple[str, ...] = ()  # the values it takes and may change in place


@dataclass(frozen=True)
class Segments:
    """A model as segments run in order from its input (the value named ``first``).

    ``owner[layer]`` is the segment that calls the layer, at whose start ``inputs[layer]``, the
    value the layer reads, is stored; ``outputs[layer]`` names the value it returns.
    """

    parts: list[Segment]
    owner: dict[str, int]
    inputs: dict[str, str]
    outputs: dict[str, str]
    first: str

    def __call__(self, x) -> dict:
        """Every value stored after the last segment, from the model's input ``x``."""
        values = {self.first: x}
        for s in self.parts:
            out = s.module(*(values[n] for n in s.takes))
            values = {n: v for n, v in values.items() if n not in s.drops}
            values.update(zip(s.gives, out, strict=True))
        return values


def _alive(nodes: list[fx.Node], last_use: dict, i: int) -> list[fx.Node]:
    """Values made at or before position ``i`` and read after it (parameters are not values:
    each segment reads its own)."""
    return [m for m in nodes[: i + 1] if m.op != "get_attr" and last_use[m] > i]


def split(model: nn.Module, names: list[str]) -> Segments:
    """``model`` cut just before each of ``names``, up to the last of them.

    Raises
    ------
    ValueError
        The model cannot be traced, has no single input, or calls a named module other than
        exactly once.
    """
    # A name inside a factored layer (a CP layer's ``pointwise_out``) opens that layer: the cut
    # falls between its parts, so what crosses it is the features that part reads.
    modules = dict(model.named_modules())
    opened = {n.rsplit(".", 1)[0] for n in names if "." in n}
    opened = {n for n in opened if isinstance(modules.get(n), FACTORED_LAYERS)}
    try:
        graph = LeafTracer(opened).trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure means "no segments"
        raise ValueError(f"cannot trace the model: {type(e).__name__}") from None
    calls = {n: [node for node in graph.nodes if node.op == "call_module" and node.target == n]
             for n in names}  # fmt: skip
    if any(len(c) != 1 for c in calls.values()):
        raise ValueError("a calibrated layer is not called exactly once")
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise ValueError("the model does not take a single input")
    position = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((position[u] for u in n.users), default=position[n]) for n in nodes}
    at = {name: position[c[0]] for name, c in calls.items()}
    if not at or any(not isinstance(calls[n][0].args[0], fx.Node) for n in names):
        raise ValueError("a calibrated layer reads no value of the graph")
    start = position[inputs[0]]
    bounds = sorted({start, *(p - 1 for p in at.values()), max(at.values())})
    parts, owner = [], {}
    for k in range(len(bounds) - 1):
        lo, hi = bounds[k], bounds[k + 1]
        part = nodes[lo + 1 : hi + 1]
        before, after = _alive(nodes, last_use, lo), _alive(nodes, last_use, hi)
        inside = set(part)
        takes = [m for m in before if any(u in inside for u in m.users)]
        changed = {m for m in takes if any(u in inside and _mutates(u, model) for u in m.users)}
        gives = [m for m in after if m in inside or m in changed]
        g = fx.Graph()
        env = {m: g.placeholder(m.name) for m in takes}

        def arg(a, env=env, g=g):
            if a not in env:  # a parameter or buffer read here: its own get_attr
                env[a] = g.node_copy(a, lambda b: env[b])
            return env[a]

        for node in part:
            env[node] = g.node_copy(node, arg)
            if node.op == "call_module" and node.target in calls:
                owner[node.target] = k
        g.output(tuple(env[m] for m in gives))
        drops = [m.name for m in before if m not in after or m in changed]
        parts.append(
            Segment(
                fx.GraphModule(model, g),
                tuple(m.name for m in takes),
                tuple(m.name for m in gives),
                tuple(drops),
                tuple(m.name for m in takes if m in changed),
            )  # fmt: skip
        )
    reads = {name: calls[name][0].args[0].name for name in names}
    made = {name: calls[name][0].name for name in names}
    return Segments(parts, owner, reads, made, inputs[0].name)

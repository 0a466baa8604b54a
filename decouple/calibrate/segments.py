"""A model cut into a chain of segments, each taking one tensor and returning one tensor.

Calibration walks a network layer by layer over the whole calibration set. Holding every image's
activations is what made ImageNet-size calibration run out of memory; re-running the network
from its input for every layer costs time quadratic in depth. A cut point, where exactly one
value of the ``torch.fx`` graph is alive (the input of a ResNet block, or of any layer of a plain
chain like VGG), lets the activations there be stored once per image and the network resumed from
them: :mod:`decouple.calibrate.stream` keeps them, one mini-batch at a time.

Factored layers and convs stay leaves of the graph, so each segment calls the model's own module
objects: a layer refit in place is what the segment runs next.
"""

from __future__ import annotations

from torch import fx, nn

from ..surgery.chains import LeafTracer

_INPLACE_FUNCTIONS = {"iadd", "isub", "imul", "itruediv", "iand", "ior", "ixor"}


def _mutates(user: fx.Node, root: nn.Module | None) -> bool:
    """Whether ``user`` may change its input in place (``ReLU(inplace=True)``, ``x += y``, …)."""
    if user.kwargs.get("inplace"):
        return True
    if user.op == "call_module":
        return root is not None and bool(getattr(root.get_submodule(user.target), "inplace", False))
    name = getattr(user.target, "__name__", str(user.target))
    return name in _INPLACE_FUNCTIONS or (name.endswith("_") and not name.endswith("__"))


def cut_points(graph: fx.Graph, root: nn.Module | None = None) -> list[fx.Node]:
    """Nodes after which that node's value is the only one still needed, in graph order.

    The first is the model's single input; a graph with any other number of inputs has none. A
    value that something changes in place is no cut: the stored activations are run through the
    segment after it more than once, and each run would change them again.
    """
    nodes = list(graph.nodes)
    if sum(n.op == "placeholder" for n in nodes) != 1:
        return []
    order = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((order[u] for u in n.users), default=order[n]) for n in nodes}
    cuts, alive = [], []
    for i, n in enumerate(nodes):
        if n.op == "output":
            break
        alive = [m for m in alive if last_use[m] > i] + ([n] if last_use[n] > i else [])
        if alive == [n] and n.op != "get_attr" and not any(_mutates(u, root) for u in n.users):
            cuts.append(n)
    return cuts


def split(model: nn.Module, names: list[str]) -> tuple[list[fx.GraphModule], dict[str, int]]:
    """``model`` as segments ``s0, s1, …`` with ``model(x) == …s1(s0(x))`` up to the last of
    ``names``, and the index of the segment that calls each named module.

    Raises
    ------
    ValueError
        The model cannot be traced, has no single input, or calls a named module other than
        exactly once.
    """
    try:
        graph = LeafTracer().trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure means "no segments"
        raise ValueError(f"cannot trace the model: {type(e).__name__}") from None
    calls = {n: [node for node in graph.nodes if node.op == "call_module" and node.target == n]
             for n in names}  # fmt: skip
    if any(len(c) != 1 for c in calls.values()):
        raise ValueError("a calibrated layer is not called exactly once")
    cuts = cut_points(graph, model)
    if not cuts:
        raise ValueError("the model does not take a single input")
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    last = max(position[c[0]] for c in calls.values())
    bounds = [position[c] for c in cuts if position[c] < last] + [last]
    segments, owner = [], {}
    for k in range(len(bounds) - 1):
        start, end = bounds[k], bounds[k + 1]
        g = fx.Graph()
        env = {nodes[start]: g.placeholder("x")}
        for node in nodes[start + 1 : end + 1]:
            env[node] = g.node_copy(node, lambda a, env=env: env[a])
            if node.op == "call_module" and node.target in calls:
                owner[node.target] = k
        g.output(env[nodes[end]])
        segments.append(fx.GraphModule(model, g))
    return segments, owner

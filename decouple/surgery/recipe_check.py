"""A recipe read from disk, checked against the model it is about to change.

A recipe is untrusted JSON. :func:`check_recipe` turns it into a :class:`RecipePlan` or raises
before anything changes: a wrong type is an ``InputTypeError`` (a ``TypeError``, and a
``ValueError`` for callers that catch only that) naming the field; an unknown key, a layer the
model lacks (with the nearest names it has), a rank outside ``[1, full rank]`` is a
``ValueError``. Ranks are compared as numbers, so ``10**12`` is refused before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..factor.cp import cp_max_rank
from ..factor.lowrank import lowrank_max_rank
from ..factor.nd import ORDERS, max_rank
from ..factor.tucker import tucker_max_ranks
from ..nn.decoupled import REALIZATIONS
from ..nn.discover import custom_forward_reason, is_plain_layer
from ..nn.factorized import CP_REALIZATIONS, CP_SPATIAL
from ..nn.geometry import geometry_of, kernel_of
from ..nn.guards import InputTypeError, type_error
from .chains import Chain
from .checks import check_int, check_keys, check_str, close_names, is_int
from .config import DecoupleConfig
from .linear_fuse import FusedConv
from .methods import METHODS, is_factored
from .sites import FACTORED, conv_sites

RECIPE_FORMAT = "decouple-recipe"
RECIPE_VERSION = 1
# "manifest": the CLI's output set names the manifest that vouches for the weights.
# "pruned": producer -> {"width", "mids", "consumer"} of each pruned chain (decouple.surgery.chains)
# "fused_linear": first -> second of each fused 1×1 pair (decouple.surgery.linear_fuse), in order
RECIPE_KEYS = (
    "format", "version", "config", "folded_bn", "layers", "manifest", "pruned", "fused_linear"
)  # fmt: skip
PRUNED_KEYS = ("width", "mids", "consumer")
LAYER_KEYS = {
    "nd": ("method", "rank", "order", "realization"),
    "cp": ("method", "rank", "realization", "spatial"),
    "tucker": ("method", "ranks"),
    "svd": ("method", "rank"),
}


@dataclass(frozen=True)
class LayerPlan:
    """One conv to replace by an empty factored layer."""

    name: str
    method: str
    rank: int | tuple[int, int]
    order: str = "dw-pw"
    realization: str | None = None
    spatial: str = "separable"  # a CP layer's kernels (decouple.nn.factorized.CP_SPATIAL)


@dataclass(frozen=True)
class RecipePlan:
    """A checked recipe: BN pairs to fold (conv name -> BN name), 1×1 pairs to fuse (first ->
    second) and layers to replace."""

    folded: dict[str, str]
    layers: list[LayerPlan]
    pruned: list = field(default_factory=list)  # (Chain, channels kept)
    fused: dict[str, str] = field(default_factory=dict)


class _Model:
    """The names a recipe may use: plain convs (outside factored layers) and all modules."""

    def __init__(self, model: nn.Module) -> None:
        sites = conv_sites(model, DecoupleConfig())
        self.convs = {s.name: s.module for s in sites if is_plain_layer(s.module)}
        self.factored = {s.name: s.module for s in sites if s.action == FACTORED}
        self.modules = dict(model.named_modules(remove_duplicate=False))

    def conv(self, name: Any, what: str) -> nn.Module:
        """The plain conv or factored layer ``name``, else a ValueError saying what it is."""
        if not isinstance(name, str):
            raise type_error(f"{what} name", "a module name (str)", name)
        if name in self.convs:
            return self.convs[name]
        if name in self.factored:
            return self.factored[name]
        module = self.modules.get(name) if name else None
        hint = close_names(name, list(self.convs))
        if module is None:
            raise ValueError(f"{what} {name!r} is not a module of the model; {hint}")
        custom = custom_forward_reason(module)
        if custom is not None:
            raise ValueError(f"{what} {name!r} is a conv with its own forward ({custom}); {hint}")
        owner = next((f for f in self.factored if name.startswith(f + ".")), None)
        if owner is not None:
            raise ValueError(f"{what} {name!r} is part of the factored layer {owner!r}; {hint}")
        raise ValueError(
            f"{what} {name!r} is a {type(module).__name__}, not a Conv2d or Linear; {hint}"
        )


def _check_header(recipe: Any) -> None:
    if not isinstance(recipe, dict):
        raise type_error("a recipe", "a dict (a JSON object)", recipe)
    if recipe.get("format") != RECIPE_FORMAT:
        raise ValueError("not a decouple recipe (missing format: 'decouple-recipe')")
    version = recipe.get("version")
    if not (is_int(version) and version == RECIPE_VERSION):
        raise ValueError(f"unsupported recipe version {version!r}; this is {RECIPE_VERSION}")
    check_keys(recipe, RECIPE_KEYS, "recipe")
    config = recipe.get("config")
    if config is not None:
        try:
            DecoupleConfig.from_dict(config)
        except InputTypeError as e:
            raise InputTypeError(f"recipe config: {e}") from None
        except ValueError as e:
            raise ValueError(f"recipe config: {e}") from None
    if "layers" not in recipe:
        raise ValueError("the recipe has no 'layers'")


def _check_folded(folded: Any, names: _Model) -> dict[str, str]:
    if folded is None:
        return {}
    if not isinstance(folded, dict):
        raise type_error("recipe folded_bn", "a dict of conv name -> BN name", folded)
    for conv_name, bn_name in folded.items():
        conv = names.conv(conv_name, "recipe folded_bn conv")
        if not isinstance(bn_name, str):
            raise type_error(f"recipe folded_bn[{conv_name!r}]", "a BN name (str)", bn_name)
        bn = names.modules.get(bn_name) if bn_name else None
        if not isinstance(bn, (_BatchNorm, nn.Identity)):
            bns = [n for n, m in names.modules.items() if isinstance(m, _BatchNorm)]
            what = "is not a module of the model" if bn is None else "is not a BatchNorm"
            raise ValueError(
                f"recipe folded_bn[{conv_name!r}]: {bn_name!r} {what}; {close_names(bn_name, bns)}"
            )
        if isinstance(bn, _BatchNorm) and bn.num_features != geometry_of(conv).out_channels:
            raise ValueError(
                f"recipe folds BN {bn_name!r} ({bn.num_features} features) into {conv_name!r} "
                f"({geometry_of(conv).out_channels} output channels)"
            )
        if is_factored(conv) and conv.bias is None:
            raise ValueError(f"recipe folds a BN into {conv_name!r}, a factored layer without bias")
    return dict(folded)


def _check_layer(name: str, conv: nn.Module, entry: Any) -> LayerPlan:
    what = f"recipe layer {name!r}"
    if not isinstance(entry, dict):
        raise type_error(what, "a dict (a JSON object)", entry)
    method = check_str(entry.get("method", "nd"), f"{what} method", METHODS)
    check_keys(entry, LAYER_KEYS[method], f"{what} ({method})")
    if isinstance(conv.weight, nn.parameter.UninitializedParameter):
        raise ValueError(f"{what} is a lazy conv not initialised yet: run it once first")
    shape, groups = tuple(kernel_of(conv).shape), geometry_of(conv).groups
    if method == "svd":
        top = lowrank_max_rank(shape, groups)
        return LayerPlan(name, method, check_int(entry.get("rank"), f"{what} rank", 1, top))
    if isinstance(conv, nn.Linear):
        raise ValueError(f"{what} is a linear layer: only method svd applies, not {method}")
    if method == "tucker":
        ranks = entry.get("ranks")
        if not (isinstance(ranks, (list, tuple)) and len(ranks) == 2):
            raise type_error(f"{what} ranks", "a pair [R_out, R_in]", ranks)
        full = tucker_max_ranks(shape, groups)
        for r, top, mode in zip(ranks, full, ("R_out", "R_in"), strict=True):
            check_int(r, f"{what} ranks {mode}", 1, top)
        return LayerPlan(name, method, (ranks[0], ranks[1]))
    if method == "cp":
        rank = check_int(entry.get("rank"), f"{what} rank", 1, cp_max_rank(shape, groups))
        real = entry.get("realization")
        if real is not None:
            check_str(real, f"{what} realization", CP_REALIZATIONS)
        spatial = entry.get("spatial", "separable")
        check_str(spatial, f"{what} spatial", CP_SPATIAL)
        if spatial == "full" and real not in (None, "square"):
            raise ValueError(f"{what}: a full-kernel CP layer runs only as 'square', not {real!r}")
        return LayerPlan(name, method, rank, realization=real, spatial=spatial)
    order = entry.get("order")
    order = "dw-pw" if order is None else check_str(order, f"{what} order", ORDERS)
    rank = check_int(entry.get("rank"), f"{what} rank", 1, max_rank(shape, order, groups))
    real = entry.get("realization")
    if real is not None:
        check_str(real, f"{what} realization", REALIZATIONS[order])
    return LayerPlan(name, method, rank, order, real)


def check_recipe(model: nn.Module, recipe: Any) -> RecipePlan:
    """What :func:`~decouple.surgery.recipe.apply_recipe_` will do to ``model``, or why it can't.

    Layers that are already factored are left out (replaying a recipe twice changes nothing).
    """
    _check_header(recipe)
    names = _Model(model)
    folded = _check_folded(recipe.get("folded_bn"), names)
    fused = _check_fused(recipe.get("fused_linear"), names)
    layers = recipe["layers"]
    if not isinstance(layers, dict):
        raise type_error("recipe layers", "a dict of layer name -> structure", layers)
    plans = []
    for name, entry in layers.items():
        conv = names.conv(name, "recipe layer")
        if is_factored(conv):
            continue
        plans.append(_check_layer(name, conv, entry))
    return RecipePlan(folded, plans, _check_pruned(recipe.get("pruned"), names), fused)


def _check_fused(fused: Any, names: _Model) -> dict[str, str]:
    """Each pair is two ungrouped 1×1 convs whose widths meet; pairs already fused (replayed
    twice) are left out. Later checks see the fused shapes: the second conv reads the first's
    input, and the first is gone."""
    if fused is None:
        return {}
    if not isinstance(fused, dict):
        raise type_error("recipe fused_linear", "a dict of conv name -> conv name", fused)
    out = {}
    for a_name, b_name in fused.items():
        what = f"recipe fused_linear[{a_name!r}]"
        if isinstance(names.modules.get(a_name), FusedConv) and isinstance(b_name, str):
            if names.modules[a_name].into != b_name:
                raise ValueError(f"{what}: already fused into {names.modules[a_name].into!r}")
            continue  # replayed twice
        a = names.conv(a_name, "recipe fused_linear conv")
        b = names.conv(b_name, f"{what} conv")
        if is_factored(a) or is_factored(b):
            raise ValueError(f"{what}: a factored layer cannot be fused")
        for m, n in ((a, a_name), (b, b_name)):
            if not (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1):
                raise ValueError(f"{what}: {n!r} is not an ungrouped 1×1 conv")
        if b.in_channels != a.out_channels:
            raise ValueError(f"{what}: {b_name!r} does not read {a_name!r}'s channels")
        names.convs[b_name] = nn.Conv2d(a.in_channels, b.out_channels, 1, device="meta")
        del names.convs[a_name]
        out[a_name] = b_name
    return out


def _check_pruned(pruned: Any, names: _Model) -> list:
    """Each pruned chain's layers exist with the shapes pruning needs; chains already pruned
    (replayed twice) are left out."""
    if pruned is None:
        return []
    if not isinstance(pruned, dict):
        raise type_error("recipe pruned", "a dict of producer name -> chain", pruned)
    out = []
    for name, entry in pruned.items():
        what = f"recipe pruned {name!r}"
        if not isinstance(entry, dict):
            raise type_error(what, "a dict (a JSON object)", entry)
        check_keys(entry, PRUNED_KEYS, what)
        producer = names.conv(name, "recipe pruned producer")
        consumer = names.conv(entry.get("consumer"), f"{what} consumer")
        mids = entry.get("mids", [])
        if not isinstance(mids, list):
            raise type_error(f"{what} mids", "a list of module names", mids)
        if is_factored(producer) or is_factored(consumer):
            raise ValueError(f"{what}: a factored layer cannot be part of a pruned chain")
        width = geometry_of(producer).out_channels
        kept = check_int(entry.get("width"), f"{what} width", 1, width)
        if width == kept == geometry_of(consumer).in_channels:
            continue  # already pruned (replayed twice)
        if geometry_of(producer).groups != 1 or geometry_of(consumer).in_channels != width:
            raise ValueError(f"{what}: {entry['consumer']!r} does not read {name!r}'s channels")
        for mid in mids:
            m = names.modules.get(mid) if isinstance(mid, str) else None
            if not (isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels == width
                    or isinstance(m, nn.BatchNorm2d) and m.num_features == width):  # fmt: skip
                raise ValueError(f"{what}: mid {mid!r} is not a depthwise conv or BatchNorm of "
                                 f"{width} channels")  # fmt: skip
        out.append((Chain(name, tuple(mids), entry["consumer"], width), kept))
    return out

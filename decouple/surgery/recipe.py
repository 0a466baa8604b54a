"""Recipes: the structural change of a decoupling as plain JSON, replayed on a fresh model.

:func:`make_recipe` describes what :func:`~decouple.surgery.decouple_` did (folded BNs, each layer's
method, rank, order and realization); :func:`apply_recipe_` gives a freshly built architecture the
same structure, so that a saved ``state_dict`` of the decoupled model loads into it. A recipe read
from disk is untrusted: :mod:`decouple.surgery.recipe_check` checks all of it first.
"""

from __future__ import annotations

from torch import nn

from ..nn.guards import check_module, type_error
from ..nn.transaction import transaction
from .bn_fold import apply_fold_structure_, folded_pairs
from .chains import prune_shape_, pruned_chains
from .config import DecoupleConfig
from .linear_fuse import apply_fuse_structure_, fused_pairs
from .methods import empty_layer, is_factored, recipe_entry
from .recipe_check import RECIPE_FORMAT, RECIPE_VERSION, check_recipe
from .rewrite import LayerRecord

__all__ = ["RECIPE_FORMAT", "RECIPE_VERSION", "apply_recipe_", "make_recipe", "recipe_of_model"]


def make_recipe(records: list[LayerRecord], config: DecoupleConfig | None = None) -> dict:
    """A JSON-ready description of the structural change that :func:`apply_recipe_` replays."""
    if not isinstance(records, (list, tuple)) or not all(
        isinstance(r, LayerRecord) for r in records
    ):
        raise type_error("records", "a list of LayerRecord (what decouple_ returned)", records)
    return _recipe(
        config,
        folded_bn={r.name: r.bn_folded for r in records if r.bn_folded},
        layers={r.name: r.structure for r in records if r.action == "decoupled"},
        pruned={r.name: r.structure for r in records if r.action == "pruned"},
        fused={a: b for r in records if r.fused for a, b in r.fused.items()},
    )


def recipe_of_model(model: nn.Module, config: DecoupleConfig | None = None) -> dict:
    """The recipe of a decoupled ``model`` read from the model alone (no records): its factored
    layers and the BatchNorms folded by :func:`~decouple.surgery.fold_batchnorm_`."""
    check_module(model, "recipe_of_model", needs_values=False)
    return _recipe(
        config,
        folded_bn=folded_pairs(model),
        layers={n: recipe_entry(m) for n, m in model.named_modules() if is_factored(m)},
        pruned=pruned_chains(model),
        fused=fused_pairs(model),
    )


def _recipe(
    config: DecoupleConfig | None,
    folded_bn: dict,
    layers: dict,
    pruned: dict | None = None,
    fused: dict | None = None,
) -> dict:
    if config is not None and not isinstance(config, DecoupleConfig):
        raise type_error("config", "a DecoupleConfig or None", config)
    recipe = {
        "format": RECIPE_FORMAT,
        "version": RECIPE_VERSION,
        "config": config.to_dict() if config is not None else None,
        "folded_bn": folded_bn,
        "layers": layers,
    }
    if fused:  # absent otherwise, as "pruned": recipes without them read as before
        recipe["fused_linear"] = fused
    if pruned:  # absent otherwise: recipes without pruning read as before
        recipe["pruned"] = pruned
    return recipe


def apply_recipe_(model: nn.Module, recipe: dict) -> nn.Module:
    """Give a freshly built ``model`` the structure described by ``recipe``, in place.

    Folded BNs become ``nn.Identity`` (their convs gain a bias), fused 1×1 pairs one conv, and each listed conv becomes an
    empty factored layer of the recorded method, rank and order (entries without a method are
    network decoupling). Load the decoupled ``state_dict`` afterwards. Returns ``model``. The
    model may be on the meta device (only shapes are needed).

    Raises
    ------
    TypeError
        ``model`` is not an eager ``nn.Module``, or a recipe field has the wrong type.
    ValueError
        Not a recipe, an unknown key, a layer the model lacks or that is not a plain conv (the
        message names the nearest ones), or a rank outside ``[1, full rank]``. All checked
        before the model changes; on any failure it is restored.
    """
    check_module(model, "apply_recipe_", needs_values=False)
    plan = check_recipe(model, recipe)
    with transaction(model, "apply_recipe_"):
        apply_fold_structure_(model, plan.folded)
        apply_fuse_structure_(model, plan.fused)
        for chain, kept in plan.pruned:
            prune_shape_(model, chain, kept)
        for entry in plan.layers:
            conv = model.get_submodule(entry.name)
            layer = empty_layer(conv, entry.method, entry.rank, entry.order, entry.spatial)
            if entry.realization:
                layer.set_realization(entry.realization)
            model.set_submodule(entry.name, layer)
    return model

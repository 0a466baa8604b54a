"""Recipes: the structural change of a decoupling as plain JSON, replayed on a fresh model.

:func:`make_recipe` describes what :func:`~decouple.surgery.decouple_` did (folded BNs, each layer's
method, rank, order and realization); :func:`apply_recipe_` gives a freshly built architecture the
same structure, so that a saved ``state_dict`` of the decoupled model loads into it.
"""

from __future__ import annotations

from torch import nn

from .bn_fold import apply_fold_structure_
from .config import DecoupleConfig
from .methods import (
    FACTORED_LAYERS,
    empty_layer,
)
from .rewrite import LayerRecord

RECIPE_FORMAT = "decouple-recipe"


RECIPE_VERSION = 1


def make_recipe(records: list[LayerRecord], config: DecoupleConfig | None = None) -> dict:
    """A JSON-ready description of the structural change that :func:`apply_recipe_` replays."""
    return {
        "format": RECIPE_FORMAT,
        "version": RECIPE_VERSION,
        "config": config.to_dict() if config is not None else None,
        "folded_bn": {r.name: r.bn_folded for r in records if r.bn_folded},
        "layers": {r.name: r.structure for r in records if r.action == "decoupled"},
    }


def apply_recipe_(model: nn.Module, recipe: dict) -> nn.Module:
    """Give a freshly built ``model`` the structure described by ``recipe``, in place.

    Folded BNs become ``nn.Identity`` (their convs gain a bias) and each listed conv becomes an
    empty factored layer of the recorded method, rank and order (entries without a method are
    network decoupling). Load the decoupled ``state_dict`` afterwards. Returns ``model``.
    """
    if not isinstance(recipe, dict) or recipe.get("format") != RECIPE_FORMAT:
        raise ValueError("not a decouple recipe (missing format: 'decouple-recipe')")
    if recipe.get("version") != RECIPE_VERSION:
        raise ValueError(
            f"unsupported recipe version {recipe.get('version')!r}; this is {RECIPE_VERSION}"
        )
    apply_fold_structure_(model, recipe.get("folded_bn") or {})
    for name, spec in recipe["layers"].items():
        conv = model.get_submodule(name)
        if isinstance(conv, FACTORED_LAYERS):
            continue
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"recipe layer {name!r} is a {type(conv).__name__}, not a Conv2d")
        method = spec.get("method", "nd")
        rank = spec["ranks"] if method == "tucker" else spec["rank"]
        layer = empty_layer(conv, method, rank, spec.get("order") or "dw-pw")
        if spec.get("realization"):
            layer.set_realization(spec["realization"])
        model.set_submodule(name, layer)
    return model

"""Saving a decoupled model as the CLI does: weights, recipe, optional report, manifest last.

:func:`save_decoupled` is the library's counterpart of :func:`~decouple.io.checkpoint.load_decoupled`:
it writes the same set of files as ``python -m decouple`` (``x.pt``, ``x.recipe.json``, optionally
``x.report.json`` and ``x.report.md``, then ``x.manifest.json``) through the same all-or-nothing
:class:`~decouple.io.output_set.OutputSet`, so a set it writes reloads exactly like the CLI's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..nn.guards import check_module, type_error
from ..surgery.config import DecoupleConfig
from ..surgery.recipe import make_recipe, recipe_of_model
from ..surgery.rewrite import LayerRecord
from .checkpoint import check_keys, read_checkpoint, split_checkpoint
from .errors import InputError
from .manifest import check_output_set, manifest_path_for, name_manifest
from .output_set import OutputSet
from .outputs import recipe_path_for, sidecar_path, torch_bytes

__all__ = ["save_decoupled", "saved_paths"]


def saved_paths(path: str | os.PathLike, report: bool) -> dict[str, Path]:
    """The files :func:`save_decoupled` writes for weights at ``path``, the manifest last."""
    path = Path(path)
    paths = {"model": path, "recipe": recipe_path_for(path)}
    if report:
        paths["report"] = sidecar_path(path, ".report.json")
        paths["markdown"] = paths["report"].with_suffix(".md")
    paths["manifest"] = manifest_path_for(path)
    return paths


def save_decoupled(
    model: nn.Module,
    path: str | os.PathLike,
    records: Sequence[LayerRecord] | None = None,
    config: DecoupleConfig | None = None,
    *,
    report: Any = None,
    force: bool = False,
) -> dict[str, Path]:
    """Write a decoupled model's ``state_dict`` and its recipe (and report) as one output set.

    Parameters
    ----------
    model : nn.Module
        The decoupled model (what :func:`decouple.decouple_` or :func:`decouple.compress_` left).
    path : path-like
        Where the weights go; the recipe, report and manifest go beside it (``x.pt`` ->
        ``x.recipe.json``, ``x.report.json``, ``x.report.md``, ``x.manifest.json``).
    records : list of LayerRecord, optional
        What ``decouple_`` returned; without them the recipe is read from the model itself
        (its factored layers and folded BatchNorms).
    config : DecoupleConfig, optional
        Stored in the recipe for the record.
    report : object, optional
        A :class:`decouple.report.Report` (anything with ``to_json()`` and ``to_markdown()``).
    force : bool
        Replace existing files; otherwise any existing target raises :class:`InputError`.

    Returns
    -------
    dict of str to Path
        Each written file by role (``model``, ``recipe``, ``report``, ``markdown``, ``manifest``).

    Raises
    ------
    InputError
        An output exists (without ``force``), is a directory or special file, or its folder
        cannot be written; nothing is written then.
    TypeError
        A wrong argument type.

    Examples
    --------
    >>> records = decouple_(model, DecoupleConfig(rank=3))  # doctest: +SKIP
    >>> save_decoupled(model, "net.decoupled.pt", records)  # doctest: +SKIP
    >>> load_decoupled(build_net(), "net.decoupled.pt")  # doctest: +SKIP
    """
    check_module(model, "save_decoupled")
    if config is not None and not isinstance(config, DecoupleConfig):
        raise type_error("config", "a DecoupleConfig or None", config)
    if report is not None and not all(
        callable(getattr(report, f, None)) for f in ("to_json", "to_markdown")
    ):
        raise type_error("report", "a Report (with to_json and to_markdown) or None", report)
    if not isinstance(force, bool):
        raise type_error("force", "a bool", force)
    recipe = make_recipe(list(records), config) if records is not None else None
    if recipe is None:
        recipe = recipe_of_model(model, config)
    state = model.state_dict()
    with OutputSet.prepare(saved_paths(path, report is not None), [], force) as outputs:
        paths = outputs.paths
        recipe = name_manifest(recipe, paths["recipe"], paths["manifest"])
        payloads = {
            "model": torch_bytes(state),
            "recipe": (json.dumps(recipe, indent=2) + "\n").encode(),
        }
        if report is not None:
            payloads["report"] = (report.to_json() + "\n").encode()
            payloads["markdown"] = report.to_markdown().encode()

        def reloads(staged: Mapping[str, Path]) -> None:  # a set that cannot be reloaded is not
            check_output_set(staged["model"], staged["recipe"], recipe)  # written
            held = split_checkpoint(read_checkpoint(staged["model"]), staged["model"])
            if not isinstance(held, dict):
                raise InputError(f"{staged['model']} does not read back as a state_dict")
            check_keys(model, held, "the model being saved")
            if any(not torch.equal(held[k].cpu(), v.cpu()) for k, v in state.items()):
                raise InputError(f"{staged['model']} does not read back as written")

        outputs.write(payloads, verify=reloads)
    return paths

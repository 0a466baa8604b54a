"""Checks of the loaded model against the command line, before any heavy work: every ``--skip``
and ``--config`` pattern names a conv, the input shape when none was given, and a file that
decouple wrote itself (decoupling it again is almost always a mistake).
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path

from torch import nn

from ..io.checkpoint import read_checkpoint, split_checkpoint
from ..io.errors import InputError
from ..io.outputs import recipe_path_for
from ..io.torchvision_archs import torchvision_family, torchvision_input_shape
from ..models import get_model_info, list_models
from ..nn.discover import is_plain_conv2d, is_plain_layer
from ..surgery.config import DecoupleConfig
from ..surgery.methods import is_factored
from ..surgery.rewrite import decouplable_convs

TORCHVISION_SIZE = 224  # torchvision's classification weights take 224x224 crops
CIFAR_SIZE = 32
KNOWN_FAMILIES = ("torchvision.models", "decouple.models")  # where infer_input_shape knows sizes
# The parts of a factored layer in a state_dict: DecoupledConv2d, then CPConv2d/TuckerConv2d.
FACTORED_PARTS = (("depthwise", "pointwise"), ("pointwise_in", "pointwise_out"))


def conv_names(model: nn.Module) -> list[str]:
    """The plain convs and linear layers a pattern may name, in module order (not the parts of
    factored layers)."""
    factored = [n for n, m in model.named_modules() if is_factored(m)]
    return [
        n
        for n, m in model.named_modules()
        if is_plain_layer(m) and not any(n.startswith(f + ".") for f in factored)
    ]


def _matches(pattern: str, names: list[str]) -> bool:
    # As DecoupleConfig.spec_for: an exact module name, or a regex matching a whole name.
    return any(pattern == n or re.fullmatch(pattern, n) for n in names)


def _nearest(pattern: str, names: list[str]) -> str:
    close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.5)
    if close:
        return f"nearest: {', '.join(close)}"
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return f"its layers: {shown}" if names else "it has no plain Conv2d or Linear"


def check_patterns(
    model: nn.Module, config: DecoupleConfig, skips: list[str], config_path: str | None
) -> None:
    """Refuse a ``--skip`` or ``--config`` override pattern that matches no conv of ``model``: a
    typo there would otherwise decouple the layer it meant to protect, silently."""
    names = conv_names(model)
    for pattern, _ in config.overrides:
        if _matches(pattern, names):
            continue
        where = "--skip" if pattern in skips else f"--config {config_path}: override"
        raise InputError(
            f"{where} '{pattern}' matches no conv or linear layer of the model ({_nearest(pattern, names)})"
        )


def infer_input_shape(model: nn.Module) -> tuple[tuple[int, int, int], str] | None:
    """One input's shape for a model that does not say, and where it came from; None without a
    conv. Channels: the first conv's input; size: from the model's family."""
    first = next((m for m in model.modules() if is_plain_conv2d(m)), None)
    if first is None:
        return None
    cls = type(model)
    size, family = TORCHVISION_SIZE, f", a guess ({cls.__name__} is of no known family)"
    if cls.__module__.startswith("torchvision.models"):
        family = f" for {cls.__name__}, a torchvision model"
    elif cls.__module__.startswith("decouple.models"):
        size, family = CIFAR_SIZE, f" for {cls.__name__}, of decouple's zoo"
        # The registry knows the exact size of its own models (digits_cnn: 8x8).
        infos = [get_model_info(n) for n in list_models()]
        sizes = {i.input_shape[-1] for i in infos if i.builder.__module__ == cls.__module__}
        if len(sizes) == 1:
            size = sizes.pop()
    c = first.in_channels
    note = f"the first conv's {c} input channel{'s' * (c != 1)} and {size}x{size}{family}"
    return (first.in_channels, size, size), note


def is_of_known_family(model: nn.Module) -> bool:
    """Whether :func:`infer_input_shape` knows the size of ``model``'s family (else it guesses)."""
    return type(model).__module__.startswith(KNOWN_FAMILIES)


def check_not_decoupled_module(model: nn.Module, config: DecoupleConfig, path: Path) -> None:
    """Refuse a whole module that holds factored layers and no conv left to decouple."""
    n = sum(is_factored(m) for m in model.modules())
    if n and not decouplable_convs(model, config):
        raise InputError(already_decoupled(path, n, "load this one with torch.load"))


def decoupled_state_dict_layers(path: Path) -> int:
    """How many factored layers the state_dict in ``path`` holds (0: none, or not readable);
    a recipe beside it (``X.recipe.json``) counts too."""
    recipe = recipe_path_for(path)
    try:
        layers = json.loads(recipe.read_text()).get("layers") if recipe.is_file() else None
        if isinstance(layers, dict) and layers:
            return len(layers)
        held = split_checkpoint(read_checkpoint(path), path)
    except Exception:  # noqa: BLE001 - only a hint: the caller reports its own error instead
        return 0
    if isinstance(held, nn.Module):
        return 0
    prefixes = {k.rsplit(".", 2)[0] for k in held if k.count(".") >= 2}
    return sum(
        any(f"{p}.{a}.weight" in held and f"{p}.{b}.weight" in held for a, b in FACTORED_PARTS)
        for p in prefixes
    )


def already_decoupled(path: Path, n: int, reload: str) -> str:
    return (
        f"{path} is already decoupled (written by decouple: it has {n} factored layers); "
        f"decouple the original model, or {reload}"
    )


def load_checked_model(args, config: DecoupleConfig, model_path: Path, arch: str | None):
    """The model, its input shape, its kind and a note when the shape was inferred (else None);
    every check that needs the model but not its images done.

    The shape is ``--input-shape``, else the architecture's (a torchvision name's family, said in
    the note), else inferred by :func:`infer_input_shape`. Where that is only a guess (a model of
    no known family), the first ``--data``/``--calib`` image's shape after preprocessing wins.

    Raises
    ------
    InputError
        The file does not load or is decouple's own output, a torchvision family decouple cannot
        run (video, optical flow), a pattern matches no conv, or the model does not run on the
        shape.
    """
    from ..io.checkpoint import check_finite, load_model
    from .flags import parse_shape, skip_patterns
    from .inputs import check_model_runs, classifier_flags, first_image_shape

    try:
        model, shape, kind = load_model(model_path, arch, args.trust_pickle)
    except InputError:
        n = decoupled_state_dict_layers(model_path)
        if n:  # the keys of factored layers would otherwise read as a mismatch with --arch
            raise InputError(
                already_decoupled(model_path, n, "reload this one with decouple.load_decoupled")
            ) from None
        raise
    # A state_dict was loaded into --arch: a torchvision name's family says where its shape is from.
    tv = None
    if kind == "state_dict" and torchvision_family(arch):
        tv = torchvision_input_shape(arch, model)
    if tv is not None and tv[0] is None:
        raise InputError(f"--arch {arch} is {tv[1]}")
    check_finite(model)
    if kind == "module":
        check_not_decoupled_module(model, config, model_path)
    check_patterns(model, config, skip_patterns(args.skip), args.config)
    note = None
    if args.input_shape:
        shape = parse_shape(args.input_shape)
    elif tv is not None:
        note = tv[1]
    elif shape is None:
        inferred = infer_input_shape(model)
        if inferred is None:
            raise InputError("cannot tell what input this model takes; pass --input-shape C,H,W")
        shape, note = inferred
        seen = None if is_of_known_family(model) else first_image_shape(args, arch, shape[0])
        if seen is not None and seen[0][0] == shape[0]:  # the images say better than a guess
            shape = seen[0]
            note = (
                f"the first {seen[1]} image as preprocessing makes it "
                f"({type(model).__name__} is of no known family)"
            )
    check_model_runs(model, shape, classifier_flags(args))
    return model, shape, kind, note

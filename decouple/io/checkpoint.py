"""Loading untrusted model files safely, resolving ``--arch``, and reloading decoupled models.

A model file is untrusted: unpickling can run code. Files are read with ``weights_only=True``
unless the caller explicitly trusts them. Every problem with the user's input is raised as
:class:`~decouple.io.errors.InputError`, whose message is one line the CLI prints as it is.
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
import pickle
import sys
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..models import describe_models, get_model_info, list_models
from ..nn.discover import factored_layer_names
from ..nn.transaction import transaction
from ..surgery.recipe import apply_recipe_
from .errors import InputError
from .manifest import MANIFEST_KEY, check_output_set
from .outputs import recipe_path_for
from .recovery import recover_folder
from .torchvision_archs import build_torchvision, torchvision_input_shape

# Top-level modules that --arch imported from a folder: another folder's may replace them.
_ARCH_MODULES: set[str] = set()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name.lower(), known, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _describe(e: BaseException) -> str:
    """One line for an exception raised by user code; ``sys.exit`` says so."""
    if isinstance(e, SystemExit):
        return f"it called sys.exit({e.code!r})"
    return f"{type(e).__name__}: {_first_line(e)}"


def read_checkpoint(path: str | os.PathLike, trust_pickle: bool = False) -> object:
    """``torch.load`` a file on the CPU, with ``weights_only=True`` unless ``trust_pickle``."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"no such file: {path}")
    if not path.is_file():
        raise InputError(f"not a file: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        # Only a disallowed *global* means real pickled objects; other failures are damage.
        if not trust_pickle and "unsupported global" in str(e).lower():
            raise InputError(
                f"{path} holds pickled Python objects (such as a whole nn.Module); loading them can "
                "run code from the file, so it is refused. If you trust the file, re-run with --trust-pickle"
            ) from None
        raise InputError(f"cannot read {path}: {_what_is(path)}") from None
    except Exception:  # noqa: BLE001 - torch.load raises many types for damaged files
        raise InputError(f"cannot read {path}: {_what_is(path)}") from None


def _what_is(path: Path) -> str:
    """What a file torch cannot load looks like, from its first bytes: torch's own messages
    (``101``, ``pop from empty list``) mean nothing to a user."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        return e.strerror or "unreadable"
    if not head:
        return "the file is empty"
    if head.startswith(b"PK"):
        return "a zip archive that is not a whole PyTorch file (truncated or corrupt?)"
    if head[0] == 0x80:  # the pickle protocol mark of torch's legacy format
        return "a pickle that cannot be read whole (truncated or corrupt?)"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # not a character cut in two at the end of the sample
            return "not a PyTorch file, or a corrupt one (torch.save writes a zip archive)"
    return "a text file, not a PyTorch file (torch.save writes a zip archive)"


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def split_checkpoint(obj: object, path: str | os.PathLike = "the file") -> nn.Module | dict:
    """The model held by a loaded file: an ``nn.Module`` or a ``state_dict``.

    Accepts a bare ``state_dict``, a checkpoint dict holding one under ``state_dict``,
    ``model_state_dict`` or ``model``, or a whole module. Strips a ``module.`` prefix
    (``nn.DataParallel``).
    """
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), nn.Module):
                return obj[key]
            if _is_state_dict(obj.get(key)):
                obj = obj[key]
                break
    if not _is_state_dict(obj):
        kind = (
            f"a dict with keys {sorted(map(str, obj))[:5]}"
            if isinstance(obj, Mapping)
            else f"a {type(obj).__name__}"
        )
        raise InputError(f"not a model: {path} holds {kind}, not a state_dict or an nn.Module")
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


@contextmanager
def _cwd_on_path():
    saved = list(sys.path)
    sys.path.insert(0, os.getcwd())
    try:
        yield
    finally:
        sys.path[:] = saved


def _own_file(module: object) -> Path | None:
    file = getattr(module, "__file__", None)
    return Path(file).resolve() if file else None


def import_from_cwd(name: str) -> object:
    """Import module ``name`` as ``python -m`` would: from the current folder first.

    The ``decouple`` console script puts its own folder first on ``sys.path``, not the current
    one; the current folder is put first for this import only. A module of the same top-level
    name imported before, from another file, is never silently reused when the current folder
    holds one (``NAME.py`` or ``NAME/__init__.py``): one that an earlier ``--arch`` imported
    (another folder, in this process) is imported afresh; any other (a ``json.py`` here, while
    the standard library's is in use) raises ImportError naming both.
    """
    top = name.partition(".")[0]
    here = Path.cwd()
    local = next((p for p in (here / f"{top}.py", here / top / "__init__.py") if p.is_file()), None)
    loaded = sys.modules.get(top)
    if local is not None and loaded is not None and _own_file(loaded) != local.resolve():
        if top not in _ARCH_MODULES:
            raise ImportError(
                f"the current folder's {local.relative_to(here)} is shadowed by the module {top!r} "
                f"already in use (from {_own_file(loaded) or 'a built-in'}); rename yours"
            )
        for k in [k for k in sys.modules if k == top or k.startswith(top + ".")]:
            del sys.modules[k]
    importlib.invalidate_caches()  # a file written since the folder was last listed
    with _cwd_on_path():
        module = importlib.import_module(name)
    if local is not None:
        _ARCH_MODULES.add(top)
    return module


def build_arch(arch: str) -> tuple[nn.Module, tuple[int, ...] | None]:
    """Build ``arch`` with fresh weights; also return its input shape when known.

    ``arch`` is a name registered in :mod:`decouple.models`, a torchvision model name (built
    with ``weights=None`` and no pretrained backbone: nothing is downloaded), or
    ``package.module:callable``, imported from the current folder first (as ``python -m``
    would; see :func:`import_from_cwd`).
    """
    try:
        info = get_model_info(arch)
        return info.build(), info.input_shape
    except KeyError:
        pass
    if ":" in arch:
        mod_name, _, attr = arch.partition(":")
        # User code: SystemExit (``sys:exit``) and other BaseExceptions become one line too.
        # The builder runs with the current folder on sys.path too: it may import lazily.
        with _cwd_on_path():
            try:
                fn = getattr(import_from_cwd(mod_name), attr)
            except KeyboardInterrupt:
                raise
            except BaseException as e:  # noqa: BLE001
                raise InputError(f"cannot import --arch {arch}: {_describe(e)}") from None
            if not callable(fn):
                raise InputError(f"--arch {arch} is a {type(fn).__name__}, not a callable")
            try:
                model = fn()
            except KeyboardInterrupt:
                raise
            except BaseException as e:  # noqa: BLE001
                raise InputError(
                    f"--arch {arch} failed when called with no arguments: {_describe(e)}"
                ) from None
        if not isinstance(model, nn.Module):
            raise InputError(f"--arch {arch} returned a {type(model).__name__}, not an nn.Module")
        return model, None
    ours = describe_models()
    try:
        import torchvision
    except ImportError:
        raise InputError(
            f"unknown arch {arch!r}{_did_you_mean(arch, list_models())}: not one of decouple's "
            f"({ours}), and torchvision is not installed (pip install 'decouple[vision]'); "
            "package.module:callable also works"
        ) from None
    if arch not in torchvision.models.list_models():
        known = [*list_models(), *torchvision.models.list_models()]
        raise InputError(
            f"unknown arch {arch!r}{_did_you_mean(arch, known)}: not one of decouple's ({ours}), "
            "not a torchvision model, and not package.module:callable"
        )
    model = build_torchvision(arch)
    return model, torchvision_input_shape(arch, model)[0]


def check_keys(model: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise :class:`InputError` summarising how ``state_dict`` fails to fit ``model`` (``what``
    names the model for the message, e.g. ``--arch resnet18``)."""
    want = model.state_dict()
    # BatchNorm fills in a missing num_batches_tracked itself (older checkpoints lack it).
    missing = [k for k in want if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in want]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(want[k].shape)}"
        for k in want
        if k in state_dict and state_dict[k].shape != want[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if shapes:
        problems.append(f"{len(shapes)} of the wrong shape (e.g. {shapes[0]})")
    if problems:
        raise InputError(f"the weights do not match {what}: keys {'; '.join(problems)}")


def load_model(
    path: str | os.PathLike, arch: str | None = None, trust_pickle: bool = False
) -> tuple[nn.Module, tuple[int, ...] | None, str]:
    """Load a model file for decoupling.

    Returns
    -------
    model : nn.Module
        In eval mode, on the CPU.
    input_shape : tuple of int or None
        From the architecture's metadata when known.
    kind : {"module", "state_dict"}
        What the file held; outputs are written in the same kind.

    Raises
    ------
    InputError
        The file cannot be read or holds no model; a ``state_dict`` without ``arch``; weights
        that do not fit ``arch`` (a file decouple wrote, with factored layers, is named as
        already decoupled).
    """
    held = split_checkpoint(read_checkpoint(path, trust_pickle), path)
    if isinstance(held, nn.Module):
        return held.eval(), None, "module"
    if arch is None:
        raise InputError(
            f"{path} holds a state_dict (weights only); pass --arch NAME to say which network it is "
            f"(one of decouple's: {describe_models()}; a torchvision model name; or package.module:callable)"
        )
    model, shape = build_arch(arch)
    try:
        check_keys(model, held, f"--arch {arch}")
    except InputError:
        want = model.state_dict()
        factored = factored_layer_names(k for k in held if k not in want)
        if factored:  # our own output given back as input: say so, not "keys do not match"
            raise InputError(
                f"{path} is already decoupled (written by decouple: {len(factored)} factored "
                "layers); decouple the original model, or reload this one with "
                f"decouple.load_decoupled(model, {str(path)!r})"
            ) from None
        raise
    model.load_state_dict(held)
    return model.eval(), shape, "state_dict"


def check_finite(model: nn.Module) -> None:
    """Raise :class:`InputError` naming the first parameter or buffer holding NaN or Inf, or a
    BatchNorm running variance below zero (its square root would be NaN once folded)."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:
            raise InputError(f"the model's {name} is on the meta device (it holds no values)")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise InputError(f"the model has NaN or Inf values in {name}; refusing to decouple it")
    for name, m in model.named_modules():
        var = getattr(m, "running_var", None)
        if isinstance(m, nn.modules.batchnorm._NormBase) and var is not None and (var < 0).any():
            raise InputError(
                f"the BatchNorm {name} has a negative running_var ({float(var.min()):.3g}); "
                "the checkpoint is damaged"
            )


def load_decoupled(
    model: nn.Module, weights_path: str | os.PathLike, recipe_path: str | os.PathLike | None = None
) -> nn.Module:
    """Reload a decoupled ``state_dict`` into a freshly built copy of the original architecture.

    The recipe (default: the ``.recipe.json`` beside the weights) replays the structural change,
    then the weights load strictly, with ``weights_only=True``. Returns ``model`` in eval mode.
    When the recipe names a manifest (or one sits beside the weights), the weights and the recipe
    must match it. A set left half-written by a killed run is first rolled back or forward
    (:mod:`decouple.io.recovery`); one that still does not match raises :class:`InputError`.
    """
    recipe_file = Path(recipe_path or recipe_path_for(weights_path))
    # A writer killed mid-commit: its set is finished or undone first (one line on stderr).
    recover_folder(Path(weights_path).parent, [Path(weights_path), recipe_file])
    if not recipe_file.is_file():
        raise InputError(f"no such file: {recipe_file} (the recipe of {weights_path})")
    try:
        recipe = json.loads(recipe_file.read_text())
    except RecursionError:
        raise InputError(f"the recipe {recipe_file} is nested too deeply to be one") from None
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read the recipe {recipe_file}: {_first_line(e)}") from None
    check_output_set(weights_path, recipe_file, recipe)
    if isinstance(recipe, dict):
        recipe = {k: v for k, v in recipe.items() if k != MANIFEST_KEY}
    held = split_checkpoint(read_checkpoint(weights_path), weights_path)
    if isinstance(held, nn.Module):
        raise InputError(f"{weights_path} holds a whole module; load it with torch.load instead")
    with transaction(model, "load_decoupled"):  # weights that do not fit leave the model as it was
        apply_recipe_(model, recipe)
        # Checked first: load_state_dict copies what fits into the model before it complains.
        check_keys(model, held, f"the model rebuilt by {recipe_file.name}")
        model.load_state_dict(held)
    return model.eval()

"""The images of ``--data``, ``--calib`` and ``--demo``, preprocessed, and the model's input checked."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..io.checkpoint import InputError
from ..io.images import ImageSet, load_images
from ..models import get_model_info


def _channels(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"--{what} must be comma-separated numbers; got {text!r}") from None


def load_cli_images(args: argparse.Namespace, arch: str | None, shape: tuple[int, ...]):
    """``--data`` as ``(name, images, labels)`` and ``--calib`` as images, preprocessed.

    The mean and std come from ``--mean/--std``, else from the architecture's registry entry.
    Calibration never uses an image that ``--data`` holds (same source numbering, e.g. the
    CIFAR-10 test index), and takes a seeded sample of ``--calib-size`` images.
    """
    if args.demo:
        from .. import demo

        images, labels = demo.load_demo_test_set()
        data = ("digits test images", images, labels)
        calib = None
        if args.calib:
            raise InputError("--demo brings its own test images; --calib is not supported with it")
        return data, calib
    meta = {}
    if arch is not None:
        try:
            meta = get_model_info(arch).meta
        except KeyError:
            pass
    mean = _channels(args.mean, "mean") or meta.get("mean")
    std = _channels(args.std, "std") or meta.get("std")
    data = calib = None
    first_free = 0
    if args.data:
        held = _read_images(args.data, "--data")
        if held.labels is None:
            raise InputError(f"--data {args.data} has no labels; accuracy needs them")
        _check_image_shape(held, shape, "--data")
        data = (held.name, held.as_float(mean, std), held.labels)
        if held.indices is not None:
            first_free = int(held.indices.max()) + 1
    if args.calib:
        pool = _read_images(args.calib, "--calib", min_index=first_free, limit=args.calib_size)
        if len(pool) > args.calib_size:  # sources without their own sampling
            keep = torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))
            pool = pool.subset(keep[: args.calib_size].sort().values)
        _check_image_shape(pool, shape, "--calib")
        calib = pool.as_float(mean, std)
    return data, calib


def _read_images(path: str, what: str, **kwargs) -> ImageSet:
    if not Path(path).exists():
        raise InputError(f"{what}: no such file or directory: {path}")
    try:
        images = load_images(path, **kwargs)
    except (ValueError, OSError) as e:
        raise InputError(f"{what} {path}: {str(e).strip().splitlines()[0]}") from None
    if len(images) == 0:
        raise InputError(f"{what} {path} holds no images")
    return images


def _check_image_shape(images: ImageSet, shape: tuple[int, ...], what: str) -> None:
    if tuple(images.images.shape[1:]) != tuple(shape):
        raise InputError(
            f"{what} images have shape {tuple(images.images.shape[1:])}, "
            f"but the model takes {tuple(shape)}"
        )


def check_single_tensor_output(model: torch.nn.Module, shape: tuple[int, ...]) -> None:
    """Run ``model`` once on zeros: it must accept ``shape`` and return one tensor."""
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    try:
        with torch.no_grad():
            out = model(torch.zeros((1, *shape), dtype=dtype))
    except Exception as e:  # noqa: BLE001 - the user's model or shape
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(
            f"the model does not run on input shape {shape} ({msg}); pass --input-shape"
        ) from None
    if not isinstance(out, torch.Tensor):
        raise InputError(
            f"the model returns a {type(out).__name__}, not a single tensor; "
            "decouple compares the outputs of single-output models"
        )

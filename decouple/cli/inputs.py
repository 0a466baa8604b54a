"""The images of ``--data``, ``--calib`` and ``--demo``, preprocessed, and the model's input checked."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from ..io.datasets import loader, open_images, source_indices
from ..io.errors import InputError
from ..io.preprocess import Preprocess, default_preprocess


def _channels(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"--{what} must be comma-separated numbers; got {text!r}") from None


@dataclass
class Images:
    """One image source of the command line, streamed in mini-batches of ``(images, labels)``."""

    name: str
    batches: DataLoader
    count: int


def cli_preprocess(args: argparse.Namespace, arch: str | None) -> Preprocess:
    """The architecture's preprocessing with ``--resize/--crop/--mean/--std`` on top."""
    try:
        return default_preprocess(arch).with_overrides(
            resize=args.resize,
            crop=args.crop,
            mean=_channels(args.mean, "mean"),
            std=_channels(args.std, "std"),
        )
    except ValueError as e:
        raise InputError(f"preprocessing: {e}") from None


def load_cli_images(args: argparse.Namespace, arch: str | None, shape: tuple[int, ...]):
    """``--data`` and ``--calib`` as :class:`Images` (or None), prepared for the model.

    Calibration never uses an image that ``--data`` holds (same source numbering, e.g. the
    CIFAR-10 test index), and takes a seeded sample of ``--calib-size`` images.
    """
    if args.demo:
        from .. import demo

        if args.calib:
            raise InputError("--demo brings its own test images; --calib is not supported with it")
        images, labels = demo.load_demo_test_set()
        data = TensorDataset(images, labels)
        return Images("digits test images", loader(data, args.batch_size), len(data)), None
    prep = cli_preprocess(args, arch)
    data = calib = None
    first_free = 0
    if args.data:
        held = _open(args.data, "--data", prep, labelled=True)
        _check_image_shape(held, shape, "--data")
        data = Images(held.name, loader(held, args.batch_size, args.workers), len(held))
        indices = source_indices(held)
        if indices is not None:
            first_free = int(indices.max()) + 1
    if args.calib:
        pool = _open(
            args.calib, "--calib", prep, labelled=False, min_index=first_free, limit=args.calib_size
        )
        _check_image_shape(pool, shape, "--calib")
        calib = Images(pool.name, loader(pool, args.batch_size, args.workers), len(pool))
    return data, calib


def _open(path: str, what: str, prep: Preprocess, **kwargs):
    if not Path(path).exists():
        raise InputError(f"{what}: no such file or directory: {path}")
    try:
        images = open_images(path, prep, **kwargs)
    except (ValueError, OSError) as e:
        raise InputError(f"{what} {path}: {str(e).strip().splitlines()[0]}") from None
    if len(images) == 0:
        raise InputError(f"{what} {path} holds no images")
    return images


def _check_image_shape(images, shape: tuple[int, ...], what: str) -> None:
    try:
        got = tuple(images[0][0].shape)
    except (ValueError, OSError) as e:  # the first image cannot be read
        raise InputError(f"{what}: {str(e).strip().splitlines()[0]}") from None
    if got != tuple(shape):
        raise InputError(
            f"{what} images come out of preprocessing as {got}, but the model takes "
            f"{tuple(shape)}; give --resize/--crop (or --input-shape)"
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

"""The images of ``--data``, ``--calib`` and ``--demo``, preprocessed, and the model's input checked."""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from ..io.datasets import loader, numbered_source, open_images, source_indices
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
    synthesized: dict | None = None  # --calib synthetic: what making them took


SYNTHETIC = re.compile(r"synthetic(?::(\d+))?")
SYNTHETIC_PIXELS = 256 * 32 * 32  # --calib synthetic's default count: 256 at 32x32, 32 or more


def synthetic_count(args: argparse.Namespace, shape: tuple[int, ...]) -> int | None:
    """``--calib synthetic[:N]``: how many images to make (None: ``--calib`` names files)."""
    m = SYNTHETIC.fullmatch(args.calib or "")
    if m is None or Path(args.calib).exists():  # a file or folder of that name is one
        return None
    if m.group(1) is not None:
        return int(m.group(1))
    if args.calib_size:
        return args.calib_size
    pixels = shape[-1] * shape[-2] if len(shape) >= 3 else 1
    return max(32, min(256, SYNTHETIC_PIXELS // pixels))


def synthetic_calib(args: argparse.Namespace, model, shape: tuple[int, ...], count: int) -> Images:
    """ZeroQ images made from ``model``'s BatchNorm statistics (:mod:`decouple.calibrate.synthetic`),
    each followed by its mirror unless ``--no-mirror`` (the cache holds the made ones)."""
    from ..calibrate.synthetic import (
        LEARNING_RATE,
        STEPS,
        can_mirror,
        synthesize_images,
        with_mirrors,
    )
    from ..io import synthetic_cache
    from ..nn.stopwatch import stage

    if count < 1:
        raise InputError(f"--calib synthetic:{count}: make at least one image")
    settings = {"count": count, "seed": 0, "steps": STEPS, "lr": LEARNING_RATE, "batch": 64}
    path = synthetic_cache.path_for(model, shape, settings)
    hit = synthetic_cache.load(path, count, shape) if path else None
    if hit is not None:
        x, info = hit
        info["cached"] = str(path)
    else:
        try:
            with stage("synthesizing images"):
                x, made = synthesize_images(
                    model, shape, count, progress=not args.quiet, mirror=False
                )
        except ValueError as e:
            raise InputError(f"--calib synthetic: {e}") from None
        info = made.to_dict()
        if path is not None:
            try:
                synthetic_cache.store(path, x, info)
            except OSError as e:  # a read-only home: the run goes on, uncached
                print(f"decouple: note: the synthetic images are not cached ({path.parent}: "
                      f"{e.strerror or e})", file=sys.stderr)  # fmt: skip
        info = info | {"cached": None}
    info["mirrored"] = not args.no_mirror and can_mirror(shape)
    x = with_mirrors(x.cpu()) if info["mirrored"] else x.cpu()  # where file images are too
    data = TensorDataset(x, torch.zeros(len(x), dtype=torch.long))
    name = f"{count} images synthesized from the model's BatchNorm statistics"
    name += " and their mirrors" if info["mirrored"] else ""
    return Images(name, loader(data, args.batch_size), len(x), info)


PREPROCESS_FLAGS = ("resize", "crop", "mean", "std")
# --calib-size's default: as many images as 512 ImageNet-size (224x224) ones hold pixels, between
# 512 and 2048. Calibration costs about the same per pixel, and on 32x32 images 512 is short: on
# the shared CIFAR ResNets 2048 kept 0.7 to 0.8 more points of top-1 at --target-latency 0.6, and
# --max-change judges on 512 held-out images instead of 128 (one image: 0.2 %, not 0.8 %); at
# --target-flops 0.4 the two sizes were within noise (results/cli_targets.md).
CALIB_PIXELS = 512 * 224 * 224
CALIB_SIZES = (512, 2048)


def default_calib_size(shape: tuple[int, ...]) -> int:
    """Calibration images to use when ``--calib-size`` is not given, for inputs of ``shape``."""
    if len(shape) < 3:  # no image plane to measure
        return CALIB_SIZES[0]
    return max(CALIB_SIZES[0], min(CALIB_SIZES[1], CALIB_PIXELS // (shape[-1] * shape[-2])))


def cli_preprocess(
    args: argparse.Namespace, arch: str | None, channels: int | None = None
) -> Preprocess:
    """The architecture's preprocessing with ``--resize/--crop/--mean/--std`` on top, checked
    against the model's input ``channels`` when known."""
    try:
        prep = default_preprocess(arch).with_overrides(
            resize=args.resize,
            crop=args.crop,
            mean=_channels(args.mean, "mean"),
            std=_channels(args.std, "std"),
        )
        if channels is not None:
            prep.check_channels(channels)
        return prep
    except ValueError as e:
        raise InputError(f"preprocessing: {e}") from None


def check_image_flags(args: argparse.Namespace) -> None:
    """Image flags that would be silently ignored are refused before anything is loaded."""
    given = [f"--{f}" for f in PREPROCESS_FLAGS if getattr(args, f) is not None]
    if args.demo and given:
        raise InputError(
            f"{', '.join(given)}: not used with --demo, which brings its own prepared images"
        )
    if not args.demo and given and not (args.data or args.calib):
        raise InputError(f"{', '.join(given)}: prepares --data/--calib images; give one of them")
    cli_preprocess(args, None)  # malformed values fail now, not after the model is loaded
    if args.data and args.calib and not SYNTHETIC.fullmatch(args.calib):
        check_disjoint_sources(Path(args.data), Path(args.calib))


def check_disjoint_sources(data: Path, calib: Path) -> None:
    """Refuse a ``--calib`` that is, holds or sits inside ``--data`` when the source does not
    number its images (only numbered sources, like CIFAR-10's test index, can be split)."""
    d, c = data.resolve(), calib.resolve()
    if d == c and d.is_file() and numbered_source(d):
        return  # split by index: calibration takes only images --data does not hold
    if d == c or d in c.parents or c in d.parents:
        raise InputError(
            f"--calib {calib} and --data {data} share images; calibrating on evaluation images "
            "would flatter the accuracy. Give disjoint sources"
        )


def load_cli_images(args: argparse.Namespace, arch: str | None, shape: tuple[int, ...]):
    """``--data`` and ``--calib`` as :class:`Images` (or None), prepared for the model.

    Calibration never uses an image that ``--data`` holds (same source numbering, e.g. the
    CIFAR-10 test index), and takes a seeded sample of ``--calib-size`` images (by default
    :func:`default_calib_size`); ``--calib synthetic[:N]`` is left to :func:`synthetic_calib`.
    """
    if args.demo:
        from .. import demo

        if args.calib:
            raise InputError("--demo brings its own test images; --calib is not supported with it")
        images, labels = demo.load_demo_test_set()
        data = TensorDataset(images, labels)
        return Images("digits test images", loader(data, args.batch_size), len(data)), None
    prep = cli_preprocess(args, arch, shape[0])
    data = calib = None
    first_free = 0
    if args.data:
        held = _open(args.data, "--data", prep, labelled=True)
        _check_image_shape(held, shape, "--data")
        data = Images(held.name, loader(held, args.batch_size, args.workers), len(held))
        indices = source_indices(held)
        if indices is not None:
            first_free = int(indices.max()) + 1
    if args.calib and synthetic_count(args, shape) is None:
        pool = _open(
            args.calib,
            "--calib",
            prep,
            labelled=False,
            min_index=first_free,
            limit=args.calib_size or default_calib_size(shape),
            allow_empty=first_free > 0,
        )
        if len(pool) == 0:
            raise InputError(
                f"--calib {args.calib}: every image it holds is also in --data (calibration never "
                "uses evaluation images); give other images"
            )
        _check_image_shape(pool, shape, "--calib")
        calib = Images(pool.name, loader(pool, args.batch_size, args.workers), len(pool))
    return data, calib


def _open(path: str, what: str, prep: Preprocess, allow_empty: bool = False, **kwargs):
    if not Path(path).exists():
        raise InputError(f"{what}: no such file or directory: {path}")
    try:
        images = open_images(path, prep, **kwargs)
    except (ValueError, OSError) as e:
        raise InputError(f"{what} {path}: {str(e).strip().splitlines()[0]}") from None
    if len(images) == 0 and not allow_empty:
        raise InputError(f"{what} {path} holds no images")
    return images


def first_image_shape(
    args: argparse.Namespace, arch: str | None, channels: int
) -> tuple[tuple[int, ...], str] | None:
    """The first ``--data`` (else ``--calib``) image's shape as preprocessing makes it, and the
    flag it came from; None without images. The source is opened again by
    :func:`load_cli_images` (only a model whose input is a guess asks)."""
    if args.demo or not (args.data or args.calib):
        return None
    if not args.data and synthetic_count(args, (channels, 1, 1)) is not None:
        return None  # made in the model's input shape: nothing to read it from
    what, path = ("--data", args.data) if args.data else ("--calib", args.calib)
    prep = cli_preprocess(args, arch, channels)
    images = _open(path, what, prep, labelled=what == "--data", limit=1)
    return _first_shape(images, what), what


def _first_shape(images, what: str) -> tuple[int, ...]:
    try:
        return tuple(images[0][0].shape)
    except (ValueError, OSError) as e:  # the first image cannot be read
        raise InputError(f"{what}: {str(e).strip().splitlines()[0]}") from None


def _check_image_shape(images, shape: tuple[int, ...], what: str) -> None:
    got = _first_shape(images, what)
    if got != tuple(shape):
        raise InputError(
            f"{what} images come out of preprocessing as {got}, but the model takes "
            f"{tuple(shape)}; give --resize/--crop (or --input-shape)"
        )


def classifier_flags(args: argparse.Namespace) -> list[str]:
    """The flags given that judge the model by its top-1 class, so need class logits."""
    wanted = (
        ("--data", getattr(args, "data", None)),
        ("--max-change", getattr(args, "max_change", None)),
    )
    return [flag for flag, value in wanted if value is not None]


def check_model_runs(
    model: torch.nn.Module, shape: tuple[int, ...], classifier_for: list[str] = ()
) -> None:
    """Run ``model`` once on zeros: it must accept ``shape`` and return at least one tensor, in
    any structure (a tuple, a dict of segmentation maps, a detector's list of dicts). When
    ``classifier_for`` names flags (``--data``: accuracy; ``--max-change``: top-1 agreement), the
    output must be class logits, one (batch, classes) tensor: refused now, not after the work."""
    from ..nn.outputs import class_logits, describe_output, flatten_output

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
    try:
        found = bool(flatten_output(out))
        what = describe_output(out)
    except ValueError as e:  # nested past any real output
        raise InputError(str(e)) from None
    if not found:
        raise InputError(f"the model returns {what}: there is no output to compare")
    if classifier_for and class_logits(out) is None:
        raise InputError(
            f"{' and '.join(classifier_for)} need{'s' * (len(classifier_for) == 1)} a classifier, "
            f"whose output is class logits (batch, classes); the model returns {what}"
        )

"""A ``.pt`` state_dict for ``--arch cifar_mbv2``, from the shared MobileNetV2-style ONNX model.

Run (needs ``onnx``; a second or two):

    python experiments/mbv2_from_onnx.py [--onnx PATH] [--out mbv2_cifar10.pt] [--force]

It builds ``cifar_mbv2``, loads the ONNX file's initializers into it with ``strict=True`` and
saves its ``state_dict``; then the CLI takes it like any checkpoint:

    decouple mbv2_cifar10.pt --arch cifar_mbv2 ...

The default ONNX file is ``mbv2_tinymlperf_alibaba_cifar10.onnx`` in the shared assets
(``$DECOUPLE_ASSETS`` or ``../shared/assets/cifar10``). An existing output is kept unless
``--force`` is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from decouple.io.errors import InputError
from decouple.io.images import shared_assets_dir
from decouple.io.onnx_weights import state_dict_from_onnx
from decouple.models import build_model

ONNX_NAME = "mbv2_tinymlperf_alibaba_cifar10.onnx"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--onnx", type=Path, help=f"the ONNX model (default: the shared {ONNX_NAME})")
    p.add_argument("--out", type=Path, default=Path("mbv2_cifar10.pt"), help="the .pt to write")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    args = p.parse_args(argv)
    if args.onnx is None:
        assets = shared_assets_dir()
        if assets is None:
            p.error("the shared assets were not found; pass --onnx PATH")
        args.onnx = assets / ONNX_NAME
    if args.out.exists() and not args.force:
        p.error(f"{args.out} exists; pass --force to overwrite it")
    return args


def convert(onnx_path: Path, out: Path) -> int:
    """Load ``onnx_path`` into ``cifar_mbv2`` strictly and save its state_dict to ``out``;
    return the number of tensors written."""
    model = build_model("cifar_mbv2")
    try:
        model.load_state_dict(state_dict_from_onnx(onnx_path), strict=True)
    except RuntimeError as e:  # shapes or names that are not this architecture's
        raise InputError(f"{onnx_path} does not fit cifar_mbv2: {str(e).splitlines()[0]}") from None
    state = model.state_dict()
    torch.save(state, out)
    return len(state)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        n = convert(args.onnx, args.out)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({n} tensors) from {args.onnx}; use it with --arch cifar_mbv2")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""From parsed flags to configs: ``DecoupleConfig``, ``LatencyConfig`` and the input shape, each checked
before anything is loaded.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from ..io.checkpoint import InputError
from ..runtime.latency import LatencyConfig
from ..surgery.config import AUTO, DecoupleConfig

MAX_INPUT_ELEMENTS = 3 * 4096 * 4096  # per image
MAX_WORKERS = 64
MAX_JSON_BYTES = 16 << 20  # a config or recipe is a few kB; more is not one


def make_config(args: argparse.Namespace) -> DecoupleConfig:
    """The config from ``--config`` (if any) with the command-line flags applied on top."""
    data = {"fold_bn": True}
    if args.config:
        loaded = read_json_file(args.config, "--config")
        if not isinstance(loaded, dict):
            raise InputError(f"--config {args.config} must hold a JSON object (a DecoupleConfig)")
        data.update(loaded)
    if args.rank is not None or args.energy is not None:
        data["rank"], data["energy"] = args.rank, args.energy
    budget = any(v is not None for v in (args.target_flops, args.target_latency, args.max_change))
    if args.method:
        data["method"] = args.method
    elif budget and "method" not in data and not args.order:
        data["method"] = AUTO  # a budget chooses among every method (see README: defaults)
    if args.order:
        if data.get("method", "nd") != "nd":
            raise InputError(f"--order applies to --method nd only, not {data['method']}")
        data["order"] = args.order
    if data.get("method") == AUTO and not budget:
        raise InputError(
            "--method auto chooses per layer under a budget: add --target-flops, "
            "--target-latency or --max-change"
        )
    if args.fold_bn is not None:
        data["fold_bn"] = args.fold_bn
    overrides = data.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise InputError("the config's overrides must be a JSON object of name -> rule")
    data["overrides"] = {**overrides, **{name: "skip" for name in skip_patterns(args.skip)}}
    if args.include_stem:
        data["include_stem"] = True
    if args.rank_multiple is not None:
        if not budget:
            raise InputError(
                "--rank-multiple shapes the ranks a budget chooses: add --target-flops, "
                "--target-latency or --max-change"
            )
        data["rank_multiple"] = args.rank_multiple
    try:
        config = DecoupleConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        where = f"--config {args.config}" if args.config else "the flags"
        raise InputError(f"{where}: {str(e).strip().splitlines()[0]}") from None
    ranked = any(not s.skip for _, s in config.overrides)
    if config.rank is None and config.energy is None and not ranked and not budget:
        raise InputError(
            "say how many terms to keep: --rank T, --energy E, --target-flops R, "
            "--target-latency R or --max-change P (or per-layer ranks in --config)"
        )
    if args.max_change is not None:
        if not 0 <= args.max_change < 100:
            raise InputError(
                f"--max-change must be a percentage in [0, 100); got {args.max_change}"
            )
        if not args.calib:
            raise InputError(
                "--max-change measures changed predictions on held-out calibration images: "
                "pass --calib"
            )
    if args.target_flops is not None and not 0 < args.target_flops <= 1:
        raise InputError(f"--target-flops must be a fraction in (0, 1]; got {args.target_flops}")
    if args.criterion in ("data", "output") and not args.calib:
        raise InputError(
            f"--criterion {args.criterion} measures layers on calibration images: pass --calib"
        )
    if args.calib_size is not None and args.calib_size < 1:
        raise InputError(f"--calib-size must be >= 1; got {args.calib_size}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1; got {args.batch_size}")
    if not 0 <= args.workers <= MAX_WORKERS:
        raise InputError(f"--workers must be in 0..{MAX_WORKERS}; got {args.workers}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: PyTorch sees no CUDA device here")
    if args.target_latency is not None and not 0 < args.target_latency <= 1:
        raise InputError(
            f"--target-latency must be a fraction in (0, 1]; got {args.target_latency}"
        )
    return config


def skip_patterns(values: list[str]) -> list[str]:
    """The patterns of every ``--skip``: each value is one pattern or a comma list; a comma
    inside ``{...}`` belongs to a regex quantifier (``layer{1,2}``), not the list."""
    patterns = []
    for value in values:
        depth, start = 0, 0
        for i, ch in enumerate(value + ","):
            depth += {"{": 1, "}": -1}.get(ch, 0)
            if ch == "," and depth <= 0:
                pattern = value[start:i].strip()
                if not pattern:
                    raise InputError(f"--skip {value!r}: an empty pattern (a stray comma?)")
                patterns.append(pattern)
                start = i + 1
    return patterns


def read_json_file(path: str, what: str) -> object:
    """A small JSON file read as untrusted input: a regular file, bounded in size and depth."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what}: no such file: {path}")
    if not p.is_file():  # a FIFO would block the read forever
        raise InputError(f"{what} {path} is not a regular file")
    try:
        if p.stat().st_size > MAX_JSON_BYTES:
            raise InputError(f"{what} {path} is over {MAX_JSON_BYTES >> 20} MiB; not a config")
        return json.loads(p.read_text(encoding="utf-8"))
    except RecursionError:
        raise InputError(f"{what} {path} is nested too deeply to be a config") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        msg = str(e).strip().splitlines()[0]
        raise InputError(f"cannot read {what} {path}: {msg}") from None


def make_latency_config(args: argparse.Namespace) -> LatencyConfig | None:
    """The latency settings, or None when neither --latency nor --target-latency is given
    (--runtime, --batch and --threads then say what the predicted speed is for: they are
    checked all the same)."""
    if args.runtime == "onnxruntime":
        need_export_packages()
    try:
        config = LatencyConfig(
            runtime=args.runtime, batch=args.batch, device=args.device, threads=args.threads,
            layer_table=args.latency_table,
        )  # fmt: skip
    except ValueError as e:
        raise InputError(f"latency settings: {e}") from None
    return config if args.latency or args.target_latency is not None else None


def need_export_packages() -> None:
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(f"{' and '.join(missing)} not installed; pip install 'decouple[export]'")


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"--input-shape must be C,H,W with positive integers; got {text!r}")
    if math.prod(shape) > MAX_INPUT_ELEMENTS:  # one image; a typo here would exhaust memory
        raise InputError(
            f"--input-shape {text} is {math.prod(shape):,} values per image; the most is "
            f"{MAX_INPUT_ELEMENTS:,} (e.g. 3,4096,4096)"
        )
    return shape

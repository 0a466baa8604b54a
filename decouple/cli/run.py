"""``python -m decouple MODEL --rank T``: decouple a model file, write it and a report.

Bad input ends with one line on stderr and exit status 2. The input file is never modified;
outputs are written atomically and nothing on disk is overwritten without ``--force``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from .allocate import CRITERIA
from .bn_fold import fold_batchnorm_
from .calibrate import REFIT_MODES
from .compress import compress_
from .config import DecoupleConfig
from .data import ImageSet, load_images
from .decomposition import ORDERS
from .evaluate import evaluate
from .latency import RUNTIMES, LatencyConfig, compare
from .methods import METHODS
from .model_io import (
    WEIGHT_SUFFIXES,
    InputError,
    check_finite,
    check_output_paths,
    load_model,
    recipe_path_for,
    sidecar_path,
    torch_bytes,
    write_files_atomically,
)
from .models import get_model_info
from .report import build_report
from .surgery import make_recipe

EPILOG = """examples:
  decouple --demo --rank 3                       the bundled digits CNN, accuracy before/after
  decouple resnet18.pt --arch resnet18 --rank 2  a torchvision state_dict
  decouple net.pt --arch mypkg.nets:build --energy 0.9 --skip 'layer4\\..*'
  decouple whole_model.pt --trust-pickle --rank 3 --order pw-dw
  decouple net.pt --arch cifar_resnet20 --method tucker --target-flops 0.5 --calib cifar.tar
  decouple r18.pt --arch resnet18 --rank 2 --skip conv1 --latency --runtime onnxruntime --onnx
  decouple r18.pt --arch resnet18 --target-latency 0.6 --batch 8 --skip conv1

outputs (next to MODEL unless --out/--report say otherwise):
  X.decoupled.pt           the decoupled model, same kind as the input (state_dict or module)
  X.decoupled.recipe.json  replays the change on a fresh architecture: decouple.load_decoupled()
  X.decoupled.report.json  per-layer error, params, FLOPs (and latency); and .report.md
  X.decoupled.onnx         with --onnx
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        raise InputError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="decouple",
        description="Rewrite each k×k Conv2d of a trained model as T depthwise-separable terms "
        "(network decoupling), without retraining, and report what was gained and lost.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model",
        nargs="?",
        metavar="MODEL",
        help="a state_dict or checkpoint file (with --arch), or a whole pickled "
        "nn.Module (with --trust-pickle)",
    )
    p.add_argument(
        "--demo",
        action="store_true",
        help="use the bundled digits CNN and its test split instead of MODEL",
    )
    p.add_argument(
        "--arch",
        metavar="NAME",
        help="architecture of a state_dict: a decouple model name, a torchvision model "
        "name (built with weights=None), or package.module:callable",
    )
    rank = p.add_mutually_exclusive_group()
    rank.add_argument(
        "--rank",
        type=int,
        metavar="T",
        help="terms per layer (>= 1): nd T per channel slice; cp R per group; tucker r per mode",
    )
    rank.add_argument(
        "--energy",
        type=float,
        metavar="E",
        help="per layer, smallest T keeping this fraction of singular-value energy, in (0, 1] "
        "(tucker: per channel mode; not for cp)",
    )
    rank.add_argument(
        "--target-latency",
        type=float,
        metavar="R",
        help="choose per-layer T and realization from measured per-layer latency tables so the "
        "model keeps this fraction of its measured latency, in (0, 1] (implies --latency)",
    )
    rank.add_argument(
        "--target-flops",
        type=float,
        metavar="R",
        help="choose per-layer T so the model keeps this fraction of its FLOPs, in (0, 1]",
    )
    p.add_argument(
        "--criterion",
        choices=CRITERIA,
        help="rank allocation criterion for --target-flops: singular-value energy (data-free, "
        "default) or measured layer output error on --calib images",
    )
    p.add_argument(
        "--data",
        metavar="PATH",
        help="labelled images for accuracy before/after: the CIFAR-10 test batch file, the "
        "CIFAR-10 JPEG tar, an ImageFolder directory, or a .pt of {images, labels}",
    )
    p.add_argument(
        "--calib",
        metavar="PATH",
        help="unlabelled images (same forms as --data) to refit the decoupled layers on; "
        "images that --data also holds are never used",
    )
    p.add_argument(
        "--calib-size", type=int, default=512, metavar="N", help="calibration images (default 512)"
    )
    p.add_argument(
        "--refit",
        choices=REFIT_MODES,
        default="auto",
        help="calibration refit: last factor, alternating, the better per layer (auto), or none",
    )
    p.add_argument(
        "--mean", metavar="R,G,B", help="per-channel mean for --data/--calib pixels in [0, 1]"
    )
    p.add_argument(
        "--std", metavar="R,G,B", help="per-channel std (default: from the arch, if known)"
    )
    p.add_argument(
        "--method",
        choices=METHODS,
        help="nd: network decoupling (default); cp: CP, 1x1 -> kx1 -> 1xk -> 1x1; "
        "tucker: Tucker-2, 1x1 -> kxk -> 1x1",
    )
    p.add_argument(
        "--order",
        choices=ORDERS,
        help="network decoupling: depthwise first (dw-pw, default) or pointwise first",
    )
    p.add_argument(
        "--skip",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME|REGEX",
        help="layers to leave as they are (exact module names or regexes)",
    )
    p.add_argument(
        "--config",
        metavar="JSON",
        help="a DecoupleConfig JSON file (e.g. per-layer ranks); the flags above override it",
    )
    p.add_argument(
        "--fold-bn",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fold BatchNorm into the conv feeding it before decoupling (default: on)",
    )
    p.add_argument(
        "--input-shape",
        metavar="C,H,W",
        help="one input's shape, for FLOPs and the output check (default: from the arch)",
    )
    timing = p.add_argument_group("latency (measured with torch.utils.benchmark)")
    timing.add_argument(
        "--latency",
        action="store_true",
        help="time every decoupled layer's realizations against its original conv, keep the "
        "fastest (the original where nothing is faster), and report model latency before/after",
    )
    timing.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="eager",
        help="where latency is measured: PyTorch eager (NCHW), eager channels-last, or ONNX "
        "Runtime (CPU); default eager",
    )
    timing.add_argument(
        "--batch", type=int, default=1, metavar="B", help="batch size for latency (default 1)"
    )
    timing.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="device for latency (default cpu)"
    )
    timing.add_argument(
        "--threads", type=int, metavar="N", help="CPU threads (default: PyTorch's setting)"
    )
    p.add_argument(
        "--onnx",
        action="store_true",
        help="also write the decoupled model as ONNX (X.decoupled.onnx), checked with the onnx "
        "checker and against ONNX Runtime",
    )
    p.add_argument(
        "--out", metavar="PATH", help="decoupled model file (default: MODEL with .decoupled)"
    )
    p.add_argument("--report", metavar="PATH", help="report JSON (a Markdown copy goes beside it)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow loading a whole pickled model; unpickling runs code from the file",
    )
    return p


def make_config(args: argparse.Namespace) -> DecoupleConfig:
    """The config from ``--config`` (if any) with the command-line flags applied on top."""
    data = {"fold_bn": True}
    if args.config:
        try:
            loaded = json.loads(Path(args.config).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"cannot read --config {args.config}: {e}") from None
        if not isinstance(loaded, dict):
            raise InputError(f"--config {args.config} must hold a JSON object (a DecoupleConfig)")
        data.update(loaded)
    if args.rank is not None or args.energy is not None:
        data["rank"], data["energy"] = args.rank, args.energy
    if args.method:
        data["method"] = args.method
    if args.order:
        if data.get("method", "nd") != "nd":
            raise InputError(f"--order applies to --method nd only, not {data['method']}")
        data["order"] = args.order
    if args.fold_bn is not None:
        data["fold_bn"] = args.fold_bn
    overrides = data.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise InputError("the config's overrides must be a JSON object of name -> rule")
    data["overrides"] = {**overrides, **{name: "skip" for name in args.skip}}
    config = DecoupleConfig.from_dict(data)
    ranked = any(not s.skip for _, s in config.overrides)
    budget = args.target_flops is not None or args.target_latency is not None
    if config.rank is None and config.energy is None and not ranked and not budget:
        raise InputError(
            "say how many terms to keep: --rank T, --energy E, --target-flops R or "
            "--target-latency R (or per-layer ranks in --config)"
        )
    if args.target_flops is not None and not 0 < args.target_flops <= 1:
        raise InputError(f"--target-flops must be a fraction in (0, 1]; got {args.target_flops}")
    if args.criterion == "data" and not args.calib:
        raise InputError("--criterion data measures layers on calibration images: pass --calib")
    if args.calib_size < 1:
        raise InputError(f"--calib-size must be >= 1; got {args.calib_size}")
    if args.target_latency is not None and not 0 < args.target_latency <= 1:
        raise InputError(
            f"--target-latency must be a fraction in (0, 1]; got {args.target_latency}"
        )
    return config


def make_latency_config(args: argparse.Namespace) -> LatencyConfig | None:
    """The latency settings, or None when neither --latency nor --target-latency is given."""
    if not (args.latency or args.target_latency is not None):
        for flag, value, default in (
            ("--runtime", args.runtime, "eager"),
            ("--batch", args.batch, 1),
            ("--device", args.device, "cpu"),
            ("--threads", args.threads, None),
        ):
            if value != default:
                raise InputError(f"{flag} sets how latency is measured: add --latency")
        return None
    if args.runtime == "onnxruntime":
        _need_export_packages()
    try:
        return LatencyConfig(
            runtime=args.runtime, batch=args.batch, device=args.device, threads=args.threads
        )
    except ValueError as e:
        raise InputError(f"latency settings: {e}") from None


def _need_export_packages() -> None:
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
    return shape


def output_paths(args: argparse.Namespace, model_path: Path, out_dir: Path) -> dict[str, Path]:
    """The four output files; see the epilog of ``--help``."""
    if args.out:
        out = Path(args.out)
    else:  # net.pt -> net.decoupled.pt; net -> net.decoupled
        keep = model_path.suffix if model_path.suffix in WEIGHT_SUFFIXES else ""
        out = out_dir / sidecar_path(model_path, ".decoupled" + keep).name
    if args.report:
        report = Path(args.report)
        report = report.with_suffix(".json") if report.suffix == ".md" else report
    else:
        report = sidecar_path(out, ".report.json")
    paths = {
        "model": out,
        "recipe": recipe_path_for(out),
        "report": report,
        "markdown": report.with_suffix(".md"),
    }
    if args.onnx:
        paths["onnx"] = sidecar_path(out, ".onnx")
    return paths


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
        from . import demo

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


def _single_tensor_output(model: torch.nn.Module, shape: tuple[int, ...]) -> None:
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


def run(args: argparse.Namespace) -> int:
    if args.demo:
        from . import demo

        if args.model:
            raise InputError("give either MODEL or --demo, not both")
        model_path, arch = demo.model_path(), "digits_cnn"
    elif args.model is None:
        raise InputError("give a MODEL file to decouple (or --demo to try the bundled example)")
    else:
        model_path, arch = Path(args.model), args.arch
    config = make_config(args)
    make_latency_config(args)  # bad latency flags fail before anything is loaded
    if args.onnx:
        _need_export_packages()
    out_dir = model_path.parent
    if args.demo and not args.out:  # never write into the installed package, nor over anything
        out_dir = Path(tempfile.mkdtemp(prefix="decouple-demo-"))
    try:
        return _decouple_file(args, config, model_path, arch, out_dir)
    finally:
        if out_dir != model_path.parent and not any(out_dir.iterdir()):
            out_dir.rmdir()


def _decouple_file(
    args: argparse.Namespace,
    config: DecoupleConfig,
    model_path: Path,
    arch: str | None,
    out_dir: Path,
) -> int:
    paths = output_paths(args, model_path, out_dir)
    check_output_paths(paths, [model_path], args.force)

    model, arch_shape, kind = load_model(model_path, arch, args.trust_pickle)
    check_finite(model)
    shape = parse_shape(args.input_shape) if args.input_shape else arch_shape
    if shape is None:
        raise InputError("cannot tell what input this model takes; pass --input-shape C,H,W")
    _single_tensor_output(model, shape)
    data, calib = load_cli_images(args, arch, shape)
    original = copy.deepcopy(model)
    latency = make_latency_config(args)
    if latency is not None and latency.device == "cuda":
        model = model.cuda()

    result = compress_(
        model,
        config,
        shape,
        target_flops=args.target_flops,
        criterion=args.criterion,
        calib_images=None if calib is None else calib.to(latency.device if latency else "cpu"),
        refit=args.refit,
        progress=sys.stderr.isatty(),
        target_latency=args.target_latency,
        latency=latency,
        realize=latency is not None,
    )
    model = model.cpu()
    records = result.records
    timed_out = any(r.reason.startswith("kept: not faster") for r in records)
    if not timed_out and not any(r.action == "decoupled" for r in records):
        seen = ", ".join(sorted({r.reason for r in records})) or "no Conv2d at all"
        raise InputError(f"nothing to decouple in {model_path}: every conv was kept ({seen})")

    extra = {"model": str(model_path), "arch": arch, "config": config.to_dict(), **result.extra()}
    if calib is not None:
        extra["calibration_images"] = len(calib)
    inputs = None
    if data is not None:
        name, images, labels = data
        inputs = images[:256]
        extra["accuracy"] = {
            "data": name,
            "before": evaluate(original, images, labels, progress=sys.stderr.isatty()),
            "after": evaluate(model, images, labels, progress=sys.stderr.isatty()),
        }
    if latency is not None:
        extra["latency"] = _measure_latency(original, model, config, shape, latency)
    payloads = {}
    if args.onnx:
        from .export import check_onnx, onnx_files

        # A random input: zeros would let a graph that ignores most of its weights through.
        gen = torch.Generator().manual_seed(0)
        example = torch.randn((1, *shape), generator=gen, dtype=next(model.parameters()).dtype)
        try:
            files = onnx_files(model, example, paths["onnx"].name)
        except RuntimeError as e:  # an op of the user's model that no ONNX exporter covers
            raise InputError(f"--onnx: {e}") from None
        check = check_onnx(model, example, files)
        if not check["ok"]:
            raise InputError(
                f"the ONNX export does not match PyTorch (max abs error {check['max_abs_err']:.3g})"
            )
        extra["onnx"] = check
        for n in files:  # over 2 GiB the weights come in a second file, beside the graph
            if n != paths["onnx"].name:
                paths["onnx data"] = paths["onnx"].with_name(n)
                check_output_paths(paths, [model_path], args.force)
        payloads = {p: files[p.name] for k, p in paths.items() if k.startswith("onnx")}
    report = build_report(original, model, records, shape, inputs=inputs, extra=extra)

    recipe = json.dumps(make_recipe(records, config), indent=2) + "\n"
    payloads = {
        paths["model"]: torch_bytes(model if kind == "module" else model.state_dict()),
        paths["recipe"]: recipe.encode(),
        paths["report"]: (report.to_json() + "\n").encode(),
        paths["markdown"]: report.to_markdown().encode(),
        **payloads,
    }
    write_files_atomically(payloads)

    print(report.to_text())
    print()
    for what in paths:
        print(f"wrote {what:8s} {paths[what]}")
    return 0


def _measure_latency(original, model, config, shape, latency: LatencyConfig) -> dict:
    """Model latency before/after, side by side; the baseline gets the same BN folding, so the
    speedup is the decoupling's alone."""
    baseline = copy.deepcopy(original)
    if config.fold_bn:
        fold_batchnorm_(baseline)
    dev = latency.device
    example = latency.example(shape, next(model.parameters()).dtype)
    out = compare(baseline.to(dev), copy.deepcopy(model).to(dev), example, latency)
    out["baseline"] = "the input model" + (" with BatchNorm folded" if config.fold_bn else "")
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        return run(build_parser().parse_args(argv))
    except (InputError, ValueError) as e:
        print(f"decouple: error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("decouple: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug of ours: still one line unless asked for more
        if os.environ.get("DECOUPLE_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(
            f"decouple: internal error: {type(e).__name__}: {msg} "
            "(set DECOUPLE_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1

"""``python -m decouple MODEL --rank T``: decouple a model file, write it and a report.

Bad input ends with one line on stderr and exit status 2. The input file is never modified;
outputs go to the current folder (or ``--out``), written atomically, and nothing on disk is
overwritten without ``--force``. Progress goes to stderr (``--quiet``: none); stdout holds the
report.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from .exits import MISSED, NotWritten, Terminated, fail, recover, sigterm_as_exception
from .parser import UsageError, build_parser

if TYPE_CHECKING:
    from ..io.output_set import OutputSet
    from ..nn.stopwatch import Timings
    from ..surgery.config import DecoupleConfig

# torch, tensorly and the library load inside the functions, after parsing: --help, --version
# and a mistyped flag answer at once instead of after ~2 s of imports.


def output_paths(args: argparse.Namespace, model_path: Path, out_dir: Path) -> dict[str, Path]:
    """The output files (the manifest last); see the epilog of ``--help``.

    Without ``--out`` the model goes to ``out_dir`` (the current folder; a fresh one for
    ``--demo``) as MODEL's name with ``.decoupled``: never beside MODEL, whose folder may be
    shared or read-only. The other files follow the model, unless ``--report`` moves the report.
    """
    from ..io.manifest import manifest_path_for
    from ..io.outputs import WEIGHT_SUFFIXES, recipe_path_for, sidecar_path

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
    paths["manifest"] = manifest_path_for(out)  # written last: the set is complete
    return paths


def run(args: argparse.Namespace) -> int:
    """Decouple the model the parsed flags name; outputs go to the current folder."""
    from ..io.errors import InputError
    from .flags import make_config, make_latency_config, need_export_packages
    from .inputs import check_image_flags

    if args.demo:
        from .. import demo

        if args.model:
            raise InputError("give either MODEL or --demo, not both")
        model_path, arch = demo.model_path(), "digits_cnn"
    elif args.model is None:
        raise InputError("give a MODEL file to decouple (or --demo to try the bundled example)")
    else:
        model_path, arch = Path(args.model), args.arch
    config = make_config(args)
    make_latency_config(args)  # bad latency flags fail before anything is loaded
    check_image_flags(args)
    if args.onnx:
        need_export_packages()
    out_dir, made = Path.cwd(), None
    if args.demo and not args.out:  # never write into the installed package, nor over anything
        out_dir = made = Path(tempfile.mkdtemp(prefix="decouple-demo-"))
    try:
        return _decouple_file(args, config, model_path, arch, out_dir)
    finally:
        if made is not None and not any(made.iterdir()):
            made.rmdir()


def _decouple_file(
    args: argparse.Namespace,
    config: DecoupleConfig,
    model_path: Path,
    arch: str | None,
    out_dir: Path,
) -> int:
    from ..io.output_set import OutputSet
    from ..nn import shards
    from ..nn.stopwatch import recording
    from .inputs import synthetic_count

    with shards.process_group(args.device) as args.device:  # under torchrun: this process's share
        if not shards.is_main():  # another process: its share of the images, nothing written
            args.quiet = True
            with recording(progress=False) as timings:
                return _decouple_into(None, args, config, model_path, arch, timings)
        # The outputs are checked and their folders made writable before any heavy work.
        named = (args.config, args.data, None if synthetic_count(args, ()) else args.calib)
        inputs = [model_path, *(Path(p) for p in named if p)]
        paths = output_paths(args, model_path, out_dir)
        with (
            OutputSet.prepare(paths, inputs, args.force) as outputs,
            recording(progress=not args.quiet) as timings,
        ):
            return _decouple_into(outputs, args, config, model_path, arch, timings)


def _decouple_into(
    outputs: OutputSet | None,
    args: argparse.Namespace,
    config: DecoupleConfig,
    model_path: Path,
    arch: str | None,
    timings: Timings,
) -> int:
    import torch

    from ..agreement import compress_within_change_
    from ..io.errors import InputError
    from ..io.evaluate import compare_batches
    from ..nn import shards
    from ..nn.stopwatch import stage
    from ..pipeline import TargetMissed, compress_
    from .flags import make_latency_config
    from .inputs import load_cli_images, synthetic_calib, synthetic_count
    from .model_checks import load_checked_model

    with stage("loading"):
        model, shape, kind, shape_note = load_checked_model(args, config, model_path, arch)
        data, calib = load_cli_images(args, arch, shape)
        original = copy.deepcopy(model)
    if (made := synthetic_count(args, shape)) is not None:  # from the BatchNorms, before folding
        calib = synthetic_calib(args, model, shape, made)
    latency = make_latency_config(args)
    device = torch.device(args.device)
    model = model.to(device)

    # With images, a budget weighs each layer's output error by its effect on the network's.
    criterion = args.criterion or ("output" if calib is not None else "energy")
    common = {
        "criterion": criterion,
        "refit": args.refit,
        "progress": not args.quiet,  # on stderr: stdout holds only the report
        "latency": latency,
        "realize": latency is not None,
        "prune": not args.no_prune,
        "bias_correction": not args.no_bias_correction,
        "distill_head": not args.no_distill_head,
    }
    search = None
    if args.max_change is not None:
        cost = "flops" if latency is None else "latency"
        result, search = compress_within_change_(
            model, config, shape, args.max_change, calib.batches, cost,
            closest=args.allow_miss, **common,
        )  # fmt: skip
        if result is None:
            fewest = min(search.tries, key=lambda t: t["changed_pct"])
            raise NotWritten(
                f"--max-change {args.max_change:g} is out of reach: no plan tried changed at most "
                f"{args.max_change:g} % of top-1 predictions (the closest: "
                f"{fewest['changed_pct']:.2f} % at budget {fewest['budget']:g})"
            )
    else:
        try:
            result = compress_(
                model,
                config,
                shape,
                target_flops=args.target_flops,
                calib_images=None if calib is None else calib.batches,
                target_latency=args.target_latency,
                allow_miss=args.allow_miss,
                **common,
            )
        except TargetMissed as e:
            flag = "--target-flops" if args.target_flops is not None else "--target-latency"
            value = args.target_flops if args.target_flops is not None else args.target_latency
            raise NotWritten(f"{flag} {value:g} is out of reach: {e.reachable}") from None
    model = model.cpu()
    records = result.records
    timed_out = any(r.reason.startswith("kept: not faster") for r in records)
    if not timed_out and not any(r.action in ("decoupled", "pruned") for r in records):
        seen = ", ".join(sorted({r.reason for r in records})) or "no Conv2d or Linear at all"
        raise InputError(f"nothing to decouple in {model_path}: every layer was kept ({seen})")

    extra = {"model": str(model_path), "arch": arch, "config": config.to_dict(), **result.extra()}
    if search is not None:
        extra["max_change"] = search.to_dict()
    if calib is not None:
        extra["calibration_images"] = calib.count
        if calib.synthesized is not None:
            extra["synthetic_calibration"] = calib.synthesized
    if shape_note is not None:
        extra["input_shape_note"] = shape_note
    # process 0's output check reads its images first: an unreadable one stops the run here
    checked = None if outputs is None else check_inputs(data, calib, args.demo)
    if data is not None:
        n = len(data.batches)
        with stage("evaluation"):
            # both models on each batch: the images are read once, and the top-1 change gets
            # its paired interval (only the images one model gets right carry it)
            extra["accuracy"] = {
                "data": data.name,
                **compare_batches(
                    original.to(device), model.to(device), data.batches, device,
                    common["progress"], n,
                ),
            }  # fmt: skip
        original, model = original.cpu(), model.cpu()
    if outputs is None:  # another process of a torchrun: process 0 reports and writes
        return 0
    with shards.alone():  # from here on process 0 works on its own
        return _report_and_write(
            outputs, args, original, model, config, shape, latency, extra, records, kind,
            checked, shape_note, timings,
        )  # fmt: skip


def _report_and_write(
    outputs, args, original, model, config, shape, latency, extra, records, kind, checked,
    shape_note, timings,
) -> int:  # fmt: skip
    """Measure latency, export, build the report and write every file (process 0 alone)."""
    import torch

    from ..io.checkpoint import load_decoupled
    from ..io.errors import InputError
    from ..io.manifest import name_manifest
    from ..io.outputs import torch_bytes
    from ..nn.stopwatch import stage
    from ..report import build_report
    from ..surgery.recipe import make_recipe
    from .speed import measure_latency, predict_speed

    paths = outputs.paths
    inputs, extra["output_check_inputs"] = checked
    if latency is not None:
        with stage("latency"):
            extra["latency"] = measure_latency(original, model, config, shape, latency)
    if args.device == "cpu":  # the cost models describe CPU runtimes
        with stage("predicted speed"):
            if (pred := predict_speed(original, model, config, shape, args)) is not None:
                extra["predicted_speed"] = pred
    payloads = {}
    if args.onnx:
        from ..runtime.export import onnx_files
        from ..runtime.onnx_check import check_onnx

        # A random input: zeros would let a graph that ignores most of its weights through.
        gen = torch.Generator().manual_seed(0)
        example = torch.randn((1, *shape), generator=gen, dtype=next(model.parameters()).dtype)
        with stage("ONNX export"):
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
                outputs.add("onnx data", paths["onnx"].with_name(n))
        paths = outputs.paths
        payloads = {k: files[p.name] for k, p in paths.items() if k.startswith("onnx")}
    with stage("report"):  # with the output check: both models run on the check's inputs
        report = build_report(original, model, records, shape, inputs=inputs, extra=extra)
    wreck = report.wrecked()
    if wreck and not args.allow_miss:
        raise NotWritten(f"this plan would wreck the model: {wreck}")
    with stage("serializing"):
        recipe = name_manifest(make_recipe(records, config), paths["recipe"], paths["manifest"])
        model_bytes = torch_bytes(model if kind == "module" else model.state_dict())
    report.extra["timings"] = timings.to_dict()  # up to here: writing the files comes after
    payloads = {
        "model": model_bytes,
        "recipe": (json.dumps(recipe, indent=2) + "\n").encode(),
        "report": (report.to_json() + "\n").encode(),
        "markdown": report.to_markdown().encode(),
        **payloads,
    }

    def reloads(staged: dict[str, Path]) -> None:  # a set that cannot be reloaded is not written
        if kind == "state_dict":
            load_decoupled(copy.deepcopy(original), staged["model"], staged["recipe"])

    with stage("writing"):
        outputs.write(payloads, verify=reloads)

    if shape_note is not None:
        print(f"input shape: {shape} inferred from {shape_note}; pass --input-shape to change it")
    print(report.to_text())
    print()
    for what in paths:
        print(f"wrote {what:8s} {paths[what]}")
    return 0


OUTPUT_CHECK_IMAGES = 256


def check_inputs(data, calib, demo: bool = False):
    """The images the report compares outputs on, and a phrase saying which: the first --data
    images (never used to fit: calibration skips them), else the first --calib images (used to
    fit, and said so), else None (build_report then draws random Gaussian inputs)."""
    if data is not None:
        x = first_images(data.batches, OUTPUT_CHECK_IMAGES)
        fit = "" if demo else ", not used to fit"
        return x, f"the first {len(x)} {'demo test' if demo else '--data'} images{fit}"
    if calib is not None:
        x = first_images(calib.batches, OUTPUT_CHECK_IMAGES)
        return x, f"the first {len(x)} --calib images (also used to fit: not held out)"
    return None, "8 random Gaussian inputs (no images given)"


def first_images(batches, count: int):
    """The first ``count`` images of a source of ``(images, labels)`` batches."""
    import torch

    got, n = [], 0
    for x, _ in batches:
        got.append(x[: count - n])
        n += len(got[-1])
        if n >= count:
            break
    return torch.cat(got)


def main(argv: list[str] | None = None) -> int:
    """The CLI: exit 0 with the outputs written, or one line on stderr and nothing written:
    exit 2 for bad input, 3 for a target out of reach (:data:`MISSED`), 130 when interrupted,
    143 when terminated. ``DECOUPLE_DEBUG=1`` shows tracebacks and warnings."""
    debug = bool(os.environ.get("DECOUPLE_DEBUG"))
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        return fail(str(e))
    if args.recover:
        return recover(args.recover)
    from ..io.errors import InputError  # loads torch: only once the command line is good
    from ..pipeline import TargetMissed

    with warnings.catch_warnings(), sigterm_as_exception():
        if not debug:  # library warnings (torch, onnx) would add lines to the one-line contract
            warnings.simplefilter("ignore")
        try:
            return run(args)
        except KeyboardInterrupt:
            print("decouple: interrupted", file=sys.stderr)
            return 130
        except Terminated:
            print("decouple: terminated", file=sys.stderr)
            return 143
        except (NotWritten, TargetMissed) as e:
            return fail(f"{e}; nothing written (--allow-miss writes it)", MISSED)
        except BrokenPipeError:  # stdout closed early (| head): the files are written already
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except (InputError, ValueError, TypeError) as e:  # ours and the library's checks
            return fail(str(e))
        except SystemExit as e:  # the user's model code called sys.exit
            return fail(f"the model's code called sys.exit({e.code!r})")
        except RecursionError:
            return fail("the model or an input is nested too deeply (recursion limit)")
        except MemoryError:
            return fail("out of memory; try a smaller --batch-size or --calib-size")
        except Exception as e:  # noqa: BLE001 - any other error: still one line, exit 2
            if debug:
                raise
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            return fail(f"{type(e).__name__}: {msg} (set DECOUPLE_DEBUG=1 for the traceback)")

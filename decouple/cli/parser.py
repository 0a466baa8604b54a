"""The argument parser of ``python -m decouple``: every flag, its help and the examples."""

from __future__ import annotations

import argparse
import difflib
import re

# Copies of the library's constants: importing them would load torch and tensorly (~2 s) before
# --help or a typo could answer. tests/cli/test_first_hour.py checks they stay equal.
REFIT_MODES = ("none", "last", "alternating", "auto")  # decouple.calibrate.layerwise
ORDERS = ("dw-pw", "pw-dw")  # decouple.factor.nd
CRITERIA = ("energy", "data", "output")  # decouple.plan.losses
RUNTIMES = ("eager", "channels-last", "onnxruntime")  # decouple.runtime.latency
LAYER_TABLES = ("auto", "measured", "predicted")  # decouple.runtime.latency
AUTO = "auto"  # decouple.surgery.checks
METHODS = ("nd", "cp", "tucker", "svd")  # decouple.surgery.methods
VERSION = "0.1.0"  # decouple.__version__

EPILOG = """examples:
  decouple --demo --rank 4 --order pw-dw         the bundled digits CNN, accuracy before/after
  decouple resnet18.pt --arch resnet18 --rank 2  a torchvision state_dict
  decouple net.pt --arch mypkg.nets:build --energy 0.9 --skip 'layer4\\..*'
  decouple whole_model.pt --trust-pickle --rank 3  a pickled nn.Module; input shape inferred
  decouple net.pt --arch cifar_resnet20 --method tucker --target-flops 0.5 --calib cifar.tar
  decouple r18.pt --arch resnet18 --rank 2 --latency --runtime onnxruntime --onnx
  decouple r18.pt --arch resnet18 --target-latency 0.6 --batch 8 --skip fc
  decouple --recover out/                        finish or undo a run killed while writing out/

outputs (in the current folder unless --out/--report say otherwise; never beside MODEL):
  X.decoupled.pt           the decoupled model, same kind as the input (state_dict or module)
  X.decoupled.recipe.json  replays the change on a fresh architecture: decouple.load_decoupled()
  X.decoupled.report.json  per-layer error, params, FLOPs (and latency); and .report.md
  X.decoupled.onnx         with --onnx
  X.decoupled.manifest.json  written last: every file's sha256; load_decoupled() checks it

The set is staged beside the targets, checked, then moved in; nothing existing is replaced
without --force. A run killed while moving it in is finished (or undone) by the next run on the
same outputs, by load_decoupled() or by --recover.

exit status: 0 written; 2 bad input (one line on stderr); 3 the target (--target-flops,
--target-latency, --max-change) is out of reach, or the plan would wreck the model: nothing
written (--allow-miss writes it); 130 interrupted; 143 terminated (SIGTERM). Nothing is left
behind by 2, 3, 130 or 143.
"""


class UsageError(Exception):
    """A bad command line, in one line (``decouple.cli.run.main`` prints it, exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        raise UsageError(_with_suggestion(message))

    def parse_args(self, args=None, namespace=None):
        args, extras = self.parse_known_args(args, namespace)
        if extras:  # argparse's own message lists them with no hint
            flags = [a.split("=", 1)[0] for a in extras if a.startswith("-")]
            known = [o for o in self._option_string_actions if o.startswith("--")]
            shown = [_nearest(f, known) for f in flags] or extras
            raise UsageError(f"unrecognized arguments: {' '.join(shown)}")
        return args


def _nearest(word: str, choices: list[str]) -> str:
    """``word``, with ``(did you mean X?)`` when one of ``choices`` is close."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"{word} (did you mean {close[0]}?)" if close else word


def _with_suggestion(message: str) -> str:
    """argparse's invalid-choice message with the nearest choice named."""
    m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if m is None:
        return message
    close = difflib.get_close_matches(m.group(1), re.findall(r"'([^']*)'", m.group(2)), n=1)
    return f"{message}; did you mean {close[0]}?" if close else message


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
    rank.add_argument(
        "--max-change",
        type=float,
        metavar="P",
        help="the cheapest plan (FLOPs; measured time with --latency) whose top-1 predictions "
        "differ from the original model's on at most P %% of held-out --calib images (no labels)",
    )
    p.add_argument(
        "--criterion",
        choices=CRITERIA,
        help="what a budget minimises: kernel energy lost (data-free), layer output error on "
        "--calib images (data), or that error weighted by the layer's measured effect on the "
        "network's output (output; default with --calib, else energy)",
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
        "images that --data also holds are never used. 'synthetic' or 'synthetic:N': no "
        "images at all, N made from the model's BatchNorm statistics (ZeroQ)",
    )
    p.add_argument(
        "--calib-size",
        type=int,
        default=None,
        metavar="N",
        help="calibration images (default: 512 at 224x224 and larger, more for smaller images, "
        "up to 2048 at 112x112 and smaller)",
    )
    p.add_argument(
        "--refit",
        choices=REFIT_MODES,
        default="auto",
        help="calibration refit: last factor, alternating, the better per layer (auto), or none",
    )
    p.add_argument(
        "--no-prune",
        action="store_true",
        help="with --target-flops or --target-latency and --calib, never prune channels (by "
        "default the planner may drop a layer's output channels where it feeds a 1x1 conv or "
        "linear layer, and refit it)",
    )
    p.add_argument(
        "--no-mirror",
        action="store_true",
        help="with --calib synthetic, calibrate on the made images alone (by default each is "
        "also used mirrored left to right, as vision networks are trained; turn it off for a "
        "model that was not, e.g. on text or digits)",
    )
    p.add_argument(
        "--no-distill-head",
        action="store_true",
        help="with --calib, leave a pruned head as calibration refit it (by default, where a "
        "pruned chain sits in the network's head, it and the layers after it are fit jointly to "
        "the original's outputs on the calibration images: a few seconds of Adam steps)",
    )
    p.add_argument(
        "--no-bias-correction",
        action="store_true",
        help="without --calib, leave the factored layers' biases as factored (by default each "
        "gets back the mean error its approximation makes, estimated from the model's "
        "BatchNorm statistics: no images needed)",
    )
    images = p.add_argument_group(
        "images (--data, --calib): streamed in mini-batches, prepared like the arch's weights"
    )
    images.add_argument(
        "--resize",
        type=int,
        metavar="PIXELS",
        help="resize the short side first (default: the torchvision weights' transforms(), "
        "e.g. 256 for vgg16; none for the CIFAR zoo)",
    )
    images.add_argument(
        "--crop", type=int, metavar="PIXELS", help="then crop the centre square (e.g. 224)"
    )
    images.add_argument(
        "--mean",
        metavar="R,G,B",
        help="per-channel mean for pixels in [0, 1] (default: the arch's)",
    )
    images.add_argument(
        "--std", metavar="R,G,B", help="per-channel std (default: the arch's, if known)"
    )
    images.add_argument(
        "--batch-size",
        type=int,
        default=32,
        metavar="B",
        help="images per mini-batch for evaluation and calibration (default 32)",
    )
    images.add_argument(
        "--workers",
        type=int,
        default=0,
        metavar="N",
        help="DataLoader worker processes (default 0)",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where evaluation, calibration and latency run (default cpu)",
    )
    p.add_argument(
        "--method",
        choices=(*METHODS, AUTO),
        help="nd: network decoupling; cp: CP, 1x1 -> kx1 -> 1xk -> 1x1; tucker: Tucker-2, "
        "1x1 -> kxk -> 1x1; svd: low rank, C -> R -> N (the one method for 1x1 convs and linear "
        "layers, which budgets always price); auto: every method priced per layer, a budget "
        "chooses. Default: auto with a budget (--target-*, --max-change), else nd",
    )
    p.add_argument(
        "--order",
        choices=ORDERS,
        help="network decoupling: depthwise first (dw-pw, default) or pointwise first",
    )
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="NAME|REGEX",
        help="a layer to leave as it is: an exact module name or a regex matching whole names; "
        "repeat it or give a comma list (--skip layer4.0.conv1,fc; commas inside {...} stay in the "
        "regex). A pattern that matches no conv is an error",
    )
    p.add_argument(
        "--include-stem",
        action="store_true",
        help="decouple stem convs too (input of at most 4 channels, e.g. RGB); by default they "
        "are kept: they lose most of their kernel at the global T and save little",
    )
    p.add_argument(
        "--rank-multiple",
        type=int,
        metavar="M",
        help="under a budget, offer CP, Tucker and svd ranks and pruned widths in multiples of "
        "M only (e.g. 8 or 16: channel counts that ONNX Runtime's blocked layout runs at full "
        "speed; see results/aligned_ranks.md); default 1, any rank, except that "
        "--target-latency in onnxruntime always uses multiples of the runtime's block (8 or 16)",
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
        help="one input's shape, for FLOPs and the output check (default: from the arch, e.g. a "
        "torchvision model's weights' crop; for a model of no known family, the first image of "
        "--data/--calib after preprocessing, else its first conv's channels and 224x224)",
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
        "--latency-table",
        choices=LAYER_TABLES,
        default="auto",
        help="how --target-latency prices each layer's options: timed one by one (measured, "
        "minutes) or predicted by the runtime's cost model (predicted, seconds); the plans are "
        "timed whole either way (default auto: predicted on the CPU unless "
        "DECOUPLE_COST_MODEL=off, else measured)",
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
        "--out",
        metavar="PATH",
        help="decoupled model file (default: MODEL's name with .decoupled, in the current folder)",
    )
    p.add_argument("--report", metavar="PATH", help="report JSON (a Markdown copy goes beside it)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument(
        "--allow-miss",
        action="store_true",
        help="write the closest plan when the target is out of reach, or a plan whose output "
        "check says it wrecks the model (default: write nothing, exit status 3)",
    )
    p.add_argument(
        "--recover",
        metavar="PATH",
        help="only recover: finish or undo the commits of runs killed while writing into "
        "PATH's folder (the next run and load_decoupled() do it too), and say what was found",
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow loading a whole pickled model; unpickling runs code from the file",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress lines on stderr (they are on by default, every few seconds when "
        "stderr is not a terminal); the report on stdout is the same",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {VERSION}")
    return p

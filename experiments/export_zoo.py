"""ONNX and ``torch.export`` of every torchvision classification model, decoupled.

Each model of ``torchvision.models.list_models(module=torchvision.models)`` is built with
``weights=None``, woken up (all-zero weights get a small random init and BatchNorm statistics are
set from a random batch: otherwise ViTs output 0 and GoogLeNet its head's bias whatever the input,
and every export would "match"), its BatchNorms folded and every regular k×k conv decoupled at
``T=2`` (dw-pw). The decoupled layers take the realizations in turn (grouped, split, repeat,
tile, sum, grouped, ...; ``--realization`` fixes one), so each model exercises all of them. Then:

* it is exported to ONNX (opset 17, dynamic batch; past 2 GiB of weights, ViT-H/14, the weights
  go to a file beside the graph: ``decouple.runtime.export.onnx_files``), checked by ``onnx.checker`` and
  run by ONNX Runtime on a 1×3×224×224 input (299 for inception_v3). It passes when the relative Frobenius
  error of the output against PyTorch is below 1e-4 *and* below a tenth of ``output_spread``,
  how much the output moves between two random inputs (relative). Random-weight models can have
  outputs far from 1, where an elementwise tolerance says little, and deep ones map random
  inputs to nearly the same output (VGG-19-BN: spread 2e-4), where 1e-4 alone would let a wrong
  graph through. A spread below 1e-6 (the output ignores the input) is reported, not checked;
* it is exported with ``torch.export`` and the exported program is compared the same way.

Models where nothing decouples (no regular k×k conv) are recorded and skipped. A model failing
either export is tried undecoupled too, so that the exporter's limits are told from ours.
Writes ``results/export.csv`` (after every model, atomically) and prints one line per model and
a summary; exits 1 if a decoupled model fails where its original passes.

Run (on 2 idle CPU cores about 20 minutes for all 80 models; longer on a busy machine, where the
batched float64 SVDs of decoupling slow down most; ``--models`` for a few)::

    pip install -e '.[dev,vision]'
    python experiments/export_zoo.py [--models resnet18,vgg11] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import onnx
import torch
import torchvision
from torch import nn

from decouple import DecoupleConfig, DecoupledConv2d, decouple_
from decouple.nn.decoupled import REALIZATIONS
from decouple.runtime.export import DEFAULT_OPSET, export_program, onnx_files
from decouple.runtime.onnx_check import check_onnx

RTOL = 1e-4
MIN_SPREAD = 1e-6  # below this the output ignores the input and any export would "match"
SPREAD_FACTOR = 0.1  # the export error must be this small next to the output's input-dependence
SIZES = {"inception_v3": 299}  # every other classifier here runs at 224×224
FIELDS = [
    "model", "convs_decoupled", "onnx_ok", "checker", "max_abs_err", "rel_err", "torch_export_ok",
    "torch_export_rel_err", "output_spread", "exporter", "export_s", "total_s", "error",
]  # fmt: skip


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def build(name: str, size: int) -> nn.Module:
    """The model with ``weights=None``, made to depend on its input (see :func:`wake`)."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None)
    wake(model, torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2)))
    return model.eval()


@torch.no_grad()
def wake(model: nn.Module, batch: torch.Tensor) -> None:
    """Make the output of a ``weights=None`` model depend on its input, or any export passes.

    ViTs start with an all-zero head (output 0 whatever the input) and GoogLeNet's small init
    shrinks activations to ~1e-12 (output = the head's bias). Zero weights get a small random
    init and BatchNorm statistics are set from ``batch`` (before BN folding bakes them in).
    """
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and not m.weight.any():
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch sets the statistics exactly
    model.train()
    model(batch)
    model.eval()


def spread(model: nn.Module, x: torch.Tensor) -> float:
    """How much the output moves between two inputs, relative to its size (0: ignores input)."""
    with torch.no_grad():
        a, b = model(x), model(torch.randn_like(x))
    return float((a - b).norm() / max(float(a.norm()), 1e-30))


def set_realizations(model: torch.nn.Module, realization: str) -> None:
    layers = [m for m in model.modules() if isinstance(m, DecoupledConv2d)]
    for i, layer in enumerate(layers):
        names = REALIZATIONS[layer.order]
        layer.set_realization(names[i % len(names)] if realization == "mixed" else realization)


def onnx_check(model, x) -> dict:
    """check_onnx's result plus ``export_s`` and ``exporter``, or ``{"ok": False, "error": ...}``."""
    try:
        t0 = time.perf_counter()
        files = onnx_files(model, x, "model.onnx")
        seconds = time.perf_counter() - t0
        # onnx_bytes falls back to the dynamo exporter, which writes its own (newer) opset; past
        # 2 GiB the weights come in a second file, and only the dynamo exporter writes those.
        graph = onnx.load_from_string(files["model.onnx"])  # the graph alone: weights may be apart
        opset = next(o.version for o in graph.opset_import if not o.domain)
        exporter = "torchscript" if opset == DEFAULT_OPSET and len(files) == 1 else "dynamo"
        if len(files) > 1:
            exporter += " + external data"
        result = check_onnx(model, x, files, rtol=RTOL)
        return {**result, "export_s": seconds, "exporter": exporter}
    except Exception as e:  # noqa: BLE001 - recorded, never hidden
        return {"ok": False, "error": one_line(e)}


def run(name: str, realization: str) -> dict:
    t0 = time.perf_counter()
    row = dict.fromkeys(FIELDS, "")
    row["model"] = name
    size = SIZES.get(name, 224)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    model = build(name, size)
    records = decouple_(model, DecoupleConfig(rank=2, fold_bn=True))
    row["convs_decoupled"] = sum(r.action == "decoupled" for r in records)
    if not row["convs_decoupled"]:
        row["error"] = "nothing to decouple"
        row["total_s"] = f"{time.perf_counter() - t0:.1f}"
        return row
    set_realizations(model, realization)
    row["output_spread"] = f"{spread(model, x):.2e}"
    if float(row["output_spread"]) < MIN_SPREAD:
        row["error"] = "output ignores the input: a check would be vacuous"
        row["total_s"] = f"{time.perf_counter() - t0:.1f}"
        return row
    errors = []
    bound = SPREAD_FACTOR * float(row["output_spread"])
    onnx = onnx_check(model, x)
    if "error" not in onnx:
        onnx["ok"] = onnx["ok"] and onnx["rel_err"] < bound
    row["onnx_ok"] = onnx["ok"]
    if "error" in onnx:
        errors.append(f"onnx: {onnx['error']}")
    else:
        row["checker"] = onnx["checker"]
        row["max_abs_err"] = f"{onnx['max_abs_err']:.2e}"
        row["rel_err"] = f"{onnx['rel_err']:.2e}"
        row["export_s"] = f"{onnx['export_s']:.1f}"
        row["exporter"] = onnx["exporter"]
        if not onnx["ok"]:
            errors.append(f"onnx: output differs (rel err {onnx['rel_err']:.1e})")
    program = export_program(model, x, rtol=RTOL)
    if "error" not in program:
        program["ok"] = program["ok"] and program["rel_err"] < bound
    row["torch_export_ok"] = program["ok"]
    if "error" in program:
        errors.append(f"torch.export: {program['error']}")
    else:
        row["torch_export_rel_err"] = f"{program['rel_err']:.2e}"
        if not program["ok"]:
            errors.append(f"torch.export: output differs (rel err {program['rel_err']:.1e})")
    del model
    # A failure is ours only if the undecoupled model gets through the same exporter.
    if not onnx["ok"]:
        errors.append(
            "original model fails ONNX too"
            if not onnx_check(build(name, size), x)["ok"]
            else "original model passes ONNX"
        )
    if not program["ok"]:
        errors.append(
            "original model fails torch.export too"
            if not export_program(build(name, size), x, rtol=RTOL)["ok"]
            else "original model passes torch.export"
        )
    row["error"] = "; ".join(errors)
    row["total_s"] = f"{time.perf_counter() - t0:.1f}"
    return row


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv=None) -> int:
    # GoogLeNet and Inception warn that their default init will change: not news here.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torchvision")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma-separated model names (default: every classifier)")
    ap.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "results",
        help="directory for export.csv (default: results/ of this repository)",
    )
    ap.add_argument(
        "--realization",
        default="mixed",
        choices=["mixed", *REALIZATIONS["dw-pw"]],
        help="realization of every decoupled layer (default: each in turn)",
    )
    args = ap.parse_args(argv)
    known = torchvision.models.list_models(module=torchvision.models)
    names = args.models.split(",") if args.models else sorted(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        ap.error(f"unknown models: {', '.join(unknown)}")
    path = args.out / "export.csv"
    rows = []
    for name in names:
        try:
            row = run(name, args.realization)
        except Exception as e:  # noqa: BLE001 - building or decoupling failed: report, go on
            row = {**dict.fromkeys(FIELDS, ""), "model": name, "error": f"setup: {one_line(e)}"}
        rows.append(row)
        write_csv(rows, path)
        print(
            f"{name}: {row['convs_decoupled'] or 0} convs decoupled; onnx {row['onnx_ok']} "
            f"(rel err {row['rel_err'] or '-'}, {row['exporter'] or '-'} {row['export_s'] or '-'} s); "
            f"torch.export {row['torch_export_ok']}; {row['error'] or 'ok'} [{row['total_s']} s]",
            flush=True,
        )
    tried = [r for r in rows if r["convs_decoupled"]]
    onnx_ok = [r for r in tried if r["onnx_ok"] is True]
    te_ok = [r for r in tried if r["torch_export_ok"] is True]
    nothing = [r for r in rows if r["error"] == "nothing to decouple"]
    setup = [r for r in rows if r["error"].startswith("setup:")]
    ours = [r for r in tried if "original model passes" in r["error"]]
    vacuous = [r for r in tried if "vacuous" in r["error"]]
    worst = max((float(r["rel_err"]) for r in onnx_ok), default=float("nan"))
    print(
        f"ONNX export: {len(onnx_ok)} of {len(tried)} decoupled models pass "
        f"(relative error < {RTOL:g}, worst {worst:.1e}); torch.export: {len(te_ok)} of "
        f"{len(tried)}; failures where the original passes: {len(ours)}; "
        f"{len(vacuous)} not checked (output ignores the input); "
        f"{len(nothing)} models have nothing to decouple; {len(setup)} failed to build or "
        f"decouple. Wrote {path}"
    )
    return 1 if ours or setup or vacuous else 0


if __name__ == "__main__":
    sys.exit(main())

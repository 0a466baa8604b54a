"""decouple: make pretrained CNNs faster without retraining, by network decoupling.

Where things live, in the order the pipeline runs (each layer imports only those above it):

* :mod:`decouple.factor` — the math: nd (batched SVD of kernel slices), CP, Tucker-2; no modules
* :mod:`decouple.nn` — ``DecoupledConv2d``, ``CPConv2d``, ``TuckerConv2d`` and their FLOPs
* :mod:`decouple.surgery` — ``DecoupleConfig``, the method registry, BN folding, ``decouple_``,
  recipes
* :mod:`decouple.calibrate` — patch moments and closed-form refits (``calibrate_``)
* :mod:`decouple.runtime` — measured latency, fastest realizations, ONNX and ``torch.export``
* :mod:`decouple.io` — safe checkpoint loading, ``--arch``, image sources, evaluation, outputs
* :mod:`decouple.plan` — per-layer options, the allocator, FLOPs and latency budgets
* :mod:`decouple.pipeline` — ``compress_``: the whole flow on one model
* :mod:`decouple.report` — FLOPs, params, per-layer and output error; JSON, Markdown, text
* :mod:`decouple.agreement` — ``--max-change``: the cheapest plan within a label-free agreement
* :mod:`decouple.cli` — ``python -m decouple``
* :mod:`decouple.models` — the registry of named architectures (a leaf: imports nothing of ours)
"""

from .factor.cp import cp_weight
from .factor.nd import Decoupling, decouple_weight, max_rank, rank_for_energy, spectrum
from .factor.tucker import tucker2_weight
from .io.checkpoint import load_decoupled
from .nn.decoupled import DecoupledConv2d
from .nn.factorized import CPConv2d, TuckerConv2d
from .nn.flops import count_flops
from .pipeline import CompressResult, compress_
from .report import Report, build_report
from .runtime.latency import LatencyConfig, measure
from .runtime.realize import choose_realizations_, confirm_on_model_
from .surgery.config import DecoupleConfig, LayerSpec
from .surgery.recipe import apply_recipe_, make_recipe
from .surgery.rewrite import LayerRecord, decouple_

__version__ = "0.1.0"

__all__ = [
    "CPConv2d",
    "CompressResult",
    "DecoupleConfig",
    "DecoupledConv2d",
    "Decoupling",
    "LatencyConfig",
    "LayerRecord",
    "LayerSpec",
    "Report",
    "TuckerConv2d",
    "apply_recipe_",
    "build_report",
    "choose_realizations_",
    "compress_",
    "confirm_on_model_",
    "count_flops",
    "cp_weight",
    "decouple_",
    "decouple_weight",
    "load_decoupled",
    "make_recipe",
    "max_rank",
    "measure",
    "rank_for_energy",
    "spectrum",
    "tucker2_weight",
]

"""decouple: make pretrained CNNs faster without retraining, by network decoupling.

Where things live:

* :mod:`decouple.decomposition` — the math: batched SVD of kernel slices (pure tensor functions)
* :mod:`decouple.layers` — ``DecoupledConv2d``, the two-conv layer built ``from_conv``
* :mod:`decouple.cp`, :mod:`decouple.tucker` — CP and Tucker-2 of a kernel (tensorly)
* :mod:`decouple.factorized` — ``CPConv2d`` and ``TuckerConv2d``
* :mod:`decouple.methods` — nd / cp / tucker behind one interface (build, FLOPs, candidate ranks)
* :mod:`decouple.config` — ``DecoupleConfig`` / ``LayerSpec``: rank rules and per-layer overrides
* :mod:`decouple.bn_fold` — BatchNorm folding, proven safe on the ``torch.fx`` graph
* :mod:`decouple.surgery` — ``decouple_`` (in place) and recipes that replay it on a fresh model
* :mod:`decouple.report` — FLOPs, params, per-layer and output error; JSON, Markdown, text
* :mod:`decouple.latency` — measured latency (``torch.utils.benchmark``) in eager, channels-last
  or ONNX Runtime
* :mod:`decouple.realize` — the fastest exact realization of each layer, or its original conv back
* :mod:`decouple.latency_budget` — per-layer T from measured latency tables (``--target-latency``)
* :mod:`decouple.export` — ONNX export checked against ONNX Runtime; ``torch.export``
* :mod:`decouple.model_io` — safe loading, ``--arch`` resolution, atomic writes, reloading
* :mod:`decouple.cli` — ``python -m decouple``
"""

from .config import DecoupleConfig, LayerSpec
from .cp import cp_weight
from .decomposition import Decoupling, decouple_weight, max_rank, rank_for_energy, spectrum
from .factorized import CPConv2d, TuckerConv2d
from .latency import LatencyConfig, measure
from .layers import DecoupledConv2d
from .model_io import load_decoupled
from .realize import choose_realizations_, confirm_on_model_
from .report import Report, build_report, count_flops
from .surgery import LayerRecord, apply_recipe_, decouple_, make_recipe
from .tucker import tucker2_weight

__version__ = "0.1.0"

__all__ = [
    "CPConv2d",
    "DecoupleConfig",
    "DecoupledConv2d",
    "Decoupling",
    "LayerRecord",
    "LatencyConfig",
    "LayerSpec",
    "Report",
    "apply_recipe_",
    "TuckerConv2d",
    "build_report",
    "choose_realizations_",
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

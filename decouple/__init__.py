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

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> the submodule that defines it, imported on first use: ``import decouple`` (and
# so ``python -m decouple --help``) stays free of torch and tensorly until a name is needed.
_WHERE = {
    "cp_weight": ".factor.cp",
    "lowrank_weight": ".factor.lowrank",
    "Decoupling": ".factor.nd",
    "decouple_weight": ".factor.nd",
    "max_rank": ".factor.nd",
    "rank_for_energy": ".factor.nd",
    "spectrum": ".factor.nd",
    "tucker2_weight": ".factor.tucker",
    "load_decoupled": ".io.checkpoint",
    "save_decoupled": ".io.save",
    "DecoupledConv2d": ".nn.decoupled",
    "CPConv2d": ".nn.factorized",
    "TuckerConv2d": ".nn.factorized",
    "LowRankConv2d": ".nn.lowrank",
    "LowRankLinear": ".nn.lowrank",
    "count_flops": ".nn.flops",
    "recording": ".nn.stopwatch",
    "CompressResult": ".pipeline",
    "compress_": ".pipeline",
    "TargetMissed": ".pipeline",
    "predict_speed": ".predicted_speed",
    "Report": ".report",
    "build_report": ".report",
    "CostModel": ".runtime.cost_model",
    "fit_cost_model": ".runtime.cost_model",
    "LatencyConfig": ".runtime.latency",
    "measure": ".runtime.latency",
    "choose_realizations_": ".runtime.realize",
    "confirm_on_model_": ".runtime.realize",
    "DecoupleConfig": ".surgery.config",
    "LayerSpec": ".surgery.config",
    "STEM_MAX_CHANNELS": ".surgery.config",
    "apply_recipe_": ".surgery.recipe",
    "make_recipe": ".surgery.recipe",
    "recipe_of_model": ".surgery.recipe",
    "LayerRecord": ".surgery.rewrite",
    "decouple_": ".surgery.rewrite",
}


def __getattr__(name: str):
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(where, __name__), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "CPConv2d",
    "CompressResult",
    "CostModel",
    "DecoupleConfig",
    "DecoupledConv2d",
    "Decoupling",
    "LatencyConfig",
    "LayerRecord",
    "LayerSpec",
    "LowRankConv2d",
    "LowRankLinear",
    "Report",
    "STEM_MAX_CHANNELS",
    "TargetMissed",
    "TuckerConv2d",
    "apply_recipe_",
    "build_report",
    "choose_realizations_",
    "compress_",
    "confirm_on_model_",
    "count_flops",
    "cp_weight",
    "decouple_",
    "lowrank_weight",
    "decouple_weight",
    "fit_cost_model",
    "load_decoupled",
    "make_recipe",
    "max_rank",
    "measure",
    "predict_speed",
    "rank_for_energy",
    "recipe_of_model",
    "recording",
    "save_decoupled",
    "spectrum",
    "tucker2_weight",
]

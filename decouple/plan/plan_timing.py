"""A latency plan timed whole, as the model it will become.

A plan's layers run in the realizations its table found fastest; but the cost model that
prices a predicted table charges a CP layer's three-op ``square`` graph for its multiply-adds
(``kh·kw`` per term against ``kh + kw``) and not for the pass over the R-channel tensor it
saves, so it ranks square a few per cent slower where it runs a few per cent faster
(``results/cp_realizations.md``), and the whole-model check after the search switches those
layers anyway. A plan timed in the table's realizations only would then run faster than it
measured, and the search would buy speed the user did not ask for with accuracy. So each plan
is also timed with every layer that can run as :data:`ALSO_TIMED` in it, side by side, and
keeps the faster.
"""

from __future__ import annotations

import copy
from dataclasses import replace

from torch import nn

from ..runtime.latency import side_by_side
from ..runtime.realize import realization_names
from ..surgery.chains import prune_chain_
from ..surgery.rewrite import decouple_with_fold_info
from .options import allocated_config

ALSO_TIMED = ("square",)  # realizations also tried throughout a plan (see above)


def time_plan(model: nn.Module, config, plan, chosen, cache, example, latency, model_ms):
    """Whole-model latency (ms, on the scale of ``model_ms``, the original's latency measured
    first) of ``model`` decoupled and pruned as ``plan`` says, and the realizations it ran in:
    ``chosen``, or ``chosen`` with one of :data:`ALSO_TIMED` wherever a layer can take it, if
    that ran faster."""
    twin = copy.deepcopy(model)
    decouple_with_fold_info(
        twin, allocated_config(replace(config, fold_bn=False), plan.choice), cache=cache
    )
    for chain, keep in plan.pruned.values():  # the shapes are what is timed; the refit comes later
        prune_chain_(twin, chain, keep)
    for name, real in chosen.items():
        layer = twin.get_submodule(name)
        if realization_names(layer):
            layer.set_realization(real)
    variants = {"as chosen": (twin, chosen)}
    for real in ALSO_TIMED:
        switch = [
            n for n, r in chosen.items()
            if r != real and real in realization_names(twin.get_submodule(n))
        ]  # fmt: skip
        if switch:
            other = copy.deepcopy(twin)
            for name in switch:
                other.get_submodule(name).set_realization(real)
            variants[real] = (other, {**chosen, **dict.fromkeys(switch, real)})
    # Timed side by side with the original and given as the ratio times the model's latency: on
    # a noisy machine a ratio measured in one run holds where two latencies minutes apart do not.
    times = side_by_side(
        {"original": model, **{k: m for k, (m, _) in variants.items()}}, example, latency
    )
    best = min(variants, key=lambda k: times[k].median_ms)
    return model_ms * times[best].median_ms / times["original"].median_ms, variants[best][1]

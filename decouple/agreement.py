"""``--max-change P``: the cheapest plan whose top-1 predictions stay within P % of the original's.

No labels: the original model's own top-1 predictions are the reference. The calibration images
are split by position (:class:`decouple.calibrate.stream.Split`): three in four *decide* (the
planner's losses and the calibration refit see only them), every fourth *measures* how often the
compressed model's top-1 differs from the original's. The budget (a fraction of FLOPs, or of
measured latency) is found by bisection, assuming that a larger budget changes fewer
predictions; every try is recorded, and the plan kept is the cheapest one measured within
``P``. When none is, the model is left as it was, and the result says so.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .calibrate.stream import Split
from .nn import shards
from .nn.flops import count_flops
from .nn.outputs import class_logits, describe_output
from .nn.progress import progress_bar
from .pipeline import CompressResult, compress_
from .surgery.methods import FactorCache

COSTS = ("flops", "latency")


@dataclass
class ChangeSearch:
    """What :func:`compress_within_change_` tried and kept.

    ``budget`` is the kept target fraction (``None``: no plan was within ``max_change``, the model
    is unchanged); ``changed_pct`` is the kept plan's share of measuring images whose top-1
    differs from the original's; ``cost_ratio`` its FLOPs or measured time over the original's.
    """

    max_change: float
    cost: str
    decided_on: int
    measured_on: int
    budget: float | None = None
    changed_pct: float | None = None
    cost_ratio: float | None = None
    tries: list[dict] = field(default_factory=list)
    missed: bool = False  # no plan was within: the kept one is the closest (``closest=True``)

    @property
    def reached(self) -> bool:
        return self.budget is not None and not self.missed

    def to_dict(self) -> dict:
        out = asdict(self)
        out["reached"] = self.reached
        out["agreement_pct"] = None if self.changed_pct is None else 100 - self.changed_pct
        out["how"] = (
            f"top-1 of the compressed vs the original model on {self.measured_on} held-out "
            f"calibration images (every 4th); plans chosen and refit on the other {self.decided_on}"
        )
        return out


@torch.no_grad()
def top1(model: nn.Module, images: Iterable[torch.Tensor]) -> torch.Tensor:
    """The model's top-1 class of every image of a source of batches.

    Raises
    ------
    ValueError
        The model's output is not class logits (one (batch, classes) tensor): top-1 agreement,
        so ``--max-change``, needs a classifier.
    """
    device = next(model.parameters()).device
    model.eval()
    got = []
    for x in images:
        out = model(x.to(device))
        logits = class_logits(out)
        if logits is None:
            raise ValueError(
                "max_change needs a classifier, whose output is class logits (batch, classes); "
                f"the model returns {describe_output(out)}"
            )
        got.append(logits.argmax(1).cpu())
    return torch.cat(got) if got else torch.zeros(0, dtype=torch.long)  # a share can be empty


def compress_within_change_(
    model: nn.Module,
    config,
    input_shape: tuple[int, ...],
    max_change: float,
    calib_images: torch.Tensor | Iterable,
    cost: str = "flops",
    lowest: float = 0.1,
    steps: int = 6,
    progress: bool = False,
    closest: bool = False,
    **kwargs,
) -> tuple[CompressResult | None, ChangeSearch]:
    """Compress ``model`` in place at the smallest budget within ``max_change`` % changed top-1.

    Parameters
    ----------
    model : nn.Module
        In eval mode; replaced in place by the kept plan (unchanged if no plan is within reach).
    config : DecoupleConfig
        As :func:`decouple.pipeline.compress_` (``method="auto"`` prices every method).
    max_change : float
        Percentage of measuring images whose top-1 may differ from the original's, in [0, 100).
    calib_images : torch.Tensor or iterable
        Unlabelled images; a quarter measure, the rest decide (:class:`Split`).
    cost : {"flops", "latency"}
        What the budget is a fraction of (``latency`` needs ``latency=LatencyConfig(...)``).
    lowest, steps : float, int
        The smallest budget tried, and the bisection steps between it and 1.
    closest : bool
        When no plan is within ``max_change``, keep the one that changed the fewest predictions
        (the search says it ``missed``) instead of leaving the model unchanged.
    **kwargs
        Passed to :func:`~decouple.pipeline.compress_` (criterion, refit, cache, latency, ...).

    Returns
    -------
    (CompressResult or None, ChangeSearch)
        The kept plan's result (None when none was within ``max_change``) and the search.
    """
    if isinstance(max_change, bool) or not isinstance(max_change, (int, float)):
        raise ValueError(f"max_change must be a percentage in [0, 100); got {max_change!r}")
    if not 0 <= max_change < 100:
        raise ValueError(f"max_change must be a percentage in [0, 100); got {max_change!r}")
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {', '.join(COSTS)}; got {cost!r}")
    if not 0 < lowest < 1:
        raise ValueError(f"lowest must be a fraction in (0, 1); got {lowest!r}")
    decide, measure = Split(calib_images, "decide"), Split(calib_images, "measure")
    original = copy.deepcopy(model)
    reference = top1(original, measure)  # under torchrun: this process's share
    if shards.all_sum(len(reference))[0] == 0:
        raise ValueError("max_change needs at least 4 calibration images (every 4th measures)")
    measured = int(shards.all_sum(len(reference))[0])
    search = ChangeSearch(max_change, cost, decide.count(), measured)
    p = next(model.parameters())
    example = torch.zeros((1, *input_shape), dtype=p.dtype, device=p.device)
    flops0, _ = count_flops(original, example)
    kwargs["cache"] = kwargs.get("cache") or FactorCache()  # CP/Tucker shared by every try
    best = None  # (cost ratio, budget, changed %, twin, result)
    fewest = None  # the same, of the plan that changed the fewest predictions (``closest``)

    def attempt(budget: float) -> bool:
        nonlocal best, fewest
        twin = copy.deepcopy(original)
        key = "target_flops" if cost == "flops" else "target_latency"
        result = compress_(twin, config, input_shape, calib_images=decide, **{key: budget},
                           progress=False, **kwargs)  # fmt: skip
        differ = int((top1(twin, measure) != reference).sum())
        changed = 100 * shards.all_sum(differ)[0] / measured
        if cost == "flops":
            ratio = count_flops(twin, example)[0] / flops0
        else:
            lp = result.latency_plan
            ratio = lp.measured_ms / lp.model_ms
        ok = changed <= max_change
        search.tries.append({"budget": round(budget, 4), "changed_pct": round(changed, 3),
                             "cost_ratio": round(ratio, 4), "within": ok})  # fmt: skip
        if ok and (best is None or ratio < best[0]):
            best = (ratio, budget, changed, twin, result)
        if closest and (fewest is None or (changed, ratio) < (fewest[2], fewest[0])):
            fewest = (ratio, budget, changed, twin, result)
        return ok

    lo, hi = lowest, 1.0
    bar = progress_bar(total=steps + 1, desc="max-change search", enabled=progress, unit="plan")
    if not attempt(lo):
        for _ in range(steps):
            bar.update()
            mid = (lo + hi) / 2
            if attempt(mid):
                hi = mid
            else:
                lo = mid
    bar.close()
    if best is None and fewest is not None:
        best, search.missed = fewest, True
    if best is None:
        return None, search
    search.cost_ratio, search.budget, search.changed_pct, twin, result = best
    _take_over(model, twin)
    return result, search


def _take_over(model: nn.Module, twin: nn.Module) -> None:
    """Make ``model`` the compressed ``twin`` in place (its submodules, parameters, buffers)."""
    model.__dict__.clear()
    model.__dict__.update(twin.__dict__)

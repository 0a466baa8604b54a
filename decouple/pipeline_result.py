"""What :func:`decouple.pipeline.compress_` returns, and what it raises when a budget is out of
reach."""

from __future__ import annotations

from dataclasses import dataclass, field

from .calibrate.bn_bias import BiasCorrection
from .calibrate.head_distill import HeadDistillation
from .calibrate.layerwise import CalibrationRecord
from .plan.allocate import Allocation
from .plan.latency_budget import LatencyPlan
from .runtime.realize import RealizationChoice
from .surgery.rewrite import LayerRecord


class TargetMissed(ValueError):
    """The budget asked of :func:`compress_` is out of reach and ``allow_miss`` is False.

    ``budget`` names it (``target_flops=0.5``); ``reachable`` says what the closest plan keeps,
    and what the planner's own loss predicts it costs. The model is left as it was.
    """

    def __init__(self, budget: str, reachable: str) -> None:
        super().__init__(f"{budget} is out of reach: {reachable}")
        self.budget, self.reachable = budget, reachable


def flops_missed(a: Allocation, target: float) -> TargetMissed:
    base = a.target_flops / target  # the model's FLOPs the fraction is of
    return TargetMissed(
        f"target_flops={target:g}",
        f"the cheapest plan keeps {100 * a.total_flops / base:.1f} % of the FLOPs; its predicted loss "
        f"({a.criterion} criterion) is {a.loss:.4g}",
    )


def latency_missed(p: LatencyPlan, target: float) -> TargetMissed:
    return TargetMissed(
        f"target_latency={target:g}",
        f"the fastest plan timed keeps {100 * p.measured_ms / p.model_ms:.1f} % of the measured latency "
        f"({p.measured_ms:.2f} of {p.model_ms:.2f} ms); its predicted loss "
        f"({p.allocation.criterion} criterion) is {p.allocation.loss:.4g}",
    )


@dataclass
class CompressResult:
    """Records of every step of :func:`compress_`."""

    records: list[LayerRecord]
    fold_error: str | None = None
    allocation: Allocation | None = None
    calibration: list[CalibrationRecord] = field(default_factory=list)
    latency_plan: LatencyPlan | None = None
    realizations: dict[str, RealizationChoice] = field(default_factory=dict)
    whole_model_ms: dict[str, float] = field(default_factory=dict)  # confirm_on_model_
    calibration_seconds: float | None = None
    bias_correction: BiasCorrection | None = None  # data-free, from the BatchNorm statistics
    head_distillation: HeadDistillation | None = None  # a pruned head fit to the outputs

    def extra(self) -> dict:
        """What the report adds beside the per-layer table."""
        out: dict = {}
        if self.bias_correction is not None:
            out["bias_correction"] = self.bias_correction.to_dict()
        if self.fold_error:
            out["bn_fold_error"] = self.fold_error
        if self.latency_plan is not None:
            out["latency_allocation"] = self.latency_plan.to_dict()
        elif self.allocation is not None:
            a = self.allocation
            out["allocation"] = {
                "criterion": a.criterion,
                "target_flops": a.target_flops,
                "planned_flops": a.total_flops,
                "reached": a.total_flops <= a.target_flops,
                "ranks": a.ranks(),
                "methods": a.methods(),
                "predicted_loss": a.loss,
                "uniform_baseline": a.uniform,
                "reasons": a.reasons,
            }
        if self.calibration:
            out["calibration"] = [c.to_dict() for c in self.calibration]
            out["calibration_seconds"] = self.calibration_seconds
        if self.head_distillation is not None:
            out["head_distillation"] = self.head_distillation.to_dict()
        if self.realizations:
            out["realizations"] = {n: c.to_dict() for n, c in self.realizations.items()}
        if self.whole_model_ms:
            out["realization_check"] = {
                "whole_model_ms": self.whole_model_ms,
                "kept": min(self.whole_model_ms, key=self.whole_model_ms.get),
            }
        return out

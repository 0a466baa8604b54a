"""Fake whole-model clocks for the latency planner's tests."""

from __future__ import annotations

from decouple.plan import latency_budget, plan_timing


def whole_model_clock(monkeypatch, measure) -> None:
    """``measure(model, example) -> Latency`` prices every whole-model timing of the latency
    planner: the model's own, and each plan's beside it (``side_by_side``)."""

    def side_by_side(modules, example, *args, **kwargs):
        return {k: measure(m, example) for k, m in modules.items()}

    monkeypatch.setattr(latency_budget, "measure", measure)
    monkeypatch.setattr(plan_timing, "side_by_side", side_by_side)

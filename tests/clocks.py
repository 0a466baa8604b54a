"""Fake whole-model clocks for the latency planner's tests."""

from __future__ import annotations

from decouple.plan import latency_budget


def whole_model_clock(monkeypatch, measure) -> None:
    """``measure(model, example) -> Latency`` prices every whole-model timing of the latency
    planner: the model's own, and each plan's beside it (``compare``)."""

    def compare(before, after, example, *args, **kwargs):
        b, a = measure(before, example), measure(after, example)
        return {"before": b.to_dict(), "after": a.to_dict(), "speedup": b.median_ms / a.median_ms}

    monkeypatch.setattr(latency_budget, "measure", measure)
    monkeypatch.setattr(latency_budget, "compare", compare)

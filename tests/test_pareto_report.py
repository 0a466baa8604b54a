"""The Pareto sweep's report: rows of several calibration sizes, old rows without the column,
and plans whose per-layer loss sum is unknown (pruned) are grouped and ranked as they should be."""

from __future__ import annotations

import math

import pytest

from decouple.plan.losses import CRITERIA


@pytest.fixture
def sweep(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "experiments"))
    pytest.importorskip("scipy")
    import pareto_sweep

    return pareto_sweep


def row(method, target, n, top1, loss, model="m"):
    r = {"model": model, "scheme": "budget", "method": method, "target": target,
         "calibrated": n > 0, "calib_images": n, "top1": top1}  # fmt: skip
    r.update({f"loss_{c}": loss for c in CRITERIA})
    return r


def test_rows_written_before_the_column_read_as_512_or_data_free(sweep):
    old = {"calibrated": True, "calib_images": ""}
    assert sweep.calib_images(old) == 512
    assert sweep.calib_images({"calibrated": False}) == 0
    assert sweep.calib_images({"calibrated": True, "calib_images": 2048}) == 2048
    assert sweep.refit_label({"calibrated": True, "calib_images": "2048"}) == "calibrated (2048)"


def test_rank_correlation_per_calibration_size_and_without_unknown_losses(sweep):
    rows = [row("a", 0.5, 512, 90.0, 0.1), row("b", 0.5, 512, 80.0, 0.3),
            row("c", 0.4, 512, 85.0, 0.2), row("d", 0.4, 512, 70.0, float("nan")),
            row("a", 0.5, 2048, 91.0, 0.1), row("a", 0.4, 2048, 89.0, 0.2),
            row("a", 0.5, 0, 60.0, 0.9), row("b", 0.5, 0, 70.0, 0.5),
            row("c", 0.5, 0, 50.0, 0.2)]  # fmt: skip
    rows += [row(m, 0.5, 512, 80.0, float("nan"), model="pruned") for m in "abc"]
    got = {r["calib_images"]: r for r in sweep.spearman_rows(rows) if r["model"] == "m"}
    assert [r for r in sweep.spearman_rows(rows) if r["model"] == "pruned"] == []
    assert set(got) == {0, 512}, "2048 has two plans: no correlation"
    assert got[512]["plans"] == 4
    assert all(got[512][f"rho_{c}"] == 1.0 for c in CRITERIA), "the nan plan is left out"
    data_free = got[0][f"rho_{CRITERIA[0]}"]
    assert not math.isnan(data_free) and data_free < 0  # loss order against top-1 order


def test_auto_is_compared_within_its_own_calibration_size(sweep):
    rows = [row("auto", 0.5, 512, 90.0, 0.1), row("cp", 0.5, 512, 91.0, 0.1),
            row("auto", 0.5, 2048, 92.0, 0.1)]  # fmt: skip
    lines = sweep.wins(rows)
    assert len(lines) == 1 and "calibrated (512): auto loses" in lines[0]

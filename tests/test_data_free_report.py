"""The data-free experiment's head-to-head table: which runs meet the peer, on which images, and
what its rows say, from fixed predictions (no model runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture
def data_free(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "experiments"))
    pytest.importorskip("scipy")
    import data_free

    return data_free


def _preds(right_exact, right_jpeg, held=None):
    """Predictions right (1) or wrong (0) per image, where every label is 1."""
    j = torch.tensor(right_jpeg)
    held = (
        torch.ones(len(j), dtype=torch.bool)
        if held is None
        else torch.tensor(held, dtype=torch.bool)
    )
    return torch.tensor(right_exact), j, held


def _setup(data_free):
    tests = {"m": (None, torch.ones(4, dtype=torch.long), None)}
    jpeg = (None, torch.ones(4, dtype=torch.long), None)
    peer = data_free.PEER
    preds = {
        ("m", 0.5, peer, 0): _preds([1, 0, 0, 0], [1, 1, 0, 0]),
        ("m", 0.5, peer, 1): _preds([0, 0, 0, 0], [1, 0, 0, 0]),
        ("m", 0.5, "ours, synthetic", 0): _preds([1, 1, 1, 0], [1, 1, 1, 1]),
        ("m", 0.5, "ours, synthetic", 1): _preds([0, 0, 0, 0], [0, 0, 0, 0]),
        # calibrated on the last JPEG image: it is left out of every comparison with this run
        ("m", 0.5, "ours, 512 real images", 0): _preds([1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0]),
        ("m", 0.5, "ours, data-free", 0): _preds([1, 0, 0, 0], [1, 1, 0, 0]),
        ("m", 0.4, peer, 0): _preds([1, 1, 1, 1], [1, 1, 1, 1]),
    }
    return preds, tests, jpeg


def test_seeded_runs_meet_the_peer_of_their_seed_and_deterministic_ones_every_seed(data_free):
    rows = data_free.head_to_head(*_setup(data_free))
    pairs = sorted((r["variant"], r["seed"]) for r in rows)
    assert pairs == [("ours, 512 real images", 0), ("ours, data-free", 0),
                     ("ours, data-free", 1), ("ours, synthetic", 0),
                     ("ours, synthetic", 1)]  # fmt: skip
    assert all(r["target"] == 0.5 for r in rows)  # the 0.4 peer has no run of ours to meet


def test_the_difference_is_ours_minus_the_peers_on_the_images_neither_calibrated_on(data_free):
    rows = {(r["variant"], r["seed"]): r for r in data_free.head_to_head(*_setup(data_free))}
    syn = rows[("ours, synthetic", 0)]
    assert syn["exact_change"] == pytest.approx(50.0)  # 3 of 4 right against 1 of 4
    assert syn["jpeg_change"] == pytest.approx(50.0) and syn["jpeg_images"] == 4
    assert syn["exact_low"] <= syn["exact_change"] <= syn["exact_high"]
    real = rows[("ours, 512 real images", 0)]
    assert real["jpeg_images"] == 3  # its calibration image is out
    assert real["jpeg_change"] == pytest.approx(100 / 3)
    tie = rows[("ours, data-free", 0)]  # the same predictions: no difference, no width
    assert tie["exact_change"] == tie["exact_low"] == tie["exact_high"] == 0
    assert rows[("ours, synthetic", 1)]["jpeg_change"] == pytest.approx(-25.0)


def test_the_table_counts_pairs_ahead_and_the_rows_round_trip(data_free, tmp_path):
    rows = data_free.in_order(data_free.head_to_head(*_setup(data_free)))
    lines = data_free.head_to_head_lines(rows)
    table = {ln.split(" | ")[2]: ln.split(" | ") for ln in lines if ln.startswith("| m |")}
    assert table["ours, synthetic"][-1] == "0 of 2 |"  # 4 images: no interval clears 0
    assert table["ours, synthetic"][3] == table["ours, data-free"][3] == "2"  # pairs
    assert table["ours, synthetic"][4].startswith("+25.00")  # exact: (+50 + 0) / 2
    assert table["ours, synthetic"][5].startswith("+12.50")  # held-out: (+50 - 25) / 2
    data_free.write_csv(tmp_path / "vs.csv", data_free.VS_FIELDS, rows)
    back = data_free.read_rows(tmp_path / "vs.csv")
    assert [(r["variant"], r["seed"]) for r in back] == [(r["variant"], r["seed"]) for r in rows]
    assert back[0]["jpeg_change"] == pytest.approx(rows[0]["jpeg_change"])

"""The paired top-1 change: exact counts from both models in one pass, and an interval that means
what it says (coverage checked by simulation against the known change)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from decouple.io.evaluate import compare_batches, evaluate_batches
from decouple.io.paired_change import accuracy_line, paired_change


@given(
    n=st.integers(1, 5000),
    fixed=st.integers(0, 400),
    broken=st.integers(0, 400),
    level=st.sampled_from([0.8, 0.95, 0.99]),
)
@settings(max_examples=60, deadline=None)
def test_interval_holds_the_estimate_within_what_the_moved_images_allow(n, fixed, broken, level):
    if fixed + broken > n:
        fixed, broken = fixed * n // (fixed + broken), broken * n // (fixed + broken)
    c = paired_change(n, fixed, broken, level)
    assert c.change == pytest.approx((fixed - broken) / n)
    assert c.low <= c.change + 1e-12 and c.change <= c.high + 1e-12
    m = (fixed + broken) / n  # the change can move no further than the images that moved
    assert -m - 1e-12 <= c.low and c.high <= m + 1e-12
    assert 0 <= c.p_value <= 1


def test_symmetric_counts_give_an_interval_centred_on_zero():
    c = paired_change(1017, 30, 30)
    assert c.change == 0 and c.low == pytest.approx(-c.high) and c.high > 0
    assert c.p_value == pytest.approx(1.0)


def test_no_image_moved_means_no_change_and_no_width():
    c = paired_change(1017, 0, 0)
    assert (c.change, c.low, c.high, c.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_more_images_at_the_same_rates_narrow_the_interval_and_higher_level_widens_it():
    widths = [paired_change(n, n // 20, n // 12).high - paired_change(n, n // 20, n // 12).low
              for n in (600, 2400, 9600)]  # fmt: skip
    assert widths[0] > widths[1] > widths[2]
    assert widths[1] == pytest.approx(widths[0] / 2, rel=0.15)  # 1/sqrt(n)
    c90, c99 = paired_change(2000, 40, 70, 0.90), paired_change(2000, 40, 70, 0.99)
    assert c99.low < c90.low and c99.high > c90.high


def test_coverage_of_the_true_change_by_simulation():
    """Images fixed with probability 3 %, broken with 5 %: the true change is -2 pt; the 95 %
    interval (exact, so conservative) must hold it in at least 93 % of 400 draws."""
    rng = np.random.default_rng(0)
    n, held = 1000, 0
    for _ in range(400):
        kind = rng.choice(3, size=n, p=[0.03, 0.05, 0.92])
        c = paired_change(n, int((kind == 0).sum()), int((kind == 1).sum()))
        held += c.low <= -0.02 <= c.high
    assert held / 400 >= 0.93


@pytest.mark.parametrize("n, fixed, broken, level", [(0, 0, 0, 0.95), (10, 6, 5, 0.95),
                                                      (10, -1, 0, 0.95), (10, 1, 1, 1.0)])  # fmt: skip
def test_bad_counts_are_refused(n, fixed, broken, level):
    with pytest.raises(ValueError):
        paired_change(n, fixed, broken, level)


class _Fixed(nn.Module):
    """Predicts the class stored for each image (its first pixel holds the image's index)."""

    def __init__(self, classes: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("classes", classes)
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        idx = x[:, 0, 0, 0].long()
        return nn.functional.one_hot(self.classes[idx], 10).float() * 5 + self.w


def test_compare_batches_counts_the_images_each_model_alone_gets_right():
    n = 100
    labels = torch.arange(n) % 10
    x = torch.zeros(n, 1, 2, 2)
    x[:, 0, 0, 0] = torch.arange(n).float()
    a_pred, b_pred = labels.clone(), labels.clone()
    a_pred[:30] = (labels[:30] + 1) % 10  # the first model wrong on 0..29
    b_pred[20:45] = (labels[20:45] + 2) % 10  # the second wrong on 20..44
    a, b = _Fixed(a_pred), _Fixed(b_pred)
    batches = [(x[i : i + 32], labels[i : i + 32]) for i in range(0, n, 32)]
    got = compare_batches(a, b, batches)
    assert got["before"] == evaluate_batches(a, batches)
    assert got["after"] == evaluate_batches(b, batches)
    p = got["paired"]
    assert (p["fixed"], p["broken"], p["n"]) == (20, 15, n)  # 0..19 fixed, 30..44 broken
    assert p["change"] == pytest.approx(got["after"]["top1"] - got["before"]["top1"])
    line = accuracy_line(got, f"{n} test images")
    assert line.startswith("accuracy: top-1 70.00 % -> 75.00 % on 100 test images (+5.00 pt, 95 %")
    assert "20 images fixed, 15 broken" in line
    assert accuracy_line({k: got[k] for k in ("before", "after")}, "x").endswith("on x")

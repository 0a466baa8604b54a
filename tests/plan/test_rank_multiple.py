"""``rank_multiple``: under a budget, CP, Tucker and svd ranks come in multiples only."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from toys import toy

from decouple import DecoupleConfig
from decouple.pipeline import compress_
from decouple.surgery.methods import candidate_ranks


@given(
    method=st.sampled_from(["cp", "tucker", "svd"]),
    channels=st.integers(8, 48),
    multiple=st.sampled_from([1, 4, 8]),
    budget=st.floats(0.2, 1.0),
)
def test_candidate_ranks_are_multiples_within_the_budget(method, channels, multiple, budget):
    conv = nn.Conv2d(channels, channels, 1 if method == "svd" else 3, padding=1)
    full = 2 * 10 * 10 * channels * channels * conv.kernel_size[0] ** 2
    plain = candidate_ranks(conv, method, "", (10, 10), (10, 10), budget * full)
    ranks = candidate_ranks(conv, method, "", (10, 10), (10, 10), budget * full, multiple)
    assert all(f <= budget * full for _, f in ranks)
    assert all(r % multiple == 0 for r, _ in ranks)
    assert len(ranks) == len({r for r, _ in ranks})
    if multiple == 1:
        assert ranks == plain


def test_nd_ranks_are_left_as_they_are():
    conv = nn.Conv2d(12, 12, 3, padding=1)
    args = (conv, "nd", "dw-pw", (8, 8), (8, 8), 1e9)
    assert candidate_ranks(*args, 8) == candidate_ranks(*args)


def test_a_budget_with_rank_multiple_picks_multiples_only():
    net = toy().float()
    config = DecoupleConfig(method="cp", rank_multiple=4, include_stem=True)
    result = compress_(net, config, (3, 8, 8), target_flops=0.6)
    ranks = [int(m.group(1)) for v in result.allocation.methods().values()
             if (m := re.match(r"cp R=(\d+)", v))]  # fmt: skip
    assert ranks and all(r % 4 == 0 for r in ranks)


def test_rank_multiple_round_trips_and_is_checked():
    c = DecoupleConfig(method="auto", rank_multiple=8)
    assert DecoupleConfig.from_json(c.to_json()) == c
    for bad in (0, -8, 2.5, True, 4096):
        with pytest.raises((TypeError, ValueError), match="rank_multiple"):
            DecoupleConfig(rank_multiple=bad)

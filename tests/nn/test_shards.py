"""Shares of a set by mini-batch (decouple.nn.shards) without a process group: a fake world
size, each rank's share read in turn."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from decouple.calibrate.stream import Split, batches
from decouple.nn import shards


def _as(monkeypatch, rank: int, size: int) -> None:
    monkeypatch.setattr(shards, "world", lambda: (rank, size))


def _sources(images: torch.Tensor):
    data = TensorDataset(images, torch.zeros(len(images)))
    return {
        "tensor": images,
        "loader": DataLoader(data, batch_size=4, shuffle=False),
        "iterable": [images[i : i + 4] for i in range(0, len(images), 4)],
    }


@pytest.mark.parametrize("kind", ["tensor", "loader", "iterable"])
@pytest.mark.parametrize("size", [2, 3])
def test_shares_cover_the_set_once_with_its_indices(monkeypatch, kind, size):
    images = torch.arange(22.0).reshape(22, 1, 1, 1)  # image i holds the number i
    source = _sources(images)[kind]
    seen: list[int] = []
    for rank in range(size):
        _as(monkeypatch, rank, size)
        for start, x in batches(source, batch_size=4)():
            assert x.flatten().tolist() == list(range(start, start + len(x)))  # global indices
            seen += x.flatten().int().tolist()
    assert sorted(seen) == list(range(22))


@pytest.mark.parametrize("part", Split.PARTS)
def test_a_split_is_numbered_as_a_set_of_its_own_in_every_share(monkeypatch, part):
    images = torch.arange(30.0).reshape(30, 1, 1, 1)
    whole = {}
    for start, x in Split(images, part).indexed_batches(shard=False)():
        whole.update(zip(range(start, start + len(x)), x.flatten().tolist(), strict=True))
    assert list(whole) == list(range(len(whole)))
    expect = [i for i in range(30) if (i % 4 == 3) == (part == "measure")]
    assert list(whole.values()) == expect
    shared = {}
    for rank in range(2):
        _as(monkeypatch, rank, 2)
        for start, x in Split(images, part).indexed_batches()():
            shared.update(zip(range(start, start + len(x)), x.flatten().tolist(), strict=True))
    assert dict(sorted(shared.items())) == whole


def test_one_process_is_the_identity():
    assert shards.world() == (0, 1) and shards.is_main()
    assert shards.all_sum(1.5, 2) == [1.5, 2.0]
    assert shards.from_main(lambda a: a + 1, 1) == 2
    with shards.alone():
        assert shards.world() == (0, 1)

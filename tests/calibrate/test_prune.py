"""Channel pruning from moments: planted channels found, exact where they suffice, monotone."""

import pytest
import torch
from torch import nn

from decouple.calibrate.moments import Moments
from decouple.calibrate.prune import elimination_order, pruned_losses, refit_on


def moments_of(layer, x, y):
    m = Moments.zeros(layer)
    m.add(layer, x, y, positions=None)
    return m


def planted(n=400, c=12, useful=(1, 4, 7), out=5, seed=0):
    """A 1×1 conv reading ``c`` channels whose targets depend on ``useful`` only."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, 2, 2, generator=g, dtype=torch.float64)
    a = torch.randn(out, len(useful), generator=g, dtype=torch.float64)
    y = torch.einsum("oc,nchw->nohw", a, x[:, list(useful)]) + 0.5
    layer = nn.Conv2d(c, out, 1).double()
    return layer, x, y


def test_the_planted_channels_come_first_and_suffice():
    layer, x, y = planted()
    m = moments_of(layer, x, y)
    order = elimination_order(m, ridge=1e-10)
    assert sorted(order) == list(range(12))
    assert sorted(order[:3]) == [1, 4, 7]
    losses = pruned_losses(m, m, order, [1, 2, 3, 6, 12], ridge=1e-10)
    assert losses[2] < 1e-12 and losses[-1] < 1e-12
    assert losses[0] > 1e-3


def test_losses_fall_as_channels_are_kept():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 10, 3, 3, generator=g, dtype=torch.float64)
    y = torch.randn(300, 4, 3, 3, generator=g, dtype=torch.float64) + torch.einsum(
        "oc,nchw->nohw", torch.randn(4, 10, generator=g, dtype=torch.float64), x
    )
    layer = nn.Conv2d(10, 4, 1).double()
    m = moments_of(layer, x, y)
    order = elimination_order(m, ridge=1e-12)
    losses = pruned_losses(m, m, order, list(range(1, 11)), ridge=1e-12)
    assert all(a >= b - 1e-12 for a, b in zip(losses, losses[1:], strict=False))


def test_refit_on_every_channel_is_least_squares():
    layer, x, y = planted(useful=(0, 2))
    y = y + 0.1 * torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=y.dtype)
    m = moments_of(layer, x, y)
    w, b = refit_on(m, torch.arange(12), ridge=1e-12)
    feats = torch.cat([x.permute(0, 2, 3, 1).reshape(-1, 12), torch.ones(x.numel() // 12, 1,
                       dtype=x.dtype)], 1)  # fmt: skip
    sol = torch.linalg.lstsq(feats, y.permute(0, 2, 3, 1).reshape(-1, 5)).solution
    assert torch.allclose(w, sol[:-1].T, atol=1e-8)
    assert torch.allclose(b, sol[-1], atol=1e-8)


def test_grouped_layers_are_refused():
    layer = nn.Conv2d(4, 4, 1, groups=2).double()
    m = moments_of(layer, torch.randn(8, 4, 2, 2, dtype=torch.float64),
                   torch.randn(8, 4, 2, 2, dtype=torch.float64))  # fmt: skip
    with pytest.raises(ValueError, match="one group"):
        elimination_order(m)

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


class Branch(nn.Module):
    """a (3×3, decoupled) → b (3×3, the chain's producer) → ReLU → c (1×1, its consumer)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.a = nn.Conv2d(6, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 10, 3, padding=1)
        self.c = nn.Conv2d(10, 4, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_the_producer_of_a_pruned_chain_is_refit_on_the_outputs_it_kept():
    """Upstream changes (here a rank-3 ``a``) move the producer's outputs: calibration refits it
    against the original's outputs of the channels it kept, as every layer the plan changed."""
    import copy

    from decouple import DecoupleConfig, decouple_
    from decouple.calibrate.layerwise import calibrate_
    from decouple.surgery.chains import find_chains, prune_chain_

    model = Branch().double().eval()
    reference = copy.deepcopy(model)
    decouple_(model, DecoupleConfig(overrides={"a": 3}, fold_bn=False))
    (chain,) = find_chains(model, ["b", "c"])
    keep = torch.tensor([1, 4, 6, 9])
    prune_chain_(model, chain, keep)
    model.b.decouple_kept = keep
    before = copy.deepcopy(model.b)
    x = torch.randn(128, 6, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    records = {r.name: r for r in calibrate_(model, reference, x)}
    rec = records["b"]
    assert rec.mode == "full" and rec.error_after < 0.97 * rec.error_before
    assert not torch.equal(model.b.weight, before.weight)
    # the targets are the original's kept channels: with a's change undone (and b's refit above
    # now wrong), b fits them again, but for the ridge
    exact = copy.deepcopy(model)
    exact.a = reference.a
    records = {r.name: r for r in calibrate_(exact, reference, x)}
    assert records["b"].error_before > 0.1 and records["b"].error_after < 1e-3


def _greedy_reference(m, ridge):
    """Backward elimination one channel at a time, written plainly (the definition)."""
    from decouple.calibrate.prune import _centred

    g, c, _, _ = _centred(m)
    alive, dropped = list(range(len(g))), []
    while len(alive) > 1:
        best = None
        for j in alive:
            rest = [k for k in alive if k != j]
            err = _ls_error(g, c, rest, ridge)
            if best is None or err < best[0]:
                best = (err, j)
        alive.remove(best[1])
        dropped.append(best[1])
    return [alive[0], *dropped[::-1]]


def _ls_error(g, c, keep, ridge):
    """Least-squares error (up to a constant) of the targets on channels ``keep``, with the same
    ridge as elimination_order (the whole Gram matrix's)."""
    from decouple.calibrate.prune import _ridged

    gr = _ridged(g, ridge)[keep][:, keep]
    ck = c[keep]
    return float(-(ck * torch.linalg.solve(gr, ck)).sum())


def test_one_channel_at_a_time_is_the_exact_greedy():
    """Below the block size each step drops the channel whose loss raises the error least."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 9, 2, 2, generator=g, dtype=torch.float64)
    x[:, 3] += x[:, 1]  # correlated channels: the order is not a ranking of single channels
    y = torch.einsum("oc,nchw->nohw", torch.randn(3, 9, generator=g, dtype=torch.float64), x)
    layer = nn.Conv2d(9, 3, 1).double()
    m = moments_of(layer, x, y + 0.1 * torch.randn(y.shape, generator=g, dtype=torch.float64))
    assert elimination_order(m, ridge=1e-6) == _greedy_reference(m, 1e-6)


def test_wide_layers_drop_blocks_and_still_find_the_planted_channels(monkeypatch):
    from decouple.calibrate import prune

    monkeypatch.setattr(prune, "EXACT_CHANNELS", 4)  # 64 channels: blocks of up to 16
    monkeypatch.setattr(prune, "BLOCK_SHARE", 4)
    layer, x, y = planted(n=600, c=64, useful=(3, 17, 40, 41, 60))
    m = moments_of(layer, x, y)
    order = elimination_order(m, ridge=1e-10)
    assert sorted(order) == list(range(64))
    assert sorted(order[:5]) == [3, 17, 40, 41, 60]
    losses = pruned_losses(m, m, order, [4, 5, 20], ridge=1e-10)
    assert losses[0] > 1e-3 and losses[1] < 1e-12 and losses[2] < 1e-12

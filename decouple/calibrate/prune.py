"""Which input channels a layer can lose, and its refit on the rest: channel pruning from moments.

When a layer ``P`` feeds a 1×1 conv or linear layer ``Q`` through channel-wise steps only
(activations, depthwise convs, pooling), dropping ``P``'s output channel ``j`` removes it from
``P``, from every step between, and one input of ``Q``: all of them get cheaper, and what
happens in between (ReLU6, pooling) stays exact for the channels kept. ``Q`` is then refit on its
remaining inputs by least squares against the original ``Q``'s outputs (He et al. 2017, "Channel
pruning for accelerating very deep neural networks"; ThiNet). On networks whose 1×1 convs are
already thin (MobileNetV2's tail) this loses far less than any low-rank form at the same FLOPs.

Channels are dropped by backward elimination on ``Q``'s input moments: the one whose removal
raises the least-squares error least goes first (``‖β_j‖² / (G⁻¹)_jj``, the exact increase,
with ``G⁻¹`` downdated after each removal), so one ``O(F³)`` pass orders every channel and every
width is priced from it. Everything reads :class:`~decouple.calibrate.moments.Moments`.
"""

from __future__ import annotations

import torch

from .moments import Moments
from .refit import _ridge_solve, _split

# Channels dropped one by one while at most this many are left; above it, a block of the
# cheapest 1/BLOCK_SHARE of them at once: one by one, a 4,096-wide layer took ten minutes
# (each step updates the whole inverse), and the widths the planner prices are 1/48 apart.
EXACT_CHANNELS = 512
BLOCK_SHARE = 64


def _centred(m: Moments):
    """Group 0's centred ``XX`` (F, F), ``XY`` (F, N), input and output means."""
    xx, xb, cnt, xy, yb = _split(m, 0)
    cnt = float(cnt)
    if cnt <= 0:
        raise ValueError("the moments hold no samples")
    mx, my = xb / cnt, yb / cnt
    return xx - cnt * torch.outer(mx, mx), xy - cnt * torch.outer(mx, my), mx, my


def _ridged(g: torch.Tensor, ridge: float) -> torch.Tensor:
    lam = ridge * g.diagonal().mean().clamp_min(1e-12)
    return g + lam * torch.eye(len(g), dtype=g.dtype)


def elimination_order(m: Moments, ridge: float = 1e-4) -> list[int]:
    """The input channels of a 1×1 conv or linear layer, most useful first.

    Parameters
    ----------
    m : Moments
        The layer's input moments against the outputs it should give (one group).
    ridge : float
        Relative ridge on the Gram matrix, keeping the inverse finite for dead channels.

    Returns
    -------
    list of int
        Every channel once; the first ``k`` are the ``k`` to keep.
    """
    if m.xx.shape[0] != 1:
        raise ValueError("channel pruning reads a layer of one group")
    g, c, _, _ = _centred(m)
    gi = torch.linalg.inv(_ridged(g, ridge))
    beta = gi @ c  # (F, N): the full least-squares solution
    alive = torch.arange(len(g))  # the channels still in, as rows of gi and beta
    dropped: list[int] = []
    while len(alive) > 1:
        d = gi.diagonal().clamp_min(1e-300)
        cost = beta.square().sum(1) / d  # exact rise of the error when channel j goes
        wide = len(alive) > EXACT_CHANNELS
        block = max(1, len(alive) // BLOCK_SHARE) if wide else 1
        out = torch.argsort(cost)[:block]
        dropped += alive[out].tolist()
        mask = torch.ones(len(alive), dtype=torch.bool)
        mask[out] = False
        keep = mask.nonzero()[:, 0]
        # Schur complement: the inverse and the solution with channels ``out`` removed (each
        # block indexed once: copies of the whole inverse are what a step costs)
        cols = gi[keep[:, None], out]  # (K, b)
        step = torch.linalg.solve(gi[out[:, None], out], torch.cat([cols.T, beta[out]], 1))
        beta = beta[keep] - cols @ step[:, len(keep) :]
        gi = gi[keep[:, None], keep] - cols @ step[:, : len(keep)]
        alive = alive[keep]
    dropped.append(int(alive[0]))
    return dropped[::-1]


def refit_on(m: Moments, keep: torch.Tensor, ridge: float = 1e-4):
    """Least squares of the outputs on the kept inputs: weight ``(N, k)`` and bias ``(N,)``."""
    g, c, mx, my = _centred(m)
    ck = c[keep]
    w = _ridge_solve(g[keep][:, keep], ck, torch.zeros_like(ck), ridge)  # (k, N)
    return w.T, my - w.T @ mx[keep]


def pruned_losses(
    fit: Moments, val: Moments, order: list[int], widths: list[int], ridge: float = 1e-4
) -> list[float]:
    """Held-out squared relative output error after keeping the first ``k`` of ``order`` and
    refitting on ``fit``, for every ``k`` in ``widths``."""
    total = float(val.yy.sum())
    scale = total if total > 0 else 1.0
    xx, xy = val.xx[0], val.xy[0]
    f = xx.shape[0] - 1
    out = []
    for k in widths:
        keep = torch.tensor(sorted(order[:k]))
        w, b = refit_on(fit, keep, ridge)
        a = torch.zeros(w.shape[0], f + 1, dtype=w.dtype)  # the map on augmented inputs [x; 1]
        a[:, keep] = w
        a[:, f] = b
        err = (a @ xx * a).sum() - 2 * (a * xy.T).sum() + total
        out.append(max(float(err), 0.0) / scale)
    return out

"""Closed-form refits of one factored layer from the second moments of its input patches.

One factor is refit by ridge least squares with the other fixed, so that the layer reproduces the
original layer's outputs. The ridge pulls towards the current factors, so a layer that is
already exact stays exact.

* ``last``: refit the factor that comes last, with the bias (dw-pw: the 1×1 conv; pw-dw: the
  depthwise conv). One solve.
* ``alternating``: then refit the first factor, then the last again, for a few rounds.

CP and Tucker layers refit their last 1×1 conv (:func:`refit_factored`). Every solve reads only
the second moments of :mod:`decouple.calibrate.moments`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..factor.nd import Decoupling
from ..nn.decoupled import DecoupledConv2d
from .moments import Moments


@dataclass
class Factors:
    """The trainable parts of a decoupled layer as plain tensors (float64).

    ``depthwise`` ``(S, T, kh·kw)``, ``pointwise`` ``(S, T, M)`` as in :class:`Decoupling`,
    ``bias`` ``(N,)`` or None.
    """

    order: str
    groups: int
    weight_shape: tuple[int, ...]
    depthwise: torch.Tensor
    pointwise: torch.Tensor
    bias: torch.Tensor | None

    @classmethod
    def of(cls, layer: DecoupledConv2d) -> Factors:
        """The current factors of ``layer`` (copies)."""
        return cls.from_decoupling(layer.factors(), layer.bias)

    @classmethod
    def from_decoupling(cls, dec: Decoupling, bias: torch.Tensor | None) -> Factors:
        s, t, kh, kw = dec.depthwise.shape
        # copies on the CPU, beside the moments they are refit against (the model may be on a GPU)
        b = None if bias is None else bias.detach().double().cpu().clone()
        return cls(
            dec.order,
            dec.groups,
            dec.weight_shape,
            dec.depthwise.reshape(s, t, kh * kw).cpu().clone(),
            dec.pointwise.cpu().clone(),
            b,
        )

    def decoupling(self) -> Decoupling:
        kh, kw = self.weight_shape[2:]
        s, t, _ = self.depthwise.shape
        empty = torch.empty(s, 0, dtype=torch.float64)
        return Decoupling(
            self.order,
            self.weight_shape,
            self.groups,
            self.depthwise.reshape(s, t, kh, kw),
            self.pointwise,
            empty,
        )

    def weight(self) -> torch.Tensor:
        return self.decoupling().reconstruct()

    def copy(self) -> Factors:
        return Factors(
            self.order,
            self.groups,
            self.weight_shape,
            self.depthwise.clone(),
            self.pointwise.clone(),
            None if self.bias is None else self.bias.clone(),
        )

    @torch.no_grad()
    def load_into(self, layer: DecoupledConv2d) -> None:
        layer.load_factors(self.decoupling())
        if self.bias is not None:
            layer.bias.copy_(self.bias)


def _ridge_solve(a: torch.Tensor, b: torch.Tensor, w0: torch.Tensor, ridge: float) -> torch.Tensor:
    """Solve ``min ‖·‖² + λ‖w − w0‖²`` from normal equations ``a w = b`` (batched).

    ``λ = ridge ·`` mean diagonal of ``a``: scale-free, and pulled towards the current factors.
    """
    lam = ridge * a.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
    # λ on the diagonal in place: for a 512-channel layer the system is 13,824² (1.5 GB), and an
    # identity matrix and a second copy would double that.
    lhs = a.contiguous()  # ``a`` is overwritten: every caller passes a temporary
    lhs.diagonal(dim1=-2, dim2=-1).add_(lam[..., None] if a.dim() == 3 else lam)
    rhs = b + (lam[..., None, None] if a.dim() == 3 else lam) * w0
    # The system is symmetric positive definite: Cholesky is the stable, pivot-free solver.
    chol, info = torch.linalg.cholesky_ex(lhs)
    if bool((info == 0).all()):
        return torch.cholesky_solve(rhs, chol)
    return torch.linalg.lstsq(lhs, rhs).solution  # numerically indefinite: least squares


def _split(m: Moments, j: int):
    """``XX`` block of the patches, patch sums (bias column), pixel count and ``XY`` of group j."""
    f = m.xx.shape[1] - 1
    return m.xx[j, :f, :f], m.xx[j, :f, f], m.xx[j, f, f], m.xy[j, :f], m.xy[j, f]


def _solve_1x1(h, m: Moments, j: int, w0, b0, ridge: float):
    """Ridge least squares for a 1×1 conv reading the features ``h @ patch`` of group ``j``.

    ``h`` ``(R, F)`` maps a patch to the features; ``w0`` ``(R, N/g)`` and ``b0`` ``(N/g,)`` (or
    None: no bias) are the current weights, the ridge's anchor. Returns the new pair.
    """
    xx, xb, cnt, xy, yb = _split(m, j)
    return _solve_features(h @ xx @ h.T, h @ xy, h @ xb, cnt, yb, w0, b0, ridge)


def _solve_features(a, b, col, cnt, yb, w0, b0, ridge: float):
    """:func:`_solve_1x1` from the features' moments: ``a = Σ z zᵀ``, ``b = Σ z yᵀ``,
    ``col = Σ z``; ``cnt``, ``yb``: pixels and target sums (the bias is one more feature)."""
    if b0 is not None:  # the bias is one more feature, constant 1
        a = torch.cat([torch.cat([a, col[:, None]], 1), torch.cat([col, cnt[None]])[None]], 0)
        b = torch.cat([b, yb[None]], 0)
        w0 = torch.cat([w0, b0[None]], 0)
    w = _ridge_solve(a, b, w0, ridge)
    r = w.shape[0] - (b0 is not None)
    return w[:r], (w[-1] if b0 is not None else None)


# Output channels whose pw-dw systems are built at once: bounds the (n, T, k, C, k) temporary.
PW_DW_CHUNK = 32


def refit_last(fac: Factors, m: Moments, ridge: float = 1e-4) -> Factors:
    """Refit the factor that runs last (and the bias), the first factor fixed."""
    t = fac.depthwise.shape[1]
    return refit_last_ranks(fac, m, [t], ridge)[t]


def refit_last_ranks(fac: Factors, m: Moments, ranks, ridge: float = 1e-4) -> dict[int, Factors]:
    """:func:`refit_last` of ``fac`` truncated to each rank of ``ranks`` (its top terms).

    The normal equations at a lower rank are a block of those at the full rank (the first
    factor's terms are nested), so they are built once and each rank solves its block: pricing
    every ``T`` costs one build, not one per ``T``.
    """
    n, cg, kh, kw = fac.weight_shape
    g, k, top = fac.groups, kh * kw, fac.depthwise.shape[1]
    ranks = sorted({min(int(r), top) for r in ranks})
    ng = n // g
    has_bias = fac.bias is not None
    outs = {}
    for t in ranks:
        o = fac.copy()
        o.depthwise, o.pointwise = o.depthwise[:, :t].clone(), o.pointwise[:, :t].clone()
        outs[t] = o
    for j in range(g):
        ns = slice(j * ng, (j + 1) * ng)
        xx, xb, cnt, xy, yb = _split(m, j)
        xx4 = xx.reshape(cg, k, cg, k)
        b0 = fac.bias[ns] if has_bias else None
        if fac.order == "dw-pw":
            cs = slice(j * cg, (j + 1) * cg)
            # features z_(c,t) = <d_ct, patch_c>: each reads one channel's patch
            d = fac.depthwise[cs]  # (Cg, T, K)
            big_a = torch.einsum("ctdl,dsl->ctds", torch.einsum("ctk,ckdl->ctdl", d, xx4), d)
            big_b = torch.einsum("ctk,ckn->ctn", d, xy.reshape(cg, k, ng))
            big_col = torch.einsum("ctk,ck->ct", d, xb.reshape(cg, k))
            for t in ranks:
                w0 = fac.pointwise[cs, :t].reshape(cg * t, ng)
                a = big_a[:, :t, :, :t].reshape(cg * t, cg * t)
                b, col = big_b[:, :t].reshape(cg * t, ng), big_col[:, :t].reshape(cg * t)
                w, bias = _solve_features(a, b, col, cnt, yb, w0, b0, ridge)
                outs[t].pointwise[cs] = w.reshape(cg, t, ng)
                if has_bias:
                    outs[t].bias[ns] = bias
            continue
        p = fac.pointwise[ns]  # (Ng, T, Cg): each output channel has its own system
        big_b = torch.einsum("ntc,ckn->ntk", p, xy.reshape(cg, k, ng))
        big_col = torch.einsum("ntc,ck->ntk", p, xb.reshape(cg, k))
        big_a = torch.empty(ng, top, k, top, k, dtype=xx.dtype)
        for i in range(0, ng, PW_DW_CHUNK):
            pc = p[i : i + PW_DW_CHUNK]
            q = torch.einsum("ntc,ckdl->ntkdl", pc, xx4)
            big_a[i : i + PW_DW_CHUNK] = torch.einsum("ntkdl,nsd->ntksl", q, pc)
        for t in ranks:
            a = big_a[:, :t, :, :t].reshape(ng, t * k, t * k)
            b = big_b[:, :t].reshape(ng, t * k, 1)
            w0 = fac.depthwise[ns, :t].reshape(ng, t * k, 1)
            if has_bias:
                col = big_col[:, :t].reshape(ng, t * k, 1)
                corner = cnt.expand(ng, 1, 1)
                a = torch.cat(
                    [torch.cat([a, col], 2), torch.cat([col.transpose(1, 2), corner], 2)], 1
                )
                b = torch.cat([b, yb.reshape(ng, 1, 1)], 1)
                w0 = torch.cat([w0, b0.reshape(ng, 1, 1)], 1)
            w = _ridge_solve(a, b, w0, ridge)
            outs[t].depthwise[ns] = w[:, : t * k, 0].reshape(ng, t, k)
            if has_bias:
                outs[t].bias[ns] = w[:, -1, 0]
    return outs


def refit_first(fac: Factors, m: Moments, ridge: float = 1e-4) -> Factors:
    """Refit the factor that runs first, the last factor and the bias fixed."""
    out = fac.copy()
    n, cg, kh, kw = fac.weight_shape
    g, k, t = fac.groups, kh * kw, fac.depthwise.shape[1]
    ng = n // g
    for j in range(g):
        xx, xb, _, xy, _ = _split(m, j)
        ns = slice(j * ng, (j + 1) * ng)
        # Targets less the fixed bias: y − b  =>  XY − (Σ patch) bᵀ
        resid = xy if fac.bias is None else xy - xb[:, None] * fac.bias[ns][None, :]
        xx4 = xx.reshape(cg, k, cg, k)
        if fac.order == "dw-pw":
            cs = slice(j * cg, (j + 1) * cg)
            p = fac.pointwise[cs]  # (Cg, T, Ng)
            pp = torch.einsum("atn,bsn->atbs", p, p)
            a = torch.einsum("atbs,akbl->atkbsl", pp, xx4).reshape(cg * t * k, cg * t * k)
            b = torch.einsum("atn,akn->atk", p, resid.reshape(cg, k, ng)).reshape(-1, 1)
            w = _ridge_solve(a, b, fac.depthwise[cs].reshape(-1, 1), ridge)
            out.depthwise[cs] = w.reshape(cg, t, k)
        else:
            d = fac.depthwise[ns]  # (Ng, T, K)
            q = torch.einsum("ntk,ckdl->ntcdl", d, xx4)
            a = torch.einsum("ntcdl,nsl->ntcsd", q, d).reshape(ng, t * cg, t * cg)
            b = torch.einsum("ntk,ckn->ntc", d, resid.reshape(cg, k, ng)).reshape(ng, t * cg, 1)
            w = _ridge_solve(a, b, fac.pointwise[ns].reshape(ng, t * cg, 1), ridge)
            out.pointwise[ns] = w.reshape(ng, t, cg)
    return out


def refit_pointwise_out(
    head: torch.Tensor,
    out: torch.Tensor,
    bias: torch.Tensor | None,
    m: Moments,
    ridge: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Refit the last 1×1 conv of a CP or Tucker layer (and the bias), the convs before it fixed.

    Parameters
    ----------
    head : torch.Tensor
        ``(g, R, F)``: the linear map from a patch to the features the last 1×1 conv reads
        (``head_matrix()`` of the layer's factors).
    out : torch.Tensor
        ``(g, N/g, R)``: the current weights of the last 1×1 conv, the ridge's anchor.
    bias : torch.Tensor or None
        ``(N,)``.
    m : Moments
        Patch moments of the layer's inputs against the original layer's outputs.

    Returns
    -------
    out, bias : the refit weights in the same shapes.
    """
    g, ng, _ = out.shape
    new_out, new_bias = out.clone(), None if bias is None else bias.clone()
    for j in range(g):
        ns = slice(j * ng, (j + 1) * ng)
        w, b = _solve_1x1(head[j], m, j, out[j].T, None if bias is None else bias[ns], ridge)
        new_out[j] = w.T
        if bias is not None:
            new_bias[ns] = b
    return new_out, new_bias


def refit_factored(f, bias: torch.Tensor | None, m: Moments, ridge: float = 1e-4):
    """:func:`refit_pointwise_out` on CP/Tucker factors ``f``: ``(out, bias, kernel)`` after it."""
    head = f.head_matrix()
    out, new_bias = refit_pointwise_out(head, f.out, bias, m, ridge)
    return out, new_bias, kernel_from_head(head, out, f.weight_shape)


def kernel_from_head(head: torch.Tensor, out: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The k×k kernel of a CP/Tucker layer from its head map and last 1×1 weights."""
    return torch.einsum("gnr,grf->gnf", out, head).reshape(shape)


def refit(fac: Factors, m: Moments, mode: str, ridge: float = 1e-4, rounds: int = 2) -> Factors:
    """Apply one refit ``mode`` (``"last"`` or ``"alternating"``) to ``fac``."""
    if mode not in ("last", "alternating"):
        raise ValueError(f"refit mode must be 'last' or 'alternating'; got {mode!r}")
    out = refit_last(fac, m, ridge)
    return alternate(out, m, ridge, rounds) if mode == "alternating" else out


MAX_SYSTEM = 1 << 26  # matrix elements (512 MB in float64) of the largest first-factor system


def first_factor_system(fac: Factors) -> int:
    """Matrix elements :func:`refit_first` solves with, per group.

    dw-pw couples every channel's depthwise filters: one ``(C·T·k²)²`` system (13,824² for a
    512-channel 3×3 layer at T=3); pw-dw solves ``N`` systems of ``(T·C)²``. Every CIFAR ResNet
    layer stays under :data:`MAX_SYSTEM`; the last stages of ImageNet networks do not.
    """
    n, cg, kh, kw = fac.weight_shape
    t = fac.depthwise.shape[1]
    if fac.order == "dw-pw":
        return (cg * t * kh * kw) ** 2
    return n // fac.groups * (t * cg) ** 2


def alternate(fac: Factors, m: Moments, ridge: float, rounds: int) -> Factors:
    """Alternating rounds (first factor, then last) from an already last-refit ``fac``."""
    for _ in range(rounds):
        fac = refit_last(refit_first(fac, m, ridge), m, ridge)
    return fac

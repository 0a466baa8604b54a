"""The three ways to factor a conv, behind one interface for surgery, budgets and calibration.

* ``nd`` — network decoupling (:mod:`decouple.factor.nd`, :class:`DecoupledConv2d`), order
  ``dw-pw`` or ``pw-dw``; rank ``T`` terms per channel slice.
* ``cp`` — CP (:mod:`decouple.factor.cp`, :class:`CPConv2d`); rank ``R`` terms per group.
* ``tucker`` — Tucker-2 (:mod:`decouple.factor.tucker`, :class:`TuckerConv2d`); one rank ``r`` means
  ``(R_out, R_in) = (r, r)`` clipped to each mode's full size.
* ``svd`` — low rank (:mod:`decouple.factor.lowrank`, :class:`LowRankConv2d`,
  :class:`LowRankLinear`): the truncated SVD of the kernel as an ``N × C·kh·kw`` matrix; the one
  method for 1×1 convs and ``nn.Linear`` layers; rank ``R`` channels per group.

For each method this module knows how to build the layer, what it costs in FLOPs (closed forms
that match ``FlopCounterMode``), and which ranks are worth offering to the budget allocator.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..factor.cp import CP_MAX_ITER, CP_TOL, cp_max_rank, cp_weight, cp_weights_for_ranks
from ..factor.lowrank import lowrank_max_rank, lowrank_weight
from ..factor.nd import decouple_weight, max_rank, rank_for_energy
from ..factor.tucker import tucker2_weight, tucker_max_ranks, tucker_ranks, tucker_ranks_for_energy
from ..nn.decoupled import DecoupledConv2d
from ..nn.factorized import CPConv2d, FactorizedConv2d, TuckerConv2d
from ..nn.flops import factored_flops
from ..nn.geometry import geometry_of, kernel_of
from ..nn.lowrank import LowRankConv2d, LowRankLinear

METHODS = ("nd", "cp", "tucker", "svd")
FACTORED_LAYERS = (DecoupledConv2d, FactorizedConv2d, LowRankLinear)
SVD_LEVELS = 16  # svd ranks offered to a budget: this many evenly spaced up to the cheapest cost


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    return method


def layer_method(layer: nn.Module) -> str:
    """``"nd"``, ``"cp"``, ``"tucker"`` or ``"svd"`` for a factored layer."""
    return "nd" if isinstance(layer, DecoupledConv2d) else layer.method


@dataclass
class Factored:
    """A conv replaced by ``layer``, with how far the kernel moved."""

    layer: nn.Module
    rank: int  # nd: T; cp: R; tucker: max(R_out, R_in)
    rank_text: str  # how the table shows it, e.g. "3/9", "R=40", "16x8"
    rel_error: float
    energy: float  # fraction of the kernel's squared norm the approximation reproduces
    how: str  # why this rank
    converged: bool | None = None
    iterations: int | None = None
    max_rank: int | None = None  # nd: the slice rank, where decoupling is exact


@dataclass(frozen=True)
class FactorOptions:
    """Settings of the iterative methods (CP-ALS; Tucker's HOOI takes only the seed)."""

    cp_max_iter: int = CP_MAX_ITER
    cp_tol: float = CP_TOL
    seed: int = 0


def factor_conv(
    conv: nn.Conv2d,
    method: str,
    rank: int | None,
    energy: float | None,
    order: str = "dw-pw",
    options: FactorOptions | None = None,
) -> Factored:
    """Factor ``conv`` by ``method`` at a fixed ``rank`` or an ``energy`` threshold."""
    check_method(method)
    options = options or FactorOptions()
    if method == "svd":
        return _svd_factored(conv, rank, energy)
    if method == "nd":
        full = decouple_weight(conv.weight, None, order, conv.groups)
        t, how = _spectral_rank(full.singular_values, full.max_rank, rank, energy, "T")
        dec = full.truncated(t)
        layer = DecoupledConv2d.from_decoupling(conv, dec)
        kept = float(full.layer_energy()[t - 1])
        text = f"{t}/{full.max_rank}"
        return Factored(layer, t, text, dec.relative_error(), kept, how, max_rank=full.max_rank)
    if method == "tucker":
        shape = tuple(conv.weight.shape)
        if energy is not None:
            ranks = tucker_ranks_for_energy(conv.weight, conv.groups, energy)
            how = f"energy {energy:g} per mode -> ranks {ranks[0]}x{ranks[1]}"
        else:
            ranks = tucker_ranks(shape, conv.groups, rank)
            how = f"rank {rank}" + (
                f" clipped to {ranks[0]}x{ranks[1]}" if max(ranks) < rank else ""
            )
        factors = tucker2_weight(conv.weight, ranks, conv.groups, options.seed)
        layer = TuckerConv2d.from_factors(conv, factors)
        err = factors.relative_error(conv.weight)
        full = tucker_max_ranks(shape, conv.groups)
        text = f"{ranks[0]}x{ranks[1]}/{full[0]}x{full[1]}"
        return Factored(layer, max(ranks), text, err, 1 - err**2, how)
    if energy is not None:
        raise ValueError(
            "CP has no closed-form energy rule (ALS is iterative): give it a rank or a FLOPs budget"
        )
    factors = cp_weight(
        conv.weight, rank, conv.groups, options.cp_max_iter, options.cp_tol, options.seed
    )
    return _cp_factored(conv, rank, factors)


def _spectral_rank(spectra, top: int, rank, energy, letter: str) -> tuple[int, str]:
    """The rank an SVD-based method (nd, svd) keeps for ``rank`` or ``energy``, and why."""
    if energy is not None:
        r = rank_for_energy(spectra, energy)
        return r, f"energy {energy:g} -> {letter}={r}"
    r = min(rank, top)
    return r, f"rank {rank}" + (f" clipped to full rank {r}" if rank > r else "")


def full_svd(layer: nn.Module):
    """Every singular triplet of a conv or linear layer's kernel (:func:`lowrank_weight`)."""
    return lowrank_weight(kernel_of(layer), None, geometry_of(layer).groups)


def _svd_factored(layer: nn.Module, rank: int | None, energy: float | None, full=None) -> Factored:
    """The truncated SVD of a conv or linear layer at ``rank`` or ``energy`` (from ``full``, its
    whole SVD, when given)."""
    full = full if full is not None else full_svd(layer)
    r, how = _spectral_rank(full.singular_values, full.max_rank, rank, energy, "R")
    kept = float(full.layer_energy()[r - 1])
    cls = LowRankLinear if isinstance(layer, nn.Linear) else LowRankConv2d
    new = cls.from_factors(layer, full.truncated(r))
    text = f"{r}/{full.max_rank}"
    return Factored(new, r, text, max(0.0, 1 - kept) ** 0.5, kept, how, max_rank=full.max_rank)


def _cp_factored(conv: nn.Conv2d, rank: int, factors) -> Factored:
    """The CP layer of ``factors`` (asked for at ``rank``), with how far the kernel moved."""
    layer = CPConv2d.from_factors(conv, factors)
    err = factors.relative_error(conv.weight)
    r = factors.rank
    how = f"rank {rank}" + (f" clipped to {r}" if r < rank else "")
    how += "" if factors.converged else " (CP-ALS did not converge)"
    return Factored(
        layer, r, f"R={r}", err, 1 - err**2, how, factors.converged, max(factors.iterations)
    )


def empty_layer(
    conv: nn.Conv2d, method: str, rank, order: str = "dw-pw", spatial: str = "separable"
) -> nn.Module:
    """An uninitialised factored layer with ``conv``'s geometry (to load a ``state_dict``);
    ``spatial``: a CP layer's kernels (:data:`~decouple.nn.factorized.CP_SPATIAL`)."""
    check_method(method)
    if method == "nd":
        return DecoupledConv2d.empty_like(conv, rank, order)
    if method == "svd":
        cls = LowRankLinear if isinstance(conv, nn.Linear) else LowRankConv2d
        return cls.empty_like(conv, rank)
    if method == "cp":
        return CPConv2d.empty_like(conv, rank, spatial=spatial)
    return TuckerConv2d.empty_like(conv, rank)


def recipe_entry(layer: nn.Module) -> dict:
    """What a recipe stores to rebuild ``layer`` empty."""
    method = layer_method(layer)
    if method == "nd":
        entry = {"method": "nd", "rank": layer.rank, "order": layer.order}
        if layer.realization != "grouped":  # same weights; the faster graph for its runtime
            entry["realization"] = layer.realization
        return entry
    if method == "cp" and layer.spatial == "full":
        return {"method": "cp", "rank": layer.rank, "realization": "square", "spatial": "full"}
    if method == "cp" and layer.realization != "separable":
        return {"method": "cp", "rank": layer.rank, "realization": layer.realization}
    if method in ("cp", "svd"):
        return {"method": method, "rank": layer.rank}
    return {"method": "tucker", "ranks": list(layer.ranks)}


def candidate_ranks(
    conv: nn.Conv2d, method: str, order: str, in_hw, out_hw, max_cost: float, multiple: int = 1
):
    """Ranks the allocator may choose for ``conv``: ``[(rank, flops), …]``, each ``<= max_cost``.

    nd offers every ``T``; Tucker every useful ``r`` on a grid of about 16 cost levels; CP (whose
    ALS is the expensive part) ranks at 8 cost levels, 10 % to 90 % of ``max_cost``; svd (one
    SVD prices every rank) :data:`SVD_LEVELS` ranks evenly spaced up to ``max_cost``. With
    ``multiple`` > 1, CP, Tucker and svd ranks are rounded to the nearest multiple of it that
    the grid's top allows (Tucker clips a rank to each mode's size, which is the layer's own
    channel count), duplicates dropped.
    """
    geometry = geometry_of(conv)
    if method == "svd":
        unit = factored_flops(geometry, method, order, 1, in_hw, out_hw)
        top = min(int(max_cost // unit), lowrank_max_rank(tuple(kernel_of(conv).shape),
                                                          geometry.groups))  # fmt: skip
        ranks = {max(1, round(top * i / SVD_LEVELS)) for i in range(1, SVD_LEVELS + 1)}
        ranks = sorted(_aligned(ranks, multiple, top))
        return [(r, f) for r in ranks if top >= 1 and (f := r * unit) <= max_cost]
    if method == "nd":
        top = max_rank(tuple(conv.weight.shape), order, conv.groups)  # no SVD needed
        ranks = range(1, top + 1)
    elif method == "tucker":
        top = max(tucker_max_ranks(tuple(conv.weight.shape), conv.groups))
        costs = {
            r: factored_flops(conv, method, order, r, in_hw, out_hw) for r in range(1, top + 1)
        }
        levels = torch.linspace(0.05, 1.0, 16).tolist()
        ranks = sorted(
            {max((r for r, f in costs.items() if f <= lv * max_cost), default=0) for lv in levels}
            - {0}
        )
    else:
        unit = factored_flops(conv, method, order, 1, in_hw, out_hw)
        top = min(int(max_cost // unit), cp_max_rank(tuple(conv.weight.shape), conv.groups))
        levels = (0.1, 0.2, 0.3, 0.4, 0.5, 0.65, 0.8, 0.9)
        ranks = sorted({max(1, int(lv * top)) for lv in levels}) if top >= 1 else []
    if method != "nd":
        ranks = sorted(_aligned(ranks, multiple, top))
    out = []
    for r in ranks:
        f = factored_flops(conv, method, order, r, in_hw, out_hw)
        if f <= max_cost:
            out.append((r, f))
    return out


def _aligned(ranks, multiple: int, top: int) -> set[int]:
    """Each rank rounded to the nearest multiple of ``multiple`` that is at most ``top`` (none
    when ``top`` is below ``multiple``)."""
    if multiple <= 1:
        return set(ranks)
    highest = top // multiple * multiple
    return {min(max(multiple, multiple * round(r / multiple)), highest) for r in ranks} - {0}


def is_factored(module: nn.Module) -> bool:
    return isinstance(module, FACTORED_LAYERS)


class FactorCache:
    """Memo of :func:`factor_conv` keyed by the conv's contents, so that a rank the budget
    allocator already computed (CP-ALS is slow) is not computed again, even on a copy of the
    model. Hits return a fresh deep copy of the layer."""

    def __init__(self) -> None:
        self._memo: dict = {}
        self._svd: dict = {}  # one whole SVD per layer serves every rank

    @staticmethod
    def _fingerprint(conv: nn.Module) -> str:
        h = hashlib.sha1()
        for t in (conv.weight, conv.bias):
            if t is not None:
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
        g = geometry_of(conv)
        geometry = (type(conv).__name__, g.stride, g.padding, g.dilation, g.groups, g.padding_mode)
        h.update(repr((tuple(conv.weight.shape), str(conv.weight.dtype), geometry)).encode())
        return h.hexdigest()

    def _key(self, conv, method, rank, energy, order, options):
        return (
            self._fingerprint(conv),
            method,
            rank,
            energy,
            order if method == "nd" else "",
            options,
        )

    def prefetch(self, conv, method: str, ranks: list[int], options=None) -> None:
        """Compute ``conv``'s factorizations at every rank in ``ranks`` at once (CP-ALS warm-starts
        each rank from the last), for :meth:`factor` to return."""
        options = options or FactorOptions()
        todo = [r for r in ranks if self._key(conv, method, r, None, "", options) not in self._memo]
        if method != "cp" or len(todo) < 2:
            return
        for r, factors in cp_weights_for_ranks(
            conv.weight, todo, conv.groups, options.cp_max_iter, options.cp_tol, options.seed
        ).items():
            self._memo[self._key(conv, method, r, None, "", options)] = _cp_factored(
                conv, r, factors
            )

    def full_svd(self, layer: nn.Module):
        """:func:`full_svd` of ``layer``, computed once (pricing and factoring share it)."""
        key = self._fingerprint(layer)
        if key not in self._svd:
            self._svd[key] = full_svd(layer)
        return self._svd[key]

    def factor(self, conv, method, rank, energy, order="dw-pw", options=None) -> Factored:
        options = options or FactorOptions()
        key = self._key(conv, method, rank, energy, order, options)
        if key not in self._memo and method == "svd":
            self._memo[key] = _svd_factored(conv, rank, energy, self.full_svd(conv))
        elif key not in self._memo:
            self._memo[key] = factor_conv(conv, method, rank, energy, order, options)
        hit = self._memo[key]
        # the fingerprint ignores the device: a hit computed for a copy elsewhere moves to conv's
        return replace(hit, layer=copy.deepcopy(hit.layer).to(conv.weight.device))

    def __len__(self) -> int:
        return len(self._memo)

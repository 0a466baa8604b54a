"""Configuration of a decoupling run: small frozen dataclasses that validate themselves.

A config says how to choose ``T`` for each layer (a fixed rank, or an energy threshold), which order
to use, whether to fold BatchNorm first, and per-layer overrides keyed by an exact module name or a
regular expression (``re.fullmatch``). Configs round-trip through JSON.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ..factor.cp import CP_MAX_ITER
from ..factor.nd import ORDERS
from .methods import METHODS, FactorOptions, check_method


def _check_rank(rank: Any, what: str = "rank", low: int = 1) -> None:
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < low):
        raise ValueError(f"{what} must be an integer >= {low}; got {rank!r}")


def _check_energy(energy: Any) -> None:
    if energy is None:
        return
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be a number in (0, 1]; got {energy!r}")


AUTO = "auto"  # every method priced per layer; a budget chooses (decouple.plan)


def _check_method(method: Any, energy: Any, rank: Any = None) -> None:
    if method is not None and method != AUTO:
        try:
            check_method(method)
        except ValueError:
            raise ValueError(
                f"method must be one of {', '.join(METHODS)} or {AUTO}; got {method!r}"
            ) from None
    if method == "cp" and energy is not None:
        raise ValueError("CP takes a rank, not an energy (ALS has no closed-form energy rule)")
    if method == AUTO and (rank is not None or energy is not None):
        raise ValueError(
            "method 'auto' chooses each layer's method and rank under a budget (target FLOPs, "
            "target latency or max change); it takes no fixed rank or energy"
        )


def _check_order(order: Any) -> None:
    if order is not None and order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}; got {order!r}")


@dataclass(frozen=True)
class LayerSpec:
    """What to do with one layer: its own method, rank or energy, order, or ``skip``.

    Fields left ``None`` fall back to the :class:`DecoupleConfig` defaults.
    """

    rank: int | None = None
    energy: float | None = None
    order: str | None = None
    skip: bool = False
    method: str | None = None

    def __post_init__(self) -> None:
        _check_rank(self.rank)
        _check_energy(self.energy)
        _check_order(self.order)
        _check_method(self.method, self.energy, self.rank)
        if self.rank is not None and self.energy is not None:
            raise ValueError("give a layer either rank or energy, not both")
        if self.skip and (self.rank or self.energy or self.order or self.method):
            raise ValueError("a skipped layer takes no rank, energy, order or method")

    @classmethod
    def coerce(cls, value: Any) -> LayerSpec:
        """Accept the short forms: ``"skip"``, an int rank, a float energy, or a dict."""
        if isinstance(value, LayerSpec):
            return value
        if value == "skip":
            return cls(skip=True)
        if isinstance(value, bool):
            raise ValueError(
                f"a layer override must be 'skip', a rank, an energy or a dict; got {value!r}"
            )
        if isinstance(value, int):
            return cls(rank=value)
        if isinstance(value, float):
            return cls(energy=value)
        if isinstance(value, dict):
            unknown = set(value) - {"rank", "energy", "order", "skip", "method"}
            if unknown:
                raise ValueError(
                    f"unknown layer override keys {sorted(unknown)}; "
                    "allowed: rank, energy, order, method, skip"
                )
            return cls(**value)
        raise ValueError(
            f"a layer override must be 'skip', a rank, an energy or a dict; got {value!r}"
        )

    def to_json_value(self) -> Any:
        if self.skip:
            return "skip"
        return {k: v for k, v in asdict(self).items() if v is not None and k != "skip"}


@dataclass(frozen=True)
class DecoupleConfig:
    """How :func:`decouple.decouple_` rewrites a model.

    Parameters
    ----------
    rank : int, optional
        Fixed number of terms ``T`` for every layer (clipped to each layer's full rank).
    energy : float, optional
        Instead of ``rank``: per layer, the smallest ``T`` keeping this fraction of the kernel's
        squared Frobenius norm (singular-value energy), in ``(0, 1]``.
    order : {"dw-pw", "pw-dw"}
        Default order of the two convs (network decoupling only).
    fold_bn : bool
        Fold each BatchNorm into the conv that feeds only it, before decoupling (inference only:
        the running statistics are baked in).
    overrides : mapping of str to LayerSpec (or its short forms)
        Keys are exact module names or regular expressions matched with ``re.fullmatch``; an exact
        name wins, then the first matching pattern in order. Values: ``"skip"``, an int rank, a
        float energy, a dict with ``rank``/``energy``/``order``/``method``, or a :class:`LayerSpec`.
    method : {"nd", "cp", "tucker", "auto"}
        Network decoupling (default), CP (rank ``R`` terms per group) or Tucker-2 (rank ``r`` for
        both channel modes, clipped to each mode's size). CP takes no ``energy``. ``auto``: a
        budget (:mod:`decouple.plan`) prices every method per layer and chooses; no rank/energy.
    cp_max_iter : int
        CP-ALS sweeps at most (a layer that stops here is reported as not converged).
    seed : int
        Seed of the iterative decompositions (CP, Tucker), so runs repeat.

    Layers matched by no override when neither ``rank`` nor ``energy`` is set are left as they are,
    so a mapping of names to ranks alone is a complete per-layer config.
    """

    rank: int | None = None
    energy: float | None = None
    order: str = "dw-pw"
    fold_bn: bool = False
    overrides: Any = field(default_factory=tuple)
    method: str = "nd"
    cp_max_iter: int = CP_MAX_ITER
    seed: int = 0

    def __post_init__(self) -> None:
        _check_rank(self.rank)
        _check_energy(self.energy)
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}; got {self.order!r}")
        _check_method(self.method, self.energy, self.rank)
        if self.rank is not None and self.energy is not None:
            raise ValueError("give either rank or energy, not both")
        _check_rank(self.cp_max_iter, "cp_max_iter")
        _check_rank(self.seed, "seed", low=0)
        if not isinstance(self.fold_bn, bool):
            raise ValueError(f"fold_bn must be a bool; got {self.fold_bn!r}")
        items = self.overrides.items() if isinstance(self.overrides, dict) else self.overrides
        pairs = []
        for key, value in items:
            if not isinstance(key, str) or not key:
                raise ValueError(f"override keys must be non-empty strings; got {key!r}")
            try:
                re.compile(key)
            except re.error as e:
                raise ValueError(
                    f"override {key!r} is neither a plain name nor a valid regex: {e}"
                ) from None
            pairs.append((key, LayerSpec.coerce(value)))
        # Stored as a tuple of pairs so the config stays hashable and ordered.
        object.__setattr__(self, "overrides", tuple(pairs))

    def factor_options(self) -> FactorOptions:
        """Settings of the iterative decompositions (CP-ALS, Tucker's HOOI)."""
        return FactorOptions(cp_max_iter=self.cp_max_iter, seed=self.seed)

    def spec_for(self, name: str) -> LayerSpec | None:
        """The override for module ``name``: exact name first, then the first regex that matches."""
        for key, spec in self.overrides:
            if key == name:
                return spec
        for key, spec in self.overrides:
            if re.fullmatch(key, name):
                return spec
        return None

    def resolve(self, name: str) -> LayerSpec:
        """Effective settings for layer ``name`` (``skip=True`` when nothing applies)."""
        spec = self.spec_for(name)
        if spec is not None and spec.skip:
            return spec
        order = (spec.order if spec and spec.order else None) or self.order
        method = (spec.method if spec and spec.method else None) or self.method
        if spec and (spec.rank is not None or spec.energy is not None):
            return LayerSpec(rank=spec.rank, energy=spec.energy, order=order, method=method)
        if self.rank is None and self.energy is None:
            return LayerSpec(skip=True)
        return LayerSpec(rank=self.rank, energy=self.energy, order=order, method=method)

    def to_dict(self) -> dict:
        return {
            "rank": self.rank,
            "energy": self.energy,
            "order": self.order,
            "fold_bn": self.fold_bn,
            "overrides": {k: v.to_json_value() for k, v in self.overrides},
            "method": self.method,
            "cp_max_iter": self.cp_max_iter,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, data: dict) -> DecoupleConfig:
        unknown = set(data) - {
            "rank", "energy", "order", "fold_bn", "overrides", "method", "cp_max_iter", "seed"
        }  # fmt: skip
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> DecoupleConfig:
        return cls.from_dict(json.loads(text))

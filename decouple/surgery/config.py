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
from ..nn.guards import show, type_error
from .checks import (
    AUTO,
    MAX_CP_ITER,
    MAX_SEED,
    check_bool,
    check_config_method,
    check_energy,
    check_int,
    check_keys,
    check_order,
    check_pattern,
    check_rank,
)
from .methods import FactorOptions

__all__ = ["AUTO", "CONFIG_KEYS", "STEM_MAX_CHANNELS", "DecoupleConfig", "LayerSpec"]

SPEC_KEYS = ("rank", "energy", "order", "method", "skip")
CONFIG_KEYS = (
    "rank",
    "energy",
    "order",
    "fold_bn",
    "overrides",
    "method",
    "cp_max_iter",
    "seed",
    "include_stem",
    "rank_multiple",
)
# A conv reading at most this many channels is a stem (RGB, grey, RGBA): decoupling it at the
# global T wrecks it (a 7x7 stem keeps 2 of 49 terms) and saves little, so it is kept by default.
STEM_MAX_CHANNELS = 4
MAX_RANK_MULTIPLE = 1024  # no blocked layout is wider; a larger multiple is a typo
_SHORT_FORMS = "'skip', an int rank, a float energy or a dict"


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
        check_rank(self.rank)
        check_energy(self.energy)
        check_order(self.order)
        check_config_method(self.method, self.energy, self.rank)
        check_bool(self.skip, "skip")
        if self.rank is not None and self.energy is not None:
            raise ValueError("give a layer either rank or energy, not both")
        if self.skip and any(
            v is not None for v in (self.rank, self.energy, self.order, self.method)
        ):
            raise ValueError("a skipped layer takes no rank, energy, order or method")

    @classmethod
    def coerce(cls, value: Any) -> LayerSpec:
        """Accept the short forms: ``"skip"``, an int rank, a float energy, or a dict."""
        if isinstance(value, LayerSpec):
            return value
        if isinstance(value, str):
            if value != "skip":
                raise ValueError(f"a layer override must be {_SHORT_FORMS}; got {show(value)}")
            return cls(skip=True)
        if isinstance(value, bool):
            raise type_error("a layer override", _SHORT_FORMS, value)
        if isinstance(value, int):
            return cls(rank=value)
        if isinstance(value, float):
            return cls(energy=value)
        if isinstance(value, dict):
            check_keys(value, SPEC_KEYS, "layer override")
            return cls(**value)
        raise type_error("a layer override", _SHORT_FORMS, value)

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
        Fold each BatchNorm into the conv that feeds only it, before decoupling (default True, as
        the CLI: the folded kernel is what runs, so it is what should be approximated). Inference
        only: the running statistics are baked in, so put the model in eval mode first.
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
    include_stem : bool
        Decouple stem convs too. By default (False) a conv with at most
        :data:`STEM_MAX_CHANNELS` input channels is kept (``"kept: stem ..."``) unless an
        override gives it a rank, energy or method: at the global ``T`` it loses most of its
        kernel (a 7×7 stem keeps 2 of 49 terms) for a small saving.
    rank_multiple : int
        Under a budget, CP, Tucker and svd ranks and pruned widths are offered in multiples of
        this only (each rank of the planner's grid rounded to the nearest multiple), so that
        every channel count a plan makes suits the runtimes' blocked layouts (ONNX Runtime's
        NCHWc: ``results/aligned_ranks.md``). 1 (default): any rank. Fixed ranks (``rank``,
        overrides) are taken as given.

    Layers matched by no override when neither ``rank`` nor ``energy`` is set are left as they are,
    so a mapping of names to ranks alone is a complete per-layer config.
    """

    rank: int | None = None
    energy: float | None = None
    order: str = "dw-pw"
    fold_bn: bool = True
    overrides: Any = field(default_factory=tuple)
    method: str = "nd"
    cp_max_iter: int = CP_MAX_ITER
    seed: int = 0
    include_stem: bool = False
    rank_multiple: int = 1

    def __post_init__(self) -> None:
        check_rank(self.rank)
        check_energy(self.energy)
        if self.order is None:  # a config always has an order; a layer may leave it to the config
            raise type_error("order", f"one of {', '.join(ORDERS)}", self.order)
        check_order(self.order)
        check_config_method(self.method, self.energy, self.rank)
        if self.method is None:
            raise type_error("method", "a method name", self.method)
        if self.rank is not None and self.energy is not None:
            raise ValueError("give either rank or energy, not both")
        check_int(self.cp_max_iter, "cp_max_iter", 1, MAX_CP_ITER)
        check_int(self.seed, "seed", 0, MAX_SEED)
        check_bool(self.fold_bn, "fold_bn")
        check_bool(self.include_stem, "include_stem")
        check_int(self.rank_multiple, "rank_multiple", 1, MAX_RANK_MULTIPLE)
        # Stored as a tuple of pairs so the config stays hashable and ordered.
        object.__setattr__(self, "overrides", _override_pairs(self.overrides))

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

    def names_layer(self, name: str) -> bool:
        """Whether an override gives layer ``name`` its own rank, energy or method (not a skip)."""
        spec = self.spec_for(name)
        return (
            spec is not None
            and not spec.skip
            and (spec.rank is not None or spec.energy is not None or spec.method is not None)
        )

    def keeps_stem(self, name: str, in_channels: int) -> bool:
        """Whether layer ``name`` reading ``in_channels`` channels is a stem this config keeps:
        ``include_stem`` is off, it reads at most :data:`STEM_MAX_CHANNELS` channels, and no
        override names it with a rank, energy or method."""
        if self.include_stem or in_channels > STEM_MAX_CHANNELS:
            return False
        return not self.names_layer(name)

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
            "include_stem": self.include_stem,
            "rank_multiple": self.rank_multiple,
        }

    @classmethod
    def from_dict(cls, data: dict) -> DecoupleConfig:
        """The config of a dict such as :meth:`to_dict` writes (untrusted: every field checked)."""
        if not isinstance(data, dict):
            raise type_error("a config", "a dict (a JSON object)", data)
        check_keys(data, CONFIG_KEYS, "config")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str | bytes) -> DecoupleConfig:
        if not isinstance(text, (str, bytes, bytearray)):
            raise type_error("a JSON config", "a str", text)
        try:
            data = json.loads(text)
        except RecursionError:  # '[' * 100000: nested deeper than the parser recurses
            raise ValueError("the JSON config is nested too deeply") from None
        return cls.from_dict(data)


def _override_pairs(overrides: Any) -> tuple[tuple[str, LayerSpec], ...]:
    """``overrides`` (a dict, or pairs of key and rule) as checked ``(key, LayerSpec)`` pairs."""
    if isinstance(overrides, dict):
        items = list(overrides.items())
    elif isinstance(overrides, (list, tuple)):
        items = list(overrides)
        for item in items:
            if not (isinstance(item, (list, tuple)) and len(item) == 2):
                raise type_error("each override", "a (name, rule) pair", item)
    else:
        raise type_error("overrides", "a dict of name -> rule", overrides)
    pairs = []
    for key, value in items:
        check_pattern(key)
        pairs.append((key, LayerSpec.coerce(value)))
    return tuple(pairs)

"""How images are prepared for a model: resize the short side, centre crop, scale, normalise.

The default comes from the architecture: a torchvision model's default weights enum carries its
``transforms()`` (resize, crop, mean, std) without downloading anything; a model of our own zoo
carries its mean and std in the registry (its images come at the right size). Every part can be
overridden (``--resize``, ``--crop``, ``--mean``, ``--std``). The pipeline is torchvision's
``transforms.v2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..models import get_model_info


@dataclass(frozen=True)
class Preprocess:
    """``resize`` the short side to this many pixels, ``crop`` the centre square, then pixels in
    [0, 1] and ``(x − mean) / std`` per channel. ``None`` leaves that step out."""

    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for what in ("resize", "crop"):
            v = getattr(self, what)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{what} must be a positive number of pixels; got {v!r}")
        for what in ("mean", "std"):
            v = getattr(self, what)
            if v is not None and (
                not isinstance(v, tuple)
                or not v
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
            ):
                raise ValueError(f"{what} must be a tuple of one number per channel; got {v!r}")
            if v is not None and not all(math.isfinite(x) for x in v):
                raise ValueError(f"{what} must be finite numbers; got {v!r}")
        # A std near 0 would blow pixels up by orders of magnitude: surely a typo.
        if self.std is not None and any(s < 1e-6 for s in self.std):
            raise ValueError(f"std must be positive (at least 1e-6); got {self.std!r}")
        lengths = {len(self.mean or ()), len(self.std or ())} - {0, 1}
        if len(lengths) > 1:
            raise ValueError(f"mean and std differ in length: {self.mean!r} and {self.std!r}")

    def check_channels(self, channels: int) -> None:
        """Raise ValueError unless ``mean`` and ``std`` have one value, or one per channel."""
        for what in ("mean", "std"):
            v = getattr(self, what)
            if v is not None and len(v) not in (1, channels):
                raise ValueError(
                    f"{what} has {len(v)} values but the model takes {channels} channels "
                    f"(give 1 or {channels})"
                )

    def with_overrides(self, **kwargs) -> Preprocess:
        """This preprocessing with every given (not ``None``) part replaced."""
        return replace(self, **{k: v for k, v in kwargs.items() if v is not None})

    def transform(self):
        """The ``transforms.v2`` pipeline: a PIL image or uint8 tensor in, a float tensor out."""
        from torchvision.transforms import v2

        steps = [v2.ToImage()]
        if self.resize is not None:
            steps.append(v2.Resize(self.resize, antialias=True))
        if self.crop is not None:
            steps.append(v2.CenterCrop(self.crop))
        steps.append(v2.ToDtype(torch.float32, scale=True))
        if self.mean is not None or self.std is not None:
            channels = len(self.mean or self.std)
            steps.append(
                v2.Normalize(
                    list(self.mean or (0.0,) * channels), list(self.std or (1.0,) * channels)
                )
            )
        return v2.Compose(steps)

    def to_dict(self) -> dict:
        return {"resize": self.resize, "crop": self.crop, "mean": self.mean, "std": self.std}


def default_preprocess(arch: str | None) -> Preprocess:
    """The preprocessing ``arch`` was trained with, as far as we know it (else none)."""
    if arch is None:
        return Preprocess()
    try:
        meta = get_model_info(arch).meta
        return Preprocess(mean=_tuple(meta.get("mean")), std=_tuple(meta.get("std")))
    except KeyError:
        pass
    try:
        from torchvision.models import get_model_weights
    except ImportError:
        return Preprocess()
    try:
        weights = get_model_weights(arch).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return Preprocess()
    t = weights.transforms()
    size = lambda v: None if v is None else int(v[0] if isinstance(v, (list, tuple)) else v)  # noqa: E731
    return Preprocess(
        resize=size(getattr(t, "resize_size", None)),
        crop=size(getattr(t, "crop_size", None)),
        mean=_tuple(getattr(t, "mean", None)),
        std=_tuple(getattr(t, "std", None)),
    )


def _tuple(v) -> tuple[float, ...] | None:
    return None if v is None else tuple(float(x) for x in v)

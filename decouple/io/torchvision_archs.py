"""torchvision architectures for ``--arch NAME``: built without downloading anything, and the
input shape of each family, with where it came from.

A builder gets ``None`` for every ``weights*`` parameter its signature has (``weights``, and
``weights_backbone`` for detection and segmentation, whose default is a pretrained backbone that
would be downloaded) and ``quantize=False`` where it takes one: the file's own weights replace
them all. The shapes come from the weights enums' ``transforms()`` and ``meta``, which are known
without downloading, or from the built model itself.
"""

from __future__ import annotations

import inspect

from torch import nn

from ..models import get_model_info

# The classification crop when no weights enum says (torchvision's usual ImageNet crop).
CLASSIFICATION_SIZE = 224
SEGMENTATION_SIZE = 520  # the resize of every torchvision segmentation weights' transforms
DETECTION_SIZE = 800  # GeneralizedRCNNTransform's usual min_size

# Families by the subpackage that registers them; the rest (torchvision.models) classify.
FAMILIES = {
    "detection": "detection",
    "segmentation": "segmentation",
    "video": "video",
    "optical_flow": "optical flow",
    "quantization": "classification",
}
UNSUPPORTED = {
    "video": "a torchvision video model: it takes clips (C,T,H,W) and its convolutions are 3-D "
    "(nn.Conv3d), while decouple runs a model on images (C,H,W) and decouples nn.Conv2d",
    "optical flow": "a torchvision optical-flow model: its forward takes two images, and "
    "decouple runs a model on one input tensor",
}


def torchvision_family(arch: str | None) -> str | None:
    """``"classification"``, ``"detection"``, ``"segmentation"``, ``"video"`` or
    ``"optical flow"`` for a torchvision model name; None for any other name (or no
    torchvision)."""
    if not arch or ":" in arch:
        return None
    try:
        get_model_info(arch)
        return None  # decouple's own (build_arch looks there first)
    except KeyError:
        pass
    try:
        import torchvision.models as tvm
    except ImportError:
        return None
    if arch not in tvm.list_models():
        return None
    for sub, family in FAMILIES.items():
        if arch in tvm.list_models(getattr(tvm, sub)):
            return family
    return "classification"


def builder_kwargs(builder) -> dict[str, object]:
    """What ``builder`` is called with so that it downloads nothing, read off its signature."""
    params = inspect.signature(builder).parameters
    kwargs: dict[str, object] = {p: None for p in params if p.split("_")[0] == "weights"}
    if "quantize" in params:  # a quantized model is built float: the weights are float too
        kwargs["quantize"] = False
    return kwargs


def build_torchvision(arch: str) -> nn.Module:
    """The torchvision model ``arch`` with fresh weights, never downloading any."""
    import torchvision.models as tvm

    builder = tvm.get_model_builder(arch)
    return builder(**builder_kwargs(builder))


def _default_weights(arch: str):
    from torchvision.models import get_model_weights

    try:
        return get_model_weights(arch).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return None


def _size(v) -> int | None:
    if isinstance(v, (list, tuple)):
        v = v[-1] if v else None
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def torchvision_input_shape(arch: str, model: nn.Module) -> tuple[tuple[int, ...] | None, str]:
    """One input's shape for the torchvision model ``arch`` built as ``model``, and where it
    came from; ``(None, why)`` for the families decouple cannot run (video, optical flow)."""
    family = torchvision_family(arch) or "classification"
    if family in UNSUPPORTED:
        return None, UNSUPPORTED[family]
    if family == "detection":
        # The model resizes every image itself: a square input of any size becomes this one.
        size = _size(getattr(getattr(model, "transform", None), "min_size", None))
        where = f"{type(model).__name__}'s own transform, which resizes every image to {size}"
        if size is None:
            size, where = DETECTION_SIZE, "torchvision's usual detection size"
        return (3, size, size), f"{where} (any input size does the same work)"
    weights = _default_weights(arch)
    t = weights.transforms() if weights is not None else None
    if family == "segmentation":
        size = _size(getattr(t, "resize_size", None))
        if size is None:
            return (3, SEGMENTATION_SIZE, SEGMENTATION_SIZE), "torchvision's segmentation size"
        return (3, size, size), f"the resize of {weights}'s transforms (the model takes any size)"
    size = _size(getattr(t, "crop_size", None))
    # A ViT takes its own image_size only; built without weights that is 224, whatever the crop.
    fixed = _size(getattr(model, "image_size", None))
    if fixed is not None and fixed != size:
        where = f"the image_size of {type(model).__name__} built with weights=None"
        return (3, fixed, fixed), where
    if size is None:
        return (3, CLASSIFICATION_SIZE, CLASSIFICATION_SIZE), "torchvision's usual ImageNet crop"
    return (3, size, size), f"the crop of {weights}'s transforms"

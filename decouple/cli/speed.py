"""The report's speed figures: measured latency (``--latency``) and the cost model's prediction,
both against the input model with the same BN folding, so that a speedup is the decoupling's."""

from __future__ import annotations

import copy


def baseline(original, config):
    """A copy of the input model with the same BN folding as the decoupled one."""
    from ..surgery.bn_fold import fold_batchnorm_

    model = copy.deepcopy(original)
    if config.fold_bn:
        fold_batchnorm_(model)
    return model


def measure_latency(original, model, config, shape, latency) -> dict:
    """Model latency before/after, side by side, against :func:`baseline`."""
    from ..runtime.latency import compare

    dev = latency.device
    example = latency.example(shape, next(model.parameters()).dtype)
    out = compare(baseline(original, config).to(dev), copy.deepcopy(model).to(dev), example,
                  latency)  # fmt: skip
    out["baseline"] = "the input model" + (" with BatchNorm folded" if config.fold_bn else "")
    return out


def predict_speed(original, model, config, shape, args) -> dict | None:
    """The cost model's predicted speedup against :func:`baseline`."""
    from ..predicted_speed import predict_speed as predict

    return predict(baseline(original, config), model, shape, args.runtime, args.batch,
                   args.threads)  # fmt: skip

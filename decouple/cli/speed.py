"""The report's speed figures: measured latency (``--latency``) and the cost model's prediction,
both against the input model with the same BN folding, so that a speedup is the decoupling's."""

from __future__ import annotations

import copy


def measure_latency(original, model, config, shape, latency) -> dict:
    """Model latency before/after, side by side; the baseline gets the same BN folding, so the
    speedup is the decoupling's alone."""
    from ..runtime.latency import compare
    from ..surgery.bn_fold import fold_batchnorm_

    baseline = copy.deepcopy(original)
    if config.fold_bn:
        fold_batchnorm_(baseline)
    dev = latency.device
    example = latency.example(shape, next(model.parameters()).dtype)
    out = compare(baseline.to(dev), copy.deepcopy(model).to(dev), example, latency)
    out["baseline"] = "the input model" + (" with BatchNorm folded" if config.fold_bn else "")
    return out


def predict_speed(original, model, config, shape, args) -> dict | None:
    """The cost model's predicted speedup, against the same BN-folded baseline as
    :func:`measure_latency`."""
    from ..predicted_speed import predict_speed as predict
    from ..surgery.bn_fold import fold_batchnorm_

    baseline = copy.deepcopy(original)
    if config.fold_bn:
        fold_batchnorm_(baseline)
    return predict(baseline, model, shape, args.runtime, args.batch, args.threads)

"""Calibration: second moments of conv input patches (:mod:`.moments`), the closed-form ridge
refits they feed (:mod:`.refit`), and ``calibrate_``, which refits every factored layer of a model
in forward order (:mod:`.layerwise`); a pruned head fit to the original's outputs, the one place
with gradient steps (:mod:`.head_distill`); without images, a bias correction from the model's
BatchNorm statistics (:mod:`.bn_bias`).

May import :mod:`decouple.factor`, :mod:`decouple.nn` and :mod:`decouple.surgery`.
"""

from .bn_bias import BiasCorrection, bn_input_means, correct_biases_
from .head_distill import HeadDistillation, distill_head_
from .layerwise import REFIT_MODES, CalibrationRecord, calibrate_
from .moments import Moments
from .refit import Factors, refit

__all__ = [
    "REFIT_MODES", "BiasCorrection", "CalibrationRecord", "Factors", "HeadDistillation", "Moments",
    "bn_input_means", "calibrate_", "correct_biases_", "distill_head_", "refit",
]  # fmt: skip

"""Calibration without a gradient step: second moments of conv input patches (:mod:`.moments`),
the closed-form ridge refits they feed (:mod:`.refit`), and ``calibrate_``, which refits every
factored layer of a model in forward order (:mod:`.layerwise`).

May import :mod:`decouple.factor`, :mod:`decouple.nn` and :mod:`decouple.surgery`.
"""

from .layerwise import REFIT_MODES, CalibrationRecord, calibrate_
from .moments import Moments
from .refit import Factors, refit

__all__ = ["REFIT_MODES", "CalibrationRecord", "Factors", "Moments", "calibrate_", "refit"]

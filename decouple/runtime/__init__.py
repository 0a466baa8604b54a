"""Where models run: measured latency (eager, channels-last, ONNX Runtime), the fastest exact
realization of each layer (or its original conv back), and export to ONNX and ``torch.export``,
each checked against PyTorch.

May import :mod:`decouple.factor`, :mod:`decouple.nn` and :mod:`decouple.surgery`.
"""

from .export import export_program, onnx_bytes, onnx_files
from .latency import RUNTIMES, Latency, LatencyConfig, compare, measure
from .onnx_check import check_onnx, ort_session
from .realize import RealizationChoice, choose_realizations_, confirm_on_model_

__all__ = [
    "RUNTIMES",
    "Latency",
    "LatencyConfig",
    "RealizationChoice",
    "check_onnx",
    "choose_realizations_",
    "compare",
    "confirm_on_model_",
    "export_program",
    "measure",
    "onnx_bytes",
    "onnx_files",
    "ort_session",
]

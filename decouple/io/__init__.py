"""Files and data: untrusted checkpoints loaded safely and ``--arch`` resolved, image sources,
evaluation, and output files written atomically.

May import :mod:`decouple.surgery` (recipes) and :mod:`decouple.models` (the zoo).
"""

from .checkpoint import load_decoupled, load_model, read_checkpoint
from .errors import InputError
from .evaluate import evaluate
from .images import ImageSet, load_images
from .outputs import write_files_atomically

__all__ = [
    "ImageSet",
    "InputError",
    "evaluate",
    "load_decoupled",
    "load_images",
    "load_model",
    "read_checkpoint",
    "write_files_atomically",
]

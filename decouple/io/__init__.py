"""Files and data: untrusted checkpoints loaded safely and ``--arch`` resolved, image sources,
evaluation, and output sets written as one transaction with a manifest.

May import :mod:`decouple.surgery` (recipes), :mod:`decouple.nn` (the undo log that keeps a
failed reload from half-changing a model) and :mod:`decouple.models` (the zoo).
"""

from .checkpoint import load_decoupled, load_model, read_checkpoint
from .errors import InputError
from .evaluate import evaluate
from .images import ImageSet, load_images
from .output_set import write_files_atomically
from .save import save_decoupled

__all__ = [
    "ImageSet",
    "InputError",
    "evaluate",
    "load_decoupled",
    "load_images",
    "load_model",
    "read_checkpoint",
    "save_decoupled",
    "write_files_atomically",
]

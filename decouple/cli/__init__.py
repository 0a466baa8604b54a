"""``python -m decouple``: the parser (:mod:`.parser`), flags turned into checked configs
(:mod:`.flags`), the images and input checks (:mod:`.inputs`) and the run itself (:mod:`.run`).

May import everything else in ``decouple``; nothing imports it but ``__main__``.
"""

from .parser import build_parser
from .run import main

__all__ = ["build_parser", "main"]

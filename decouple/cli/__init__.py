"""``python -m decouple``: the parser (:mod:`.parser`), flags turned into checked configs
(:mod:`.flags`), the images and input checks (:mod:`.inputs`), the checks of the loaded model
(:mod:`.model_checks`), the run itself (:mod:`.run`) and how it ends (:mod:`.exits`: exit
statuses, SIGTERM, ``--recover``). Only the parser loads at start: torch
comes in after the command line parses, so ``--help`` and typos answer at once.

May import everything else in ``decouple``; nothing imports it but ``__main__``.
"""

from .parser import build_parser
from .run import main

__all__ = ["build_parser", "main"]

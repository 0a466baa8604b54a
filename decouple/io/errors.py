"""The one exception for bad user input: its message is one line the CLI prints as it is."""

from __future__ import annotations


class InputError(ValueError):
    """A problem with the user's input, described in one line (a ``ValueError``, so callers that
    catch the usual exception for bad values catch it too)."""

"""The one exception for bad user input: its message is one line the CLI prints as it is."""

from __future__ import annotations


class InputError(Exception):
    """A problem with the user's input, described in one line."""

"""Error types of the engine.

Every problem with user input raises :class:`InputError` with one message that names the problem and
says how to fix it; callers (the command line, the Slicer module) show that message as it is.
"""
from __future__ import annotations


class DeepRegistrationError(Exception):
    """Base class of all errors raised on purpose by the engine."""


class InputError(DeepRegistrationError, ValueError):
    """An input (file, image, mask, option) cannot be used; the message says why and what to do."""


class Cancelled(DeepRegistrationError):
    """The progress callback asked to stop; nothing was written."""

"""Progress reporting with cancellation.

Long engine calls take ``progress: ProgressCallback | None``. The callback receives a fraction in
[0, 1] of the whole call and a short human-readable message; returning ``False`` asks the engine to
stop, which it does at the next check by raising :class:`~DeepRegistrationLib.core.errors.Cancelled`.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

from .errors import Cancelled

ProgressCallback = Callable[[float, str], Optional[bool]]
"""``callback(fraction, message) -> bool | None``; return ``False`` to cancel."""

logger = logging.getLogger(__name__)


class Progress:
    """Maps the progress of a sub-task onto a slice ``[start, end]`` of the caller's 0..1 range.

    Args:
        callback: The user's callback, or None for no reporting (cancellation is then impossible).
        start: Fraction of the whole call at which this sub-task starts.
        end: Fraction at which it ends.
    """

    def __init__(self, callback: ProgressCallback | None, start: float = 0.0, end: float = 1.0):
        self.callback = callback
        self.start = float(start)
        self.end = float(end)

    def __call__(self, fraction: float, message: str = "") -> None:
        """Reports ``fraction`` (0..1 of this sub-task); raises Cancelled when the callback says so."""
        if self.callback is None:
            return
        f = self.start + (self.end - self.start) * min(max(float(fraction), 0.0), 1.0)
        if self.callback(f, message) is False:
            logger.info("cancelled at %.0f%% (%s)", 100 * f, message)
            raise Cancelled(f"Registration cancelled by the user at {100 * f:.0f}% ({message}).")

    def sub(self, start: float, end: float) -> "Progress":
        """Returns a Progress for the part ``[start, end]`` (fractions of this sub-task)."""
        span = self.end - self.start
        return Progress(self.callback, self.start + span * start, self.start + span * end)

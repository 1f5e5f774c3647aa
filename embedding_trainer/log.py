"""The package logger: named, non-propagating, with no handler installed at import time beyond a NullHandler.

Applications (the CLI, the WebUI glue) attach their own handler; library code never prints. ``format_duration``
writes times the same way in every front end's messages.
"""

from __future__ import annotations

import logging
import math

logger = logging.getLogger("embedding_trainer")
logger.addHandler(logging.NullHandler())
logger.propagate = False


def format_duration(seconds: float, clock: bool = False) -> str:
    """``seconds`` for people: "45s", "3m05s", "2h07m" (the WebUI's progress text and results), or with ``clock``
    "0:45", "3:05", "2:07:05" (the command line's progress bar and summaries). An unknown time is "?"."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    if clock:
        whole = int(seconds)  # the command line has always cut to whole seconds
        hours, minutes, rest = whole // 3600, whole // 60 % 60, whole % 60
        return f"{hours}:{minutes:02d}:{rest:02d}" if hours else f"{minutes}:{rest:02d}"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, whole = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{whole:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"

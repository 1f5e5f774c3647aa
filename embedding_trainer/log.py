"""The package logger: named, non-propagating, with no handler installed at import time beyond a NullHandler.

Applications (the CLI, the WebUI glue) attach their own handler; library code never prints.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("embedding_trainer")
logger.addHandler(logging.NullHandler())
logger.propagate = False

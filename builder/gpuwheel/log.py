"""Logging and console output: one logger, one rich console on stderr.

Plain output when stderr is not a terminal (CI logs) and nothing but errors with --quiet.
"""

from __future__ import annotations

import logging
import os
import sys

from rich.console import Console

logger = logging.getLogger("gpuwheel")

# stderr, so that `--json` output on stdout stays machine-readable. Off a terminal (CI logs, pipes)
# rich would wrap at 80 columns; tables of env vars and paths read better unwrapped. No emoji codes:
# an image tag such as "base:x:1" is text.
console = Console(stderr=True, highlight=False, emoji=False,
                  width=None if sys.stderr.isatty() else int(os.environ.get("COLUMNS", 200)))


def configure(verbose: bool = False, quiet: bool = False) -> None:
    """Set the log level once, from the CLI's global flags or GPUWHEEL_LOG."""
    level = logging.DEBUG if verbose or os.environ.get("GPUWHEEL_LOG") == "debug" else (
        logging.ERROR if quiet else logging.WARNING)
    logging.basicConfig(level=level, format="gpuwheel: %(levelname)s: %(message)s")
    logger.setLevel(level)
    console.quiet = quiet

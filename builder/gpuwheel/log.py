"""Logging and console output: one logger; results on stdout (`out`), diagnostics on stderr (`console`).

Results are what a command reports (tables, verdicts, `--json`): they go to stdout, so that
`gpuwheel targets > file` or a pipe gets them. Progress, warnings, notes and the log go to stderr.
Plain output when a stream is not a terminal (CI logs), no colour with NO_COLOR (rich reads it),
and nothing on stderr but errors with --quiet.

The two consoles are made on first use: importing rich costs start-up time that `gpuwheel --help`
should not pay.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

    console: Console
    out: Console

logger = logging.getLogger("gpuwheel")
_quiet = False


def _make(stderr: bool) -> Console:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Off a terminal (CI logs, pipes) rich would wrap at 80 columns; tables of env vars and paths
    # read better unwrapped.
    width = None if stream.isatty() else int(os.environ.get("COLUMNS", 200))
    # No emoji codes: an image tag such as "base:x:1" is text.
    made = Console(stderr=stderr, highlight=False, emoji=False, width=width)
    if stderr:
        made.quiet = _quiet
    return made


def __getattr__(name: str):
    if name in ("console", "out"):
        made = _make(stderr=name == "console")
        globals()[name] = made
        return made
    raise AttributeError(name)


def configure(verbose: bool = False, quiet: bool = False) -> None:
    """Set the log level once, from the CLI's global flags or GPUWHEEL_LOG=debug."""
    global _quiet
    level = (
        logging.DEBUG
        if verbose or os.environ.get("GPUWHEEL_LOG") == "debug"
        else (logging.ERROR if quiet else logging.WARNING)
    )
    logging.basicConfig(level=level, format="gpuwheel: %(levelname)s: %(message)s")
    logger.setLevel(level)
    _quiet = quiet
    if "console" in globals():
        globals()["console"].quiet = quiet


# pip's lines, then uv's (which prints no per-package lines until it has resolved them all).
_PIP_MILESTONES = (
    "Collecting ",
    "Downloading ",
    "Installing collected packages",
    "Successfully installed",
    "Using CPython",
    "Creating virtual environment",
    "Resolved ",
    "Downloaded ",
    "Prepared ",
    "Installed ",
)


def pip_milestones(prefix: str):
    """An on_line callback for a long `pip install` or `uv pip install`: its milestones on stderr, so that minutes of
    downloading torch are not minutes of silence (the full output still goes to the log file)."""

    def show(line: str) -> None:
        text = line.strip()
        if text.startswith(_PIP_MILESTONES):
            shown = text if len(text) <= 160 else text[:157] + "..."
            stderr = globals().get("console") or __getattr__("console")
            stderr.print(f"{prefix}: {shown}", markup=False, highlight=False)

    return show


def say(text: str) -> None:
    """A line of progress on stderr, as written (no markup); silent under --quiet."""
    stderr = globals().get("console") or __getattr__("console")
    stderr.print(text, markup=False, highlight=False, soft_wrap=True)

"""Bounds on what untrusted inputs may make gpuwheel do: archives it extracts, compiler jobs.

Recipes, sdists and indexes come from other people (docs/security.md). Without a bound, a small
archive can expand until the disk is full, and a recipe's `jobs = 10**12` reaches the compiler.
The extraction bounds are generous for real sources (vLLM's sdist: ~40 MB and ~6,000 files
extracted) and can be raised per run: GPUWHEEL_MAX_EXTRACT_BYTES, GPUWHEEL_MAX_EXTRACT_MEMBERS.

Imported by the CLI at start-up: nothing here may import more than the standard library.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

# More compiler jobs than this is a typo or an attack, not a machine: the largest hosts have a few
# hundred cores, and every job of nvcc needs gigabytes.
MAX_JOBS = 1024

_BYTES_VARIABLE, _MEMBERS_VARIABLE = "GPUWHEEL_MAX_EXTRACT_BYTES", "GPUWHEEL_MAX_EXTRACT_MEMBERS"
_DEFAULT_BYTES = 16 << 30
_DEFAULT_MEMBERS = 500_000


@dataclass(frozen=True)
class ExtractLimits:
    bytes: int
    members: int
    bytes_variable: str = _BYTES_VARIABLE
    members_variable: str = _MEMBERS_VARIABLE


def extract_limits() -> ExtractLimits:
    """The limits of this run; a malformed variable raises ValueError naming it (the caller words it)."""
    return ExtractLimits(
        bytes=_positive(_BYTES_VARIABLE, _DEFAULT_BYTES), members=_positive(_MEMBERS_VARIABLE, _DEFAULT_MEMBERS)
    )


def _positive(variable: str, default: int) -> int:
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{variable}={text!r} must be a positive whole number")
    return value


def irregular_file(path: os.PathLike | str) -> str | None:
    """Why path cannot be read as a file (None when it is a regular file, links followed).

    Opening a FIFO named `x.whl` blocks until someone writes to it: gpuwheel would hang forever
    reading a wheel folder someone else can write to. A device or folder is no wheel either.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        return error.strerror.lower() if error.strerror else "cannot be read"
    if stat.S_ISREG(mode):
        return None
    kind = (
        "a folder"
        if stat.S_ISDIR(mode)
        else "a FIFO (named pipe)"
        if stat.S_ISFIFO(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "a device"
    )
    return f"is {kind}, not a regular file"

"""Every error a user can meet, each with its own exit code and a one-line message.

The CLI prints `gpuwheel: error: <message>` and exits with `exit_code`; no traceback is
shown for these. Anything else escaping is a bug in gpuwheel: the CLI prints the traceback and a
line that says so, and exits 70 (EX_SOFTWARE).
Exit codes are documented in docs/errors.md; keep the two in step.
"""

from __future__ import annotations

import errno

from gpuwheel.redact import safe_text

# OSErrors that are the machine refusing a write (a full disk or quota, a read-only or foreign
# folder, a file where a folder belongs), whatever gpuwheel was reading: never "a corrupt input".
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
REFUSED_WRITE = DISK_FULL | {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}
BUG_EXIT_CODE = 70  # EX_SOFTWARE (sysexits.h): an exception no GpuwheelError describes


def raise_if_refused(error: BaseException) -> None:
    """Re-raise the machine's refusal (a full temp dir or disk) where a handler would otherwise call
    the input corrupt; the CLI words it (StorageError)."""
    if isinstance(error, OSError) and error.errno in REFUSED_WRITE:
        raise error


class GpuwheelError(Exception):
    """Base of all user-facing errors."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        # Messages are shown and logged: credentials in the URLs they name are masked here, once.
        message, hint = safe_text(message), safe_text(hint) if hint else hint
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(GpuwheelError):
    """The command line asks for something contradictory or incomplete (options that exclude each other)."""

    exit_code = 2


class RecipeError(GpuwheelError):
    """The recipe file is unreadable, mistyped or names something unknown."""

    exit_code = 2


class IncompatibleRecipeError(GpuwheelError):
    """The recipe parses but cannot work: every problem is listed, with its fix."""

    exit_code = 3

    def __init__(self, recipe: str, problems: list[str]):
        self.problems = problems
        listed = "; ".join(problems)
        super().__init__(f"{recipe}: {len(problems)} problem(s): {listed}")


class SourceError(GpuwheelError):
    """A source cannot be fetched, verified or extracted."""

    exit_code = 4


class OfflineError(SourceError):
    """Offline mode and a source is missing from the cache."""

    exit_code = 5


class PatchError(GpuwheelError):
    """A patch does not apply (package, patch, file and hunk named)."""

    exit_code = 6


class ToolchainError(GpuwheelError):
    """The compiler, torch or container engine does not match the recipe or is missing."""

    exit_code = 7


class BuildError(GpuwheelError):
    """A package's build failed (log path and last lines shown)."""

    exit_code = 8

    def __init__(self, message: str, *, hint: str | None = None, tail: tuple[str, ...] = ()):
        super().__init__(message, hint=hint)
        self.tail = tail  # the build log's last lines; the CLI shows them above the one-line message


class OutOfMemoryError(BuildError):
    """A compiler was killed by the OOM killer."""

    exit_code = 9


class WheelError(GpuwheelError):
    """A wheel is malformed, unsafe or cannot be finished."""

    exit_code = 10


class AuditInputError(WheelError):
    """What the audit was given is no wheel or ELF, or holds a corrupt fatbin or an unsafe path."""


class AuditFailure(GpuwheelError):
    """A wheel or .so carries kernels that cannot run on the target."""

    exit_code = 11


class SmokeFailure(GpuwheelError):
    """A smoke check failed on the target."""

    exit_code = 12


class SmokeNotOnTarget(SmokeFailure):
    """Nothing failed, but the GPU checks were skipped (no GPU, or another compute capability): not a pass."""

    exit_code = 14


class PublishError(GpuwheelError):
    """The index refused an upload, or a wheel may not be published."""

    exit_code = 13


class StorageError(GpuwheelError):
    """A folder gpuwheel writes (its cache, a wheels or output folder) cannot be written: a file
    stands where a folder belongs, it is read-only or not ours, or the disk is full."""

    exit_code = 15


class DistConfigError(GpuwheelError):
    """--dist / $GPUWHEEL_DIST names no usable scheduler URL, or the client token is missing."""

    exit_code = 16


class DistUnreachable(DistConfigError):
    """The sccache-dist scheduler does not answer, or answers as no scheduler."""

    exit_code = 17


class DistAuthRefused(DistConfigError):
    """The scheduler refused the client token."""

    exit_code = 18


class DistNoServers(DistConfigError):
    """The scheduler answers and takes the token, but has no build servers."""

    exit_code = 19


class DistToolchainMismatch(DistConfigError):
    """A trial compile did not run on the cluster: the servers cannot run this machine's packaged compiler."""

    exit_code = 20


class LockError(GpuwheelError):
    """A lock is missing, unreadable or stale: the recipe, a source or the toolchain differs from it."""

    exit_code = 21


class VerifyMismatch(GpuwheelError):
    """`gpuwheel verify`: the wheel rebuilt from its provenance and lock is not the same bytes."""

    exit_code = 22

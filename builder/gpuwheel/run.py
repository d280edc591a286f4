"""The one place gpuwheel starts subprocesses: argument lists only, explicit env, a log file,
timing, line callbacks (progress), and cancellation that takes the whole process group down;
and services that live for the length of a block (the podman API service).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gpuwheel.log import logger

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass(frozen=True)
class Finished:
    """What a finished command left: its code, timing and the last lines it printed."""

    argv: tuple[str, ...]
    returncode: int
    seconds: float
    tail: tuple[str, ...]
    log_path: Path | None

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def killed_by(self) -> int | None:
        """The signal that killed the command (directly, or as a shell's 128+N), if any."""
        if self.returncode < 0:
            return -self.returncode
        if self.returncode in (128 + signal.SIGKILL, 128 + signal.SIGTERM):
            return self.returncode - 128
        return None


def run(
    argv: Sequence[str | os.PathLike],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    log_path: Path | None = None,
    on_line: Callable[[str], None] | None = None,
    tail_lines: int = 40,
    timeout: float | None = None,
    append: bool = False,
) -> Finished:
    """Run argv to completion, streaming its merged output to log_path and on_line.

    env replaces the environment when given (callers build it from os.environ on purpose).
    append adds to log_path (one log for several steps) instead of starting it afresh.
    Never raises for a non-zero exit: callers turn a Finished into their own error.
    """
    args = tuple(str(a) for a in argv)
    logger.debug("run: %s (cwd=%s)", " ".join(args), cwd or ".")
    tail: deque[str] = deque(maxlen=tail_lines)
    start = time.monotonic()
    log_file = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "a" if append else "w", encoding="utf-8", errors="replace")
    try:
        process = subprocess.Popen(
            args,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            start_new_session=True,  # so cancellation can kill compilers the build spawned
        )
    except FileNotFoundError:
        if log_file:
            log_file.close()
        return Finished(args, 127, 0.0, (f"{args[0]}: command not found",), log_path)
    try:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            if log_file:
                log_file.write(line + "\n")
            if on_line:
                on_line(line)
            if timeout is not None and time.monotonic() - start > timeout:
                _kill_group(process)
                break
        returncode = process.wait()
    except BaseException:
        _kill_group(process)
        raise
    finally:
        if log_file:
            log_file.close()
    return Finished(args, returncode, time.monotonic() - start, tuple(tail), log_path)


def last_line(lines: Iterable[str], default: str = "") -> str:
    """The last non-blank line of a command's output: what an error message quotes."""
    return next((line for line in reversed(list(lines)) if line.strip()), default)


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP end gpuwheel as Ctrl-C does: by an exception, so run() takes the command's
    whole process group down (compilers included) and every `finally` removes its temporary state.
    (Python's default for SIGTERM ends the process at once, leaving the compilers running.)"""

    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


@contextmanager
def background(
    argv: Sequence[str | os.PathLike], *, log_path: Path, stop_seconds: float = 30
) -> Iterator[subprocess.Popen]:
    """Run a service (argv) for the length of a block, its output in log_path; stop it by its PID after
    (SIGTERM, SIGKILL after stop_seconds).

    The service sits in its own session, so that Ctrl-C reaches gpuwheel alone, which then still has the
    service to clean up through; and it is sent SIGTERM should gpuwheel die without cleaning up.
    """
    args = tuple(str(a) for a in argv)
    logger.debug("background: %s", " ".join(args))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8", errors="replace") as log:
        process = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        try:
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=stop_seconds)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies, however it dies (Linux's PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def capture(
    argv: Sequence[str | os.PathLike],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess:
    """Run a short query command (nvcc --version, git rev-parse) and capture its output."""
    args = [str(a) for a in argv]
    logger.debug("capture: %s", " ".join(args))
    return subprocess.run(
        args,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )

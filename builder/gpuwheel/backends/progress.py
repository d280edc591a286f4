"""Build progress: a rich bar per package fed by ninja's `[N/M]` lines, with elapsed time and ETA, and
what the build is doing before its first compile step; a spinner for slow steps without a count
(image builds, debootstrap).

Off a terminal (CI logs) the bar becomes a plain line per tenth of the steps and one per phase;
`quiet` shows nothing.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from gpuwheel.log import console

_NINJA_STEP = re.compile(r"^\s*\[(\d+)/(\d+)\]")  # pip -v indents the build's output
# Before the first compile step (up to a minute: a container, the tree copy, pip reading setup.py):
# the backend's own "gpuwheel:" lines and pip's.
# What a build does before its first ninja step (a container starting, the tree copy, then minutes of
# vLLM's cmake): the backend's own "gpuwheel: …" lines, and pip -v's and cmake's markers.
_BACKEND_LINE = re.compile(r"^\s*gpuwheel: (.+)$")
# Each marker: the phase shown from its line on, and the milestone of the build's record it marks, if
# any (the build report's "milestones": where a package build's time went, each at its first line).
_PHASES = (
    ("Getting requirements to build wheel", "reading build requirements", None),
    ("Preparing metadata", "preparing metadata", None),
    ("Building wheel for", "starting the build", None),
    ("running build_ext", "building extensions", None),
    ("-- The CXX compiler identification", "cmake: configuring", "cmake configure started"),
    ("-- Configuring done", "cmake: generating the build files", "cmake configure done"),
    ("Emitting ninja build file", "ninja: first compile starting", None),
    ("Created wheel for", "packing the wheel", "wheel written"),
)
# Ninja's first and last finished step are milestones too (ninja prints a step's [N/M] line as it
# finishes when its output is not a terminal). The last step counts at its latest line: a ninja run
# inside one of the build's steps finishes before that step does.
LAST_STEP = "last compile step done"


def milestones(line: str) -> tuple[str, ...]:
    """The milestones of a package build that this line of its output marks (a [1/1] step marks two)."""
    if step := _NINJA_STEP.match(line):
        done, total = int(step[1]), int(step[2])
        return (("first compile step done",) if done == 1 else ()) + ((LAST_STEP,) if done == total else ())
    text = line.strip()
    return tuple(milestone for marker, _, milestone in _PHASES if milestone and text.startswith(marker))


def _phase(line: str) -> str | None:
    if backend := _BACKEND_LINE.match(line):
        return backend[1]
    text = line.strip()
    return next((phase for marker, phase, _ in _PHASES if text.startswith(marker)), None)


class BuildProgress:
    def __init__(self, *, quiet: bool = False):
        self.quiet = quiet
        self.interactive = console.is_terminal and not quiet

    def say(self, text: str) -> None:
        if not self.quiet:
            console.print(text, markup=False)

    @contextmanager
    def package(self, name: str) -> Iterator[Callable[[str], None]]:
        """Yields the on_line callback that advances this package's bar and shows its phase."""
        if self.interactive:
            with Progress(
                SpinnerColumn(),
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[phase]}", markup=False),
                console=console,
                transient=True,
            ) as bar:
                task = bar.add_task(name, total=None, phase="")

                def advance(line: str) -> None:
                    if step := _NINJA_STEP.match(line):
                        bar.update(task, completed=int(step[1]), total=int(step[2]), phase="")
                    elif phase := _phase(line):
                        bar.update(task, phase=_clip(phase))

                yield advance
            return
        start, shown, phases = time.monotonic(), [-1], set()

        def plain(line: str) -> None:
            if self.quiet:
                return
            if (phase := _phase(line)) and phase not in phases:  # "started" and "finished" lines say it once
                phases.add(phase)
                console.print(f"{name}: {phase} ({time.monotonic() - start:.0f}s)", markup=False)
            if not (step := _NINJA_STEP.match(line)):
                return
            done, total = int(step[1]), int(step[2])
            tenth = done * 10 // total
            if tenth != shown[0]:
                shown[0] = tenth
                console.print(f"{name}: {done}/{total} build steps ({time.monotonic() - start:.0f}s)", markup=False)

        yield plain

    @contextmanager
    def activity(self, name: str, *, milestones: re.Pattern, note: str = "") -> Iterator[Callable[[str], None]]:
        """A slow step without a step count: its name and note first (where its log is); then on a terminal
        a spinner with the latest line and the time so far, off one each milestone line with its seconds."""
        self.say(f"{name}: {note}" if note else name)
        start = time.monotonic()
        if self.interactive:
            with Progress(
                SpinnerColumn(),
                TextColumn("[bold]{task.description}"),
                TimeElapsedColumn(),
                TextColumn("{task.fields[line]}", markup=False),
                console=console,
                transient=True,
            ) as spinner:
                task = spinner.add_task(name, total=None, line="")

                def show(line: str) -> None:
                    if line.strip():
                        spinner.update(task, line=_clip(line))

                yield show
        else:

            def print_milestone(line: str) -> None:
                if not self.quiet and milestones.match(line):
                    console.print(f"{name}: {_clip(line)} ({time.monotonic() - start:.0f}s)", markup=False)

            yield print_milestone
        self.say(f"{name}: done in {time.monotonic() - start:.0f}s")


def _clip(line: str, width: int = 100) -> str:
    line = " ".join(line.split())
    return line if len(line) <= width else line[: width - 1] + "…"

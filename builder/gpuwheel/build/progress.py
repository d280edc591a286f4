"""Build progress: a rich bar per package fed by ninja's `[N/M]` lines, with elapsed time and ETA.

Off a terminal (CI logs) the bar becomes a plain line per tenth of the steps; `quiet` shows nothing.
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from gpuwheel.log import console

_NINJA_STEP = re.compile(r"^\s*\[(\d+)/(\d+)\]")  # pip -v indents the build's output
# What a build does before its first ninja step (minutes for vLLM's cmake), as pip -v shows it.
_PHASES = (("Getting requirements to build wheel", "reading build requirements"),
           ("Preparing metadata", "preparing metadata"),
           ("Building wheel for", "starting the build"),
           ("running build_ext", "building extensions"),
           ("-- The CXX compiler identification", "cmake: configuring"),
           ("-- Configuring done", "cmake: generating the build files"),
           ("Emitting ninja build file", "ninja: first compile starting"),
           ("Created wheel for", "packing the wheel"))


def _phase(line: str) -> str | None:
    text = line.strip()
    return next((phase for marker, phase in _PHASES if text.startswith(marker)), None)


class BuildProgress:
    def __init__(self, *, quiet: bool = False):
        self.quiet = quiet
        self.interactive = console.is_terminal and not quiet

    def say(self, text: str) -> None:
        if not self.quiet:
            console.print(text)

    @contextmanager
    def package(self, name: str) -> Iterator[Callable[[str], None]]:
        """Yields the on_line callback that advances this package's bar."""
        if self.interactive:
            with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                          transient=True) as bar:
                task = bar.add_task(name, total=None)

                def advance(line: str) -> None:
                    if step := _NINJA_STEP.match(line):
                        bar.update(task, completed=int(step[1]), total=int(step[2]), description=name)
                    elif phase := _phase(line):
                        bar.update(task, description=f"{name}: {phase}")
                yield advance
            return
        start, shown, phases = time.monotonic(), [-1], set()

        def plain(line: str) -> None:
            if self.quiet:
                return
            if (phase := _phase(line)) and phase not in phases:
                phases.add(phase)
                console.print(f"{name}: {phase} ({time.monotonic() - start:.0f}s)", markup=False, highlight=False)
            if not (step := _NINJA_STEP.match(line)):
                return
            done, total = int(step[1]), int(step[2])
            tenth = done * 10 // total
            if tenth != shown[0]:
                shown[0] = tenth
                console.print(f"{name}: {done}/{total} build steps ({time.monotonic() - start:.0f}s)")
        yield plain

"""Plan → toolchain → fetch → patch → build → finish: everything after the plan, as one function that
`gpuwheel build` and `gpuwheel verify` both call (verify rebuilds a wheel the way build made it)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from gpuwheel.backends.engine import choose_engine
from gpuwheel.backends.packages import RawWheels, build_packages, open_backend
from gpuwheel.cache import cache_root
from gpuwheel.patches import prepare_trees
from gpuwheel.sources import fetch_sources
from gpuwheel.wheels import Wheels, finish_wheels


@dataclass(frozen=True)
class Built:
    """What one build of a plan made, and how long each stage took."""

    backend: str  # the backend's name: local, container
    raw: RawWheels
    finished: Wheels
    timings: tuple[tuple[str, float], ...]  # (stage, seconds), the toolchain's counted from `start`


def build_plan(
    plan,
    lock,
    cluster,
    *,
    backend: str,
    engine: str | None,
    recipe_engine: str | None,
    offline: bool,
    python: str | None,
    base_image: str | None,
    allow_audit_failure: bool,
    out_dir: Path,
    quiet: bool,
    start: float | None = None,
) -> Built:
    """Build every package of `plan` and finish the wheels into out_dir; with a lock, only from it (the
    toolchain, then the sources, checked against it before anything is built). BuildError carries the
    log's last lines (`tail`) for the caller to show."""
    start = time.monotonic() if start is None else start
    timings: list[tuple[str, float]] = []
    # Held open until the wheels are finished: a podman service gpuwheel starts lives exactly as long.
    with open_backend(
        backend,
        engine=choose_engine(engine, recipe_engine, recipe_name=plan.recipe.name),
        python=python,
        base_image=base_image,
        cluster=cluster,
        lock=lock,
    ) as chosen:
        # A toolkit or torch that differs from the recipe (or the lock) stops the build before any download.
        toolchain = chosen.prepare(plan.toolchain, recipe_name=plan.recipe.name)
        if lock is not None:
            lock.check_toolchain(toolchain.info)
        timings.append(("toolchain", time.monotonic() - start))
        mark = time.monotonic()
        sources = fetch_sources(plan, offline=offline, progress=not quiet)
        if lock is not None:
            lock.check_sources(sources)  # a moved tag or a changed file stops here, before anything is built
        timings.append(("fetch", time.monotonic() - mark))
        mark = time.monotonic()
        trees = prepare_trees(plan, sources, cache_root() / "trees" / plan.hash[:16])
        timings.append(("patch", time.monotonic() - mark))
        raw = build_packages(
            plan, trees, backend=chosen, toolchain=toolchain, out_dir=cache_root() / "raw" / plan.hash[:16], quiet=quiet
        )
        timings.extend((f"build {w.package}", w.seconds) for w in raw.wheels)
        mark = time.monotonic()
        finished = finish_wheels(
            plan, raw, toolchain=raw.toolchain, out_dir=out_dir, allow_audit_failure=allow_audit_failure
        )
        timings.append(("finish + audit", time.monotonic() - mark))
        return Built(chosen.name, raw, finished, tuple(timings))

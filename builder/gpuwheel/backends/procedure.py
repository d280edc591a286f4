"""The build procedure, once for every backend: one package's tree and dependencies staged, its
environment (plan, compile cache, reproducibility), its own sccache server (a cluster's client with
--dist), the package's build command, the cache's stats. Where the commands run is the executor's
business (local.py: this machine, container.py: a container of the toolchain image); what they run is
decided here alone, so that local and container builds cannot drift apart.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from types import TracebackType

from gpuwheel.backends.base import (
    CANONICAL_WORK,
    BuildOutcome,
    BuildToolchain,
    Executor,
    PackageBuild,
    Ran,
    canonical_nvcc_env,
    reproducible_env,
    substitute,
)
from gpuwheel.backends.dist import Cluster, client_config_text
from gpuwheel.backends.progress import LAST_STEP, milestones
from gpuwheel.backends.sccache import CacheStats, free_port, parse_cache_stats, parse_dist_stats
from gpuwheel.errors import ToolchainError
from gpuwheel.wheelfile import DEFAULT_SOURCE_DATE_EPOCH

# The file the sccache server of a --dist build reads its client configuration (the token) from, while
# it starts; then it is removed, before the build command runs.
DIST_CLIENT_CONFIG = "gpuwheel-sccache.conf"


class BuildLog:
    """One package's log file, its last lines, its milestones, and the caller's progress: every line the
    build's commands print, and the procedure's own "gpuwheel: …" lines that say what happens before the
    first compile."""

    def __init__(self, path: Path, on_line: Callable[[str], None]):
        self.path = path
        self.on_line = on_line
        self.tail: deque[str] = deque(maxlen=40)
        self.milestones: dict[str, float] = {}  # milestone → seconds since the log was opened

    def __enter__(self) -> BuildLog:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", encoding="utf-8", errors="replace")
        self._opened = time.monotonic()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None):
        self._file.close()

    def line(self, text: str) -> None:
        self._file.write(text + "\n")
        self._file.flush()  # followed with tail -f during a long build
        self.tail.append(text)
        for name in milestones(text):
            if name == LAST_STEP or name not in self.milestones:
                self.milestones[name] = time.monotonic() - self._opened
        self.on_line(text)


def build_package(
    executor: Executor,
    toolchain: BuildToolchain,
    job: PackageBuild,
    log: BuildLog,
    *,
    cluster: Cluster | None,
    packed_compilers: Path,
) -> BuildOutcome:
    """Build job in executor with the prepared toolchain; never raises for a failed build command.

    packed_compilers: the host folder where sccache keeps the compilers it packed for the cluster's build
    servers (the host's and an image's differ), reused while they are unchanged.
    """
    start = time.monotonic()
    # Stable paths per package, the canonical ones in a container: compiler command lines embed them,
    # and sccache keys on them.
    log.line(f"gpuwheel: copying the source tree to {CANONICAL_WORK}/{job.name}")
    tree = executor.stage(job.tree, f"{CANONICAL_WORK}/{job.name}")
    deps = executor.stage(job.deps_dir, f"{CANONICAL_WORK}/deps")
    job.cache_dir.mkdir(parents=True, exist_ok=True)
    places = dict(tree=tree, out=executor.sees(job.out_dir), deps=deps, cache=executor.sees(job.cache_dir))
    env = {**executor.environ, **substitute(job.env, **places), **toolchain.env}
    # Compiled files name the canonical paths, whichever paths this build compiles at.
    path_map = (*executor.path_map(), *toolchain.path_map)
    env.update(reproducible_env(env, path_map, str(DEFAULT_SOURCE_DATE_EPOCH)))
    argv = list(substitute(job.command, **places))
    if argv[0] == "python":
        argv[0] = toolchain.python
    if not toolchain.sccache:
        env = {k: v for k, v in env.items() if not _is_cache_var(k, v)}
    if path_map:
        env.update(canonical_nvcc_env(env, toolchain.python, path_map))

    def build() -> Ran:
        log.line("gpuwheel: running the build command (pip reads the build's metadata before the first compile step)")
        return executor.run(argv, env=env, cwd=tree, on_line=log.line)

    if not toolchain.sccache:
        ran = build()
        return BuildOutcome(
            ran.returncode,
            time.monotonic() - start,
            tuple(log.tail),
            CacheStats(0, 0),
            ran.oom_killed,
            milestones=tuple(log.milestones.items()),
        )
    sccache = toolchain.sccache
    # A server of its own, on a free port: stopping the default port's server would stop every other
    # build's compile cache on this machine (and did, mid-build); a container on the host's network
    # (--dist) shares the host's ports.
    env.setdefault("SCCACHE_SERVER_PORT", str(free_port()))
    # The client configuration holds the token: the server reads it as it starts, then it is gone; the
    # build command's environment never names it.
    private: AbstractContextManager[str] = nullcontext("")
    if cluster:
        log.line("gpuwheel: starting sccache as a client of the sccache-dist scheduler")
        packed_compilers.mkdir(parents=True, exist_ok=True)
        private = executor.private_file(
            DIST_CLIENT_CONFIG, client_config_text(cluster, executor.sees(packed_compilers))
        )
    said: list[str] = []
    with private as conf:
        started = executor.run(
            [sccache, "--start-server"], env={**env, **({"SCCACHE_CONF": conf} if conf else {})}, on_line=said.append
        )
    if started.returncode != 0:
        raise ToolchainError(f"sccache did not start: {' '.join(said).strip()}")
    shown: list[str] = []
    try:
        ran = build()
        executor.run([sccache, "--show-stats", "--stats-format=json"], env=env, on_line=shown.append)
    finally:
        executor.run([sccache, "--stop-server"], env=env, on_line=lambda line: None)
    stats = "\n".join(shown)
    return BuildOutcome(
        ran.returncode,
        time.monotonic() - start,
        tuple(log.tail),
        parse_cache_stats(stats),
        ran.oom_killed,
        dist=parse_dist_stats(stats) if cluster else None,
        milestones=tuple(log.milestones.items()),
    )


def _is_cache_var(key: str, value: str) -> bool:
    return key.startswith("SCCACHE_") or "sccache" in value.split()[:1]

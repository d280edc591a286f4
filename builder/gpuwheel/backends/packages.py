"""Trees → RawWheels: build each planned package with one backend, in plan order.

Per package: the plan's env with its placeholders substituted, the compile-cache launcher
variables, one log file (cache_root()/logs/<plan hash>/<package>.log), and a private output
directory whose wheel is moved into out_dir only when the build succeeded — out_dir never holds
anything half-written. A compiler killed by SIGKILL (the OOM killer) is reported as such.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gpuwheel.backends.base import CACHE_DIR, Backend, BuildToolchain, PackageBuild, ToolchainInfo
from gpuwheel.backends.dist import Cluster
from gpuwheel.backends.local import LocalBackend
from gpuwheel.backends.progress import BuildProgress
from gpuwheel.backends.sccache import CacheStats, DistStats, compile_cache_env
from gpuwheel.cache import cache_root
from gpuwheel.errors import BuildError, OutOfMemoryError, ToolchainError
from gpuwheel.imageref import image_reference_problem
from gpuwheel.kinds import registry
from gpuwheel.lock import Lock
from gpuwheel.plan import PackagePlan, Plan

# The container backend brings the docker SDK (engine.py), which `gpuwheel wheels finish` and local
# builds, importing this module, do not need: it loads where a backend is opened.
if TYPE_CHECKING:
    from gpuwheel.backends.engine import EngineChoice

# What a compiler killed by SIGKILL leaves in a build log (gcc, nvcc, a shell, ninja).
_KILLED = re.compile(
    r"Killed signal terminated program|died due to signal 9|\(Kill signal\)|^\s*Killed$|"
    r"code=137\b|exit status 137",
    re.MULTILINE,
)
TAIL_LINES = 25


@dataclass(frozen=True)
class RawWheel:
    package: str
    path: Path
    log_path: Path
    seconds: float
    cache: CacheStats
    dist: DistStats | None = None  # built with --dist: compiles per build server, fallbacks to local
    milestones: tuple[tuple[str, float], ...] = ()  # (milestone, seconds into the build), BuildOutcome's


@dataclass(frozen=True)
class RawWheels:
    plan_hash: str
    toolchain: ToolchainInfo
    wheels: tuple[RawWheel, ...]

    def to_json(self) -> dict:
        return {
            "plan_hash": self.plan_hash,
            "toolchain": self.toolchain.to_json(),
            "wheels": [
                {
                    "package": w.package,
                    "path": str(w.path),
                    "log": str(w.log_path),
                    "seconds": round(w.seconds, 1),
                    "milestones": {name: round(seconds, 1) for name, seconds in w.milestones},
                    "cache_hits": w.cache.hits,
                    "cache_misses": w.cache.misses,
                    **({"dist": w.dist.to_json()} if w.dist else {}),
                }
                for w in self.wheels
            ],
        }


@contextmanager
def open_backend(
    name: str,
    *,
    engine: EngineChoice,
    python: str | None = None,
    base_image: str | None = None,
    cluster: Cluster | None = None,
    lock: Lock | None = None,
) -> Iterator[Backend]:
    """The backend for a command, held open while it builds. `auto` is a container where one was asked
    for (--base-image, --engine) or the chosen engine can be had (docker answers; podman is installed),
    else local. With a cluster (--dist), either backend sends its compiles there; with a lock, the
    toolchain is installed from the lock's hashes."""
    from gpuwheel.backends.container import ContainerBackend
    from gpuwheel.backends.engine import ContainerEngine, engine_available

    asked_for_containers = base_image is not None or engine.chosen_by == "--engine"
    if name == "auto":
        name = "container" if asked_for_containers or (not python and engine_available(engine.name)) else "local"
    if name == "local":
        if asked_for_containers:
            flag = "--base-image" if base_image is not None else "--engine"
            raise ToolchainError(
                f"{flag} applies to --backend container only", hint=f"drop {flag} or use --backend container"
            )
        yield LocalBackend(python=python, cluster=cluster, lock=lock)
        return
    if python:
        raise ToolchainError("--python applies to --backend local only", hint="drop --python or use --backend local")
    if base_image is not None and (problem := image_reference_problem(base_image)):
        raise ToolchainError(
            f"--base-image {base_image!r} names no image: {problem}",
            hint="e.g. --base-image gpuwheel-base:bookworm; leave it out for the recipe's base_image",
        )
    with ContainerEngine(engine, instead=", or use --backend local") as connected:
        yield ContainerBackend(connected, base_image=base_image, lock=lock, cluster=cluster)


def build_packages(
    plan: Plan, trees, *, backend: Backend, toolchain: BuildToolchain, out_dir: Path, quiet: bool = False
) -> RawWheels:
    """Build the plan's packages (`--only` is the plan's) from their prepared trees into out_dir.

    `trees` is patches.prepare_trees' value: `.packages`, each with name, tree and deps_dir.
    `toolchain` is what backend.prepare() returned: it is called first, before any download.
    """
    progress = BuildProgress(quiet=quiet)
    info = toolchain.info
    packages = plan.packages
    prepared = {t.name: t for t in trees.packages}
    progress.say(
        f"toolchain ({backend.name}): nvcc {info.nvcc}, torch {info.torch} "
        f"(CUDA {info.torch_cuda}), Python {info.python}, {info.cc}"
        + (f", image {info.image} ({info.image_id}) on {info.engine}" if info.image else "")
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    logs = cache_root() / "logs" / plan.hash[:16]
    built = []
    for package in packages:
        if package.name not in prepared:
            raise BuildError(f"{package.name}: no prepared tree (prepare_trees gave {', '.join(prepared) or 'none'})")
        built.append(
            _build_one(
                package,
                prepared[package.name],
                backend,
                toolchain,
                out_dir,
                logs / f"{package.name}.log",
                progress,
                recipe=plan.recipe.name,
            )
        )
    return RawWheels(plan.hash, info, tuple(built))


def _build_one(
    package: PackagePlan,
    prepared,
    backend: Backend,
    toolchain: BuildToolchain,
    out_dir: Path,
    log_path: Path,
    progress: BuildProgress,
    *,
    recipe: str,
) -> RawWheel:
    cache_dir = cache_root() / "compile" / "sccache"
    # The recipe's env wins over the launcher variables (a recipe may set its own PYTORCH_NVCC).
    env = {**(compile_cache_env(CACHE_DIR) if toolchain.sccache else {}), **package.env_dict}
    # Private output next to out_dir (same file system: the move is a rename).
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{package.name}-building-") as private:
        job = PackageBuild(
            name=package.name,
            tree=Path(prepared.tree),
            deps_dir=Path(prepared.deps_dir),
            command=package.command,
            env=env,
            out_dir=Path(private),
            log_path=log_path,
            cache_dir=cache_dir,
            toolkit_files=registry.get(package.kind).toolkit_files,
        )
        with progress.package(f"{package.name} {package.version}") as on_line:
            outcome = backend.build(toolchain, job, on_line)
        if outcome.returncode != 0:
            _raise_failure(package, outcome, log_path, recipe=recipe)
        wheels = sorted(Path(private).glob("*.whl"))
        if len(wheels) != 1:
            raise BuildError(
                f"{package.name}: the build succeeded but left {len(wheels)} wheels, expected one (log: {log_path})"
            )
        final = out_dir / wheels[0].name
        os.replace(wheels[0], final)
    progress.say(
        f"{package.name}: built {final.name} in {_duration(outcome.seconds)}; {outcome.cache}"
        + (f"; {outcome.dist}" if outcome.dist else "")
    )
    return RawWheel(package.name, final, log_path, outcome.seconds, outcome.cache, outcome.dist, outcome.milestones)


def _raise_failure(package: PackagePlan, outcome, log_path: Path, *, recipe: str) -> None:
    text = log_path.read_text(encoding="utf-8", errors="replace") if log_path.is_file() else ""
    tail = tuple(outcome.tail[-TAIL_LINES:])
    if outcome.oom_killed or outcome.returncode in (137, -9) or _KILLED.search(text):
        jobs, threads = package.env_dict.get("MAX_JOBS", "?"), package.env_dict.get("NVCC_THREADS", "?")
        lower = max(1, int(jobs) // 2) if jobs.isdigit() else 1
        error: BuildError = OutOfMemoryError(
            f"{package.name}: a compiler was killed by SIGKILL (out of memory) at MAX_JOBS={jobs} × "
            f"NVCC_THREADS={threads}; log: {log_path}",
            hint=f"lower the jobs: --jobs {lower}, or [build] jobs = {lower} in {recipe}",
            tail=tail,
        )
    else:
        error = BuildError(
            f"{package.name}: build failed (exit {outcome.returncode}) after "
            f"{_duration(outcome.seconds)}; log: {log_path}",
            tail=tail,
        )
    raise error


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"

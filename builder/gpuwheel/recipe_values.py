"""The Recipe value and its parts: what recipe.py loads from TOML and every later stage reads.

Plain frozen values with no loading logic, below recipe.py and the package kinds (gpuwheel.kinds),
which both read them: the kinds turn a package of a recipe into its build environment.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

from gpuwheel.shipped import CHECKOUT, from_checkout


@dataclass(frozen=True)
class Origin:
    file: Path
    line: int

    def __str__(self) -> str:
        return f"{display_path(self.file)}:{self.line}"


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    gpu: str
    compute_capability: str
    torch_cuda_arch_list: str
    min_driver: str


@dataclass(frozen=True)
class Toolchain:
    cuda: str
    python: str
    torch: str
    base_image: str | None = None
    base_image_digest: str | None = None


@dataclass(frozen=True)
class BuildOptions:
    jobs: int | None = None  # None: chosen from cores and available memory
    nvcc_threads: int | None = None
    build_type: str = "Release"
    engine: str | None = None  # the container backend's engine; --engine and $GPUWHEEL_ENGINE win over it


@dataclass(frozen=True)
class Source:
    kind: str  # "sdist" | "git" | "url" | "path"
    location: str  # sdist file name, git URL, URL or path
    sha256: str | None = None
    commit: str | None = None
    index: str | None = None  # sdist only; None = pip's configured index
    submodules: bool = True

    @property
    def filename(self) -> str:
        """The file an sdist or url source is stored as in the cache (a bare name, checked at load)."""
        return self.location if self.kind == "sdist" else url_filename(self.location)


@dataclass(frozen=True)
class Dependency:
    """A source vLLM's CMake would FetchContent from GitHub, pinned as the release pins it."""

    name: str
    git: str
    rev: str  # the GIT_TAG of the vLLM release: a tag or a commit
    src_dir_env: str | None = None  # the variable that points vLLM at a local tree
    fetchcontent_name: str | None = None  # for FETCHCONTENT_SOURCE_DIR_<NAME> when no variable
    commit: str | None = None  # full commit the rev resolves to, when known
    submodules: bool | tuple[str, ...] = True  # all, none, or just these paths (others are never read)
    subdir: str = ""  # the directory inside the tree that src_dir_env must name
    exclude: tuple[str, ...] = ()  # paths no build reads, left out of the checkout (and of a mirror)

    @property
    def pinned_commit(self) -> str | None:
        """The full commit the recipe pins: `commit`, or `rev` when that is one (else a tag to resolve)."""
        return self.commit or (self.rev if re.fullmatch(r"[0-9a-f]{40}", self.rev) else None)


@dataclass(frozen=True)
class ServingProfile:
    """vLLM's serving profile: FA2 for these head dims and dtypes only, these kernel families left out."""

    head_dims: tuple[int, ...]
    dtypes: tuple[str, ...]
    omit: tuple[str, ...] = ()


@dataclass(frozen=True)
class InferenceProfile:
    """flash-attn's inference profile: forward kernels for these head dims, these features compiled out."""

    head_dims: tuple[int, ...]
    disable: tuple[str, ...] = ()  # of kinds.flash_attn.FEATURES


@dataclass(frozen=True)
class PackageRecipe:
    name: str
    version: str
    source: Source
    kind: str = "generic"  # the package kind (gpuwheel.kinds) that knows how to build it
    patches: Path | None = None
    env: tuple[tuple[str, str], ...] = ()
    profile: str = "full"
    inference: InferenceProfile | None = None
    serving: ServingProfile | None = None
    dependencies: tuple[Dependency, ...] = ()
    audit_optional: tuple[str, ...] = ()
    stand_in: Source | None = None  # the published wheel whose files stand in for uncompiled dependencies
    rust_frontend: str = "off"  # vLLM's optional Rust frontend: off | optional | required
    cargo_vendor: Path | None = None  # `cargo vendor` output the Rust frontend's crates come from


@dataclass(frozen=True)
class Recipe:
    path: Path
    target: Target
    toolchain: Toolchain
    build: BuildOptions
    packages: tuple[PackageRecipe, ...]
    files: tuple[Path, ...]  # this recipe and every file it extends, base last
    origins: dict[str, Origin] = field(default_factory=dict, compare=False, hash=False)

    @property
    def name(self) -> str:
        return self.target.name

    def package(self, name: str) -> PackageRecipe | None:
        return next((p for p in self.packages if p.name == name), None)


def url_filename(url: str) -> str:
    """The file a URL downloads to: the last part of its path ("download" when it has none)."""
    name = PurePosixPath(unquote(urlparse(url).path)).name
    return name or "download"


def display_path(path: Path | None) -> str:
    if path is None:
        return ""
    return _display_from(Path(path), os.getcwd())


@functools.lru_cache(maxsize=256)
def _display_from(path: Path, cwd: str) -> str:
    # Cached: schema checks format a location for every key they read (`gpuwheel targets` loads them all).
    try:
        return str(Path(path).resolve().relative_to(Path(cwd)))
    except ValueError:
        if from_checkout():
            try:
                return str(Path(path).resolve().relative_to(CHECKOUT))
            except ValueError:
                pass
        return str(path)  # an installed gpuwheel: the full path, a file the user can open


def closest(word: str, choices) -> str | None:
    """The valid name a typo most likely meant ('cuda_version' → 'cuda'), if any is close."""
    choices = list(choices)
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    if match:
        return match[0]
    containing = [c for c in choices if c and (c in word or word in c)]
    return max(containing, key=len) if containing else None


def typo_hint(word: str, choices, otherwise: str) -> str:
    """The hint for an unknown name: "did you mean '…'?" where a valid one is close, else `otherwise`
    (the valid names). An empty name is close to none: every name contains it."""
    close = closest(word, choices) if word else None
    return f"did you mean '{close}'?" if close else otherwise

"""The one protocol every package kind implements: what gpuwheel must know to build, check and
exercise a package beyond what its recipe entry says.

A kind is a frozen value of data and functions over the recipe's values (gpuwheel.recipe_values);
plan, build and smoke ask the package's kind and never test its name. Adding a package that builds
like an existing kind is a recipe entry; one that needs its own knowledge is one kind module
(docs/kinds.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpuwheel import facts
from gpuwheel.provenance import Provenance
from gpuwheel.recipe_values import PackageRecipe, Recipe
from gpuwheel.smoke.report import CheckResult

# The directory holding a package's pre-fetched dependency trees at build time (one sub-directory
# per name); the build backends substitute it, like the plan's $GPUWHEEL_TREE and $GPUWHEEL_OUT.
DEPS = "$GPUWHEEL_DEPS"


@dataclass(frozen=True)
class SmokeGroup:
    """One probe process of the smoke stage: a group of smoke/probe.py, its spec, what it checks."""

    group: str
    spec: Mapping[str, Any]
    what: str
    # False: the group needs torch (and the driver's libcuda.so.1 where a library links it) but no
    # GPU, so it runs, or says why not, on any machine.
    needs_gpu: bool = True


@dataclass(frozen=True)
class MeasuredBuild:
    """A build measured from its .ninja_log (benchmarks/build_vllm.py): the compile steps' CPU-s and
    the longest step, which no number of cores or build servers goes below."""

    cpu_s: float
    longest_s: float
    source: str  # where the figures come from

    def predicted_wall_s(self, cores: int) -> float:
        return max(self.cpu_s / max(cores, 1), self.longest_s)


@dataclass(frozen=True)
class StandIn:
    """Where a dependency's Python files sit in the package's published wheel and in the dependency's
    own tree (a kind's stand_in_layout; the sources stage writes the stand-in tree from it).

    `rewrite` is the text replacement the package's build applies while installing (source → wheel);
    the stand-in undoes it, and the undo is checked to give the wheel's bytes back exactly.
    """

    wheel_dir: str  # e.g. vllm/third_party/fmha_sm100/
    tree_dir: str  # where those files go in the stand-in tree
    rewrite: tuple[str, str] | None = None  # (in the dependency's file, in the wheel's)
    suffixes: tuple[str, ...] = ()  # only files ending so; () = every file


def no_problems(package: PackageRecipe, recipe: Recipe, notes: list[str]) -> list[str]:
    return []


def no_stand_ins(package: PackageRecipe, recipe: Recipe) -> tuple[str, ...]:
    return ()


def no_smoke_groups(
    project: str, provenance: Provenance | None, shared_objects: tuple[str, ...], work: Path
) -> tuple[SmokeGroup, ...]:
    return ()


def no_smoke_checks(provenance: Provenance | None, shared_objects: tuple[str, ...]) -> tuple[CheckResult, ...]:
    return ()


def no_measured_build(package: PackageRecipe, arch_list: str) -> MeasuredBuild | None:
    return None


def no_stand_in_layout(version: str, dependency: str) -> StandIn | None:
    return None


def no_tree_files(version: str, env: Mapping[str, str]) -> dict[str, str]:
    return {}


def no_components(rust_frontend: str, members: frozenset[str]) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Kind:
    """A package kind. Only `name` and `build_env` are required; the rest default to "nothing special"."""

    name: str
    # The build environment for the recipe's archs and the package's profile (the plan adds
    # MAX_JOBS/NVCC_THREADS and the recipe's own env on top).
    build_env: Callable[[PackageRecipe, Recipe], dict[str, str]]
    # Why this package cannot be built for this recipe, each with its fix (the plan refuses the
    # recipe); warnings go to `notes`.
    problems: Callable[[PackageRecipe, Recipe, list[str]], list[str]] = no_problems
    # Profiles beyond "full" that this kind builds ("inference", "serving").
    profiles: tuple[str, ...] = ()
    # Peak GB of one compiler job at one arch, and what each extra nvcc thread adds (backends/jobs.py).
    job_memory_gb: tuple[float, float] = (4.0, 1.5)
    # The recipe's dependencies that the archs (or the profile) never compile: they stand in as
    # files instead of being fetched from their sources.
    stand_ins: Callable[[PackageRecipe, Recipe], tuple[str, ...]] = no_stand_ins
    # Where a stand-in dependency's files sit in the published wheel (release, dependency → layout).
    stand_in_layout: Callable[[str, str], StandIn | None] = no_stand_in_layout
    # Files the patch stage writes into the patched tree (path relative to it → text), from the package's
    # version and plan env.
    tree_files: Callable[[str, Mapping[str, str]], dict[str, str]] = no_tree_files
    # .so files of the wheel allowed to carry no code for the target GPU, by design (audit).
    audit_optional: tuple[str, ...] = ()
    # Files the CUDA toolkit must hold beyond nvcc and the runtime (backends/packages.py checks them).
    toolkit_files: tuple[str, ...] = ()
    # The smoke stage's probe groups for a wheel of this kind (its project, provenance, .so members and a
    # work directory), and host-side checks of its members.
    smoke_groups: Callable[[str, Provenance | None, tuple[str, ...], Path], tuple[SmokeGroup, ...]] = no_smoke_groups
    smoke_checks: Callable[[Provenance | None, tuple[str, ...]], tuple[CheckResult, ...]] = no_smoke_checks
    # Optional parts of the package and whether a wheel holds them (recorded in its gpuwheel.json):
    # (the recipe's rust_frontend mode, the wheel's members) → {part: …}.
    components: Callable[[str, frozenset[str]], dict[str, Any]] = no_components
    # The measured cost of a build like this one, where the kind has one.
    measured_build: Callable[[PackageRecipe, str], MeasuredBuild | None] = no_measured_build


def arch_list_env(package: PackageRecipe, recipe: Recipe) -> dict[str, str]:
    """TORCH_CUDA_ARCH_LIST, which torch's cpp_extension (and CMake's torch config) compile for."""
    return {"TORCH_CUDA_ARCH_LIST": recipe.target.torch_cuda_arch_list}


def archs(recipe: Recipe) -> tuple[facts.Arch, ...]:
    return facts.parse_arch_list(recipe.target.torch_cuda_arch_list)


def plan_env(provenance: Provenance | None, key: str) -> str | None:
    """A variable of the plan env recorded in gpuwheel.json (its build.env)."""
    return provenance.build.env.get(key) if provenance and provenance.build else None

"""Recipe → Plan: every check that can be made before a download, the per-package build
environment (from the package's kind, gpuwheel.kinds), the exact build command, and a content hash.

Everything after the plan is a pure function of it and the files it names. The hash covers
every input that can change a wheel (pins, sources, patch contents, env, command) and nothing
that depends on the machine (paths, MAX_JOBS/NVCC_THREADS), so it is the same everywhere.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from packaging.version import Version

from gpuwheel import facts
from gpuwheel.backends.jobs import Jobs, choose_jobs
from gpuwheel.errors import IncompatibleRecipeError, RecipeError
from gpuwheel.kinds import registry
from gpuwheel.kinds.base import DEPS, MeasuredBuild  # noqa: F401 - DEPS: the backends read all three here
from gpuwheel.patch_series import PatchRef, read_series
from gpuwheel.recipe_values import (
    Dependency,
    InferenceProfile,
    PackageRecipe,
    Recipe,
    ServingProfile,
    Source,
    Target,
    Toolchain,
    typo_hint,
)
from gpuwheel.redact import safe_text, safe_tree

PLAN_SCHEMA = 1
# Placeholders the build backends substitute: the tree being built, where wheels go, and (DEPS,
# from kinds.base, where the vLLM kind writes it into its env) the pre-fetched dependency trees.
TREE, OUT = "$GPUWHEEL_TREE", "$GPUWHEEL_OUT"
# Parallelism changes how fast a wheel is built, never what is in it: kept out of the hash.
SCHEDULING_ENV = ("MAX_JOBS", "NVCC_THREADS")
BUILD_COMMAND = ("python", "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-v", "--wheel-dir", OUT, TREE)


@dataclass(frozen=True)
class PackagePlan:
    name: str
    version: str
    source: Source
    patches: tuple[PatchRef, ...]
    dependencies: tuple[Dependency, ...]
    env: tuple[tuple[str, str], ...]  # sorted; the scheduling vars included
    command: tuple[str, ...]
    profile: str
    inference: InferenceProfile | None
    audit_optional: tuple[str, ...]
    jobs: Jobs
    serving: ServingProfile | None = None
    stand_in: Source | None = None  # the published wheel the stand-in trees come from
    stand_ins: tuple[str, ...] = ()  # dependencies supplied as stand-in trees, not from their sources
    rust_frontend: str = "off"
    kind: str = "generic"  # the package kind (gpuwheel.kinds); what it changes in the wheel is in env
    measured: MeasuredBuild | None = None  # the measured cost of a build like this one, where known

    @property
    def env_dict(self) -> dict[str, str]:
        return dict(self.env)

    @property
    def fetched_dependencies(self) -> tuple[Dependency, ...]:
        """The dependencies whose own sources the build needs."""
        return tuple(d for d in self.dependencies if d.name not in self.stand_ins)


@dataclass(frozen=True)
class Plan:
    recipe: Path
    target: Target
    toolchain: Toolchain
    build_type: str
    packages: tuple[PackagePlan, ...]
    notes: tuple[str, ...]  # warnings that do not stop the build
    hash: str

    def package(self, name: str) -> PackagePlan | None:
        return next((p for p in self.packages if p.name == name), None)

    @property
    def steps(self) -> tuple[str, ...]:
        """The ordered steps a build of this plan runs."""
        out = []
        for p in self.packages:
            out.append(f"fetch {p.name} {p.version} ({p.source.kind} {p.source.location})")
            out.extend(f"fetch {p.name} dependency {d.name} ({d.git} @ {d.rev})" for d in p.fetched_dependencies)
            if p.stand_ins and p.stand_in is not None:  # a kind names stand-ins only with a stand_in
                out.append(
                    f"stand in for {p.name} dependencies {', '.join(p.stand_ins)}: their installed files "
                    f"from {p.stand_in.location} (sha256 {(p.stand_in.sha256 or '')[:12]}…)"
                )
            if p.patches:
                out.append(f"patch {p.name}: {', '.join(r.name for r in p.patches)}")
            out.append(f"build {p.name}: {' '.join(p.command)}")
            out.append(f"finish, audit {p.name} for {self.target.compute_capability} / driver {self.target.min_driver}")
        return tuple(safe_text(step) for step in out)

    def to_json(self) -> dict:
        """The plan as shown and recorded: secrets masked (the build gets the real env from the Plan)."""
        return safe_tree(
            {
                "schema": PLAN_SCHEMA,
                "hash": self.hash,
                "recipe": str(self.recipe),
                "target": asdict(self.target),
                "toolchain": asdict(self.toolchain),
                "build_type": self.build_type,
                "notes": list(self.notes),
                "steps": list(self.steps),
                "packages": [_package_json(p) for p in self.packages],
            }
        )


def _package_json(p: PackagePlan) -> dict:
    return {
        "name": p.name,
        "version": p.version,
        "kind": p.kind,
        "source": asdict(p.source),
        "patches": [{"name": r.name, "sha256": r.sha256, "strip": r.strip, "tree": r.tree or None} for r in p.patches],
        "dependencies": [asdict(d) for d in p.dependencies],
        "env": dict(p.env),
        "command": list(p.command),
        "profile": p.profile,
        "inference": asdict(p.inference) if p.inference else None,
        "serving": asdict(p.serving) if p.serving else None,
        "stand_in": asdict(p.stand_in) if p.stand_in else None,
        "stand_ins": list(p.stand_ins),
        "rust_frontend": p.rust_frontend,
        "audit_optional": list(p.audit_optional),
        "jobs": asdict(p.jobs),
        "measured_build": asdict(p.measured) if p.measured else None,
    }


# ---- compatibility --------------------------------------------------------------------------
def check_compatibility(
    recipe: Recipe, packages: tuple[PackageRecipe, ...] | None = None
) -> tuple[list[str], list[str]]:
    """Every reason the recipe (or the chosen packages of it) cannot work, with its fix,
    and warnings that do not stop it."""
    problems: list[str] = []
    notes: list[str] = []
    t, tc = recipe.target, recipe.toolchain
    cuda = facts.major_minor(tc.cuda)
    target_arch = facts.parse_arch(t.compute_capability)
    archs = facts.parse_arch_list(t.torch_cuda_arch_list)
    for arch in sorted(set(archs) | {target_arch}):
        need = facts.arch_min_cuda(arch)
        if Version(cuda) < Version(need):
            problems.append(
                f"arch {arch} needs CUDA ≥ {need} (recipe has {tc.cuda}): raise [toolchain] cuda or drop {arch}"
            )
        max_major = facts.ARCH_MAX_CUDA_MAJOR.get(arch.plain)
        if max_major is not None and Version(cuda).major > max_major:
            problems.append(
                f"CUDA {Version(cuda).major} cannot build arch {arch} (dropped after CUDA "
                f"{max_major}): use CUDA {max_major}.x or drop {arch}"
            )
    if not any(facts.runs_natively(a, target_arch) for a in archs):
        problems.append(
            f"torch_cuda_arch_list '{t.torch_cuda_arch_list}' gives no native code for the target's "
            f"compute capability {t.compute_capability}: add {t.compute_capability} to it"
        )
    need_driver = facts.cuda_min_driver(tc.cuda)
    if need_driver is None:
        notes.append(f"CUDA {tc.cuda} is not in gpuwheel's driver table: its driver need is unchecked")
    elif facts.driver_tuple(t.min_driver) < facts.driver_tuple(need_driver):
        best = facts.driver_max_cuda(t.min_driver)
        problems.append(
            f"binaries from CUDA {cuda} need driver ≥ {need_driver} (fleet min_driver "
            f"{t.min_driver}): use CUDA ≤ {best} or raise min_driver"
            if best
            else f"binaries from CUDA {cuda} need driver ≥ {need_driver} (fleet min_driver {t.min_driver})"
        )
    builds = facts.torch_cuda_builds(tc.torch)
    last = facts.cuda_last_torch(tc.cuda, tc.torch)
    if last is not None:
        # An older same-major build (cu126) is no stand-in: PyPI's torch is CUDA 13, and cu126 lacks Blackwell.
        has = f" (torch {facts.major_minor(tc.torch)} has {', '.join(builds)})" if builds else ""
        problems.append(
            f"torch {tc.torch} has no CUDA {cuda} build: PyTorch's {facts.cuda_tag(cuda)} wheels end "
            f"with torch {last}{has}: use torch ≤ {last} with CUDA {cuda}, or a toolkit this torch "
            f"is built for"
        )
    elif builds is None:
        notes.append(f"torch {tc.torch} is not in gpuwheel's torch table: its CUDA builds are unchecked")
    elif not any(Version(b).major == Version(cuda).major for b in builds):
        problems.append(
            f"torch {tc.torch} has no CUDA {Version(cuda).major} build (it has "
            f"{', '.join(builds)}): pick a toolkit of that major or another torch"
        )
    elif cuda not in builds:
        notes.append(
            f"torch {tc.torch} has no cu{cuda.replace('.', '')} build ({', '.join(builds)}): "
            f"extensions built with CUDA {cuda} run against its CUDA {Version(cuda).major}.x build"
        )
    for package in recipe.packages if packages is None else packages:
        problems.extend(registry.get(package.kind).problems(package, recipe, notes))
    return problems, notes


def _package_env(package: PackageRecipe, recipe: Recipe, jobs: Jobs) -> dict[str, str]:
    env = registry.get(package.kind).build_env(package, recipe)
    if package.source.kind == "git":
        # A git checkout has no sdist metadata: setuptools-scm would invent a dev version.
        env["SETUPTOOLS_SCM_PRETEND_VERSION"] = package.version
    env["MAX_JOBS"] = str(jobs.max_jobs)
    env["NVCC_THREADS"] = str(jobs.nvcc_threads)
    env.update(dict(package.env))  # the recipe's own env wins
    return env


# ---- the plan -------------------------------------------------------------------------------
def make_plan(
    recipe: Recipe, *, jobs: int | None = None, only: tuple[str, ...] = (), cluster_cpus: int | None = None
) -> Plan:
    """Check the recipe and resolve it into a Plan; raises IncompatibleRecipeError with every problem.

    `cluster_cpus`: the cores of the sccache-dist cluster the compiles go to (build --dist); they size
    MAX_JOBS, which the plan hash leaves out, so a distributed build has the local build's plan.

    `only` plans (and checks) just the named packages: a flash-attn-only build is not refused
    for a vLLM pin it will not build.
    """
    selected = _select(recipe, only)
    problems, notes = check_compatibility(recipe, selected)
    if problems:
        raise IncompatibleRecipeError(str(recipe.path.name), problems)
    archs = len(facts.parse_arch_list(recipe.target.torch_cuda_arch_list))
    packages = []
    for package in selected:
        kind = registry.get(package.kind)
        chosen = choose_jobs(
            kind.job_memory_gb,
            archs,
            jobs=jobs or recipe.build.jobs,
            nvcc_threads=recipe.build.nvcc_threads,
            cluster_cpus=cluster_cpus,
        )
        patches = read_series(package.patches, tuple(d.name for d in package.dependencies)) if package.patches else ()
        packages.append(
            PackagePlan(
                name=package.name,
                version=package.version,
                source=package.source,
                patches=patches,
                dependencies=package.dependencies,
                env=tuple(sorted(_package_env(package, recipe, chosen).items())),
                command=BUILD_COMMAND,
                profile=package.profile,
                inference=package.inference,
                audit_optional=package.audit_optional,
                jobs=chosen,
                serving=package.serving,
                stand_in=package.stand_in,
                stand_ins=kind.stand_ins(package, recipe),
                rust_frontend=package.rust_frontend,
                kind=kind.name,
                measured=kind.measured_build(package, recipe.target.torch_cuda_arch_list),
            )
        )
    packages_t = tuple(packages)
    digest = _content_hash(recipe, packages_t)
    return Plan(
        recipe=recipe.path,
        target=recipe.target,
        toolchain=recipe.toolchain,
        build_type=recipe.build.build_type,
        packages=packages_t,
        notes=tuple(notes),
        hash=digest,
    )


def _select(recipe: Recipe, only: tuple[str, ...]) -> tuple[PackageRecipe, ...]:
    names = [p.name for p in recipe.packages]
    for name in only:
        if name not in names:
            raise RecipeError(
                f"{recipe.path.name}: --only {name}: the recipe has no package '{name}'",
                hint=typo_hint(name, names, f"packages: {', '.join(names)}"),
            )
    return tuple(p for p in recipe.packages if not only or p.name in only)


def plan_inputs(plan: Plan) -> dict:
    """Exactly what the plan hash covers, as JSON data: a lock records it to name what changed."""
    return _hashed_inputs(plan.target, plan.toolchain, plan.build_type, plan.packages)


def _hashed_inputs(target: Target, toolchain: Toolchain, build_type: str, packages: tuple[PackagePlan, ...]) -> dict:
    return {
        "schema": PLAN_SCHEMA,
        "target": asdict(target),
        "toolchain": asdict(toolchain),
        "build_type": build_type,
        "packages": [
            # The kind is left out: what it changes in a wheel is in env (and the hash stays as it was).
            {
                **{k: v for k, v in _package_json(p).items() if k not in ("jobs", "measured_build", "kind")},
                "env": {k: v for k, v in p.env if k not in SCHEDULING_ENV},
            }
            for p in packages
        ],
    }


def _content_hash(recipe: Recipe, packages: tuple[PackagePlan, ...]) -> str:
    hashed = _hashed_inputs(recipe.target, recipe.toolchain, recipe.build.build_type, packages)
    canonical = json.dumps(hashed, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()

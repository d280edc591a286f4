"""Recipe → Plan: every check that can be made before a download, the per-package build
environment (arch translation per package), the exact build command, and a content hash.

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
from gpuwheel.build.jobs import Jobs, choose_jobs
from gpuwheel.errors import IncompatibleRecipeError, RecipeError
from gpuwheel.patches import PatchRef, read_series
from gpuwheel.redact import safe_text, safe_tree
from gpuwheel.kinds import vllm as vllm_kind
from gpuwheel.recipe import (Dependency, InferenceProfile, PackageRecipe, Recipe, ServingProfile, Source, Target,
                             Toolchain, closest)

PLAN_SCHEMA = 1
# Placeholders the build backends substitute: the tree being built, where wheels go, and the
# directory holding a package's pre-fetched dependency trees (one sub-directory per name).
TREE, OUT, DEPS = "$GPUWHEEL_TREE", "$GPUWHEEL_OUT", "$GPUWHEEL_DEPS"
# Parallelism changes how fast a wheel is built, never what is in it: kept out of the hash.
SCHEDULING_ENV = ("MAX_JOBS", "NVCC_THREADS")
BUILD_COMMAND = ("python", "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-v",
                 "--wheel-dir", OUT, TREE)


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

    @property
    def env_dict(self) -> dict[str, str]:
        return dict(self.env)

    @property
    def profile_key(self) -> str:
        """How the vLLM kind's table of measured builds names this package's profile."""
        if self.serving:
            return vllm_kind.serving_key(self.serving.head_dims, self.serving.dtypes, self.serving.omit)
        return self.profile

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
            if p.stand_ins:
                out.append(f"stand in for {p.name} dependencies {', '.join(p.stand_ins)}: their installed files "
                           f"from {p.stand_in.location} (sha256 {p.stand_in.sha256[:12]}…)")
            if p.patches:
                out.append(f"patch {p.name}: {', '.join(r.name for r in p.patches)}")
            out.append(f"build {p.name}: {' '.join(p.command)}")
            out.append(f"finish, audit {p.name} for {self.target.compute_capability} / driver "
                       f"{self.target.min_driver}")
        return tuple(safe_text(step) for step in out)

    def to_json(self) -> dict:
        """The plan as shown and recorded: secrets masked (the build gets the real env from the Plan)."""
        return safe_tree({
            "schema": PLAN_SCHEMA,
            "hash": self.hash,
            "recipe": str(self.recipe),
            "target": asdict(self.target),
            "toolchain": asdict(self.toolchain),
            "build_type": self.build_type,
            "notes": list(self.notes),
            "steps": list(self.steps),
            "packages": [_package_json(p, self.target.torch_cuda_arch_list) for p in self.packages],
        })


def measured_build(package: PackagePlan, arch_list: str) -> vllm_kind.MeasuredBuild | None:
    """The measured cost of a build like this one, where the vLLM kind has one (else None)."""
    if package.name != "vllm":
        return None
    return vllm_kind.measured_build(package.version, arch_list, package.profile_key)


def _package_json(p: PackagePlan, target_archs: str = "") -> dict:
    return {
        "name": p.name,
        "version": p.version,
        "source": asdict(p.source),
        "patches": [{"name": r.name, "sha256": r.sha256, "strip": r.strip, "tree": r.tree or None}
                    for r in p.patches],
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
        "measured_build": asdict(m) if (m := measured_build(p, target_archs)) else None,
    }


# ---- compatibility --------------------------------------------------------------------------
def check_compatibility(recipe: Recipe, packages: tuple[PackageRecipe, ...] | None = None
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
            problems.append(f"arch {arch} needs CUDA ≥ {need} (recipe has {tc.cuda}): raise [toolchain] cuda "
                            f"or drop {arch}")
        max_major = facts.ARCH_MAX_CUDA_MAJOR.get(arch.plain)
        if max_major is not None and Version(cuda).major > max_major:
            problems.append(f"CUDA {Version(cuda).major} cannot build arch {arch} (dropped after CUDA "
                            f"{max_major}): use CUDA {max_major}.x or drop {arch}")
    if not any(facts.runs_natively(a, target_arch) for a in archs):
        problems.append(f"torch_cuda_arch_list '{t.torch_cuda_arch_list}' gives no native code for the target's "
                        f"compute capability {t.compute_capability}: add {t.compute_capability} to it")
    need_driver = facts.cuda_min_driver(tc.cuda)
    if need_driver is None:
        notes.append(f"CUDA {tc.cuda} is not in gpuwheel's driver table: its driver need is unchecked")
    elif facts.driver_tuple(t.min_driver) < facts.driver_tuple(need_driver):
        best = facts.driver_max_cuda(t.min_driver)
        problems.append(f"binaries from CUDA {cuda} need driver ≥ {need_driver} (fleet min_driver "
                        f"{t.min_driver}): use CUDA ≤ {best} or raise min_driver" if best else
                        f"binaries from CUDA {cuda} need driver ≥ {need_driver} (fleet min_driver "
                        f"{t.min_driver})")
    builds = facts.torch_cuda_builds(tc.torch)
    last = facts.cuda_last_torch(tc.cuda, tc.torch)
    if last is not None:
        # An older same-major build (cu126) is no stand-in: PyPI's torch is CUDA 13, and cu126 lacks Blackwell.
        has = f" (torch {facts.major_minor(tc.torch)} has {', '.join(builds)})" if builds else ""
        problems.append(f"torch {tc.torch} has no CUDA {cuda} build: PyTorch's {facts.cuda_tag(cuda)} wheels end "
                        f"with torch {last}{has}: use torch ≤ {last} with CUDA {cuda}, or a toolkit this torch "
                        f"is built for")
    elif builds is None:
        notes.append(f"torch {tc.torch} is not in gpuwheel's torch table: its CUDA builds are unchecked")
    elif not any(Version(b).major == Version(cuda).major for b in builds):
        problems.append(f"torch {tc.torch} has no CUDA {Version(cuda).major} build (it has "
                        f"{', '.join(builds)}): pick a toolkit of that major or another torch")
    elif cuda not in builds:
        notes.append(f"torch {tc.torch} has no cu{cuda.replace('.', '')} build ({', '.join(builds)}): "
                     f"extensions built with CUDA {cuda} run against its CUDA {Version(cuda).major}.x build")
    for package in recipe.packages if packages is None else packages:
        problems.extend(_package_problems(package, recipe, archs, notes))
    return problems, notes


def _package_problems(package: PackageRecipe, recipe: Recipe, archs, notes: list[str]) -> list[str]:
    problems = []
    torch = recipe.toolchain.torch
    if package.name == "vllm":
        pin = facts.VLLM_TORCH_PIN.get(package.version)
        if pin is None:
            notes.append(f"vLLM {package.version} is not in gpuwheel's pin table: its torch pin is unchecked")
        elif facts.major_minor(pin) != facts.major_minor(torch):
            problems.append(f"vLLM {package.version} pins torch {pin} (recipe has {torch}): set [toolchain] "
                            f"torch = \"{pin}\" or pick the vLLM release that pins {torch}")
        elif pin != torch:
            notes.append(f"vLLM {package.version} pins torch {pin}; recipe has {torch} (same ABI series)")
        if package.serving and package.version not in vllm_kind.SERVING_PROFILE_VERSIONS:
            problems.append(f"vLLM {package.version}: gpuwheel's serving profile exists for vLLM "
                            f"{', '.join(vllm_kind.SERVING_PROFILE_VERSIONS)} only (its patches): set "
                            f"profile = \"full\" or build one of those")
        if package.version not in vllm_kind.DEPENDENCY_ARCHS:
            notes.append(f"vLLM {package.version}: gpuwheel does not know which archs compile which of its "
                         f"dependencies: every dependency is fetched from its sources")
        elif package.stand_in is not None:
            standing = stand_ins(package, recipe)
            if standing:
                notes.append(f"vLLM {package.version}: {', '.join(standing)} stand in as the files "
                             f"{package.stand_in.location} installs from them (nothing of them is compiled for "
                             f"{recipe.target.torch_cuda_arch_list}" + (", or the serving profile leaves them out)"
                                                                        if package.serving and package.serving.omit
                                                                        else ")"))
    if package.name == "flash-attn":
        for arch in archs:
            fa = facts.flash_attn_arch(arch)
            if fa is None:
                problems.append(f"flash-attn has no kernels that run on {arch} (it builds "
                                f"{', '.join(f'sm_{n}' for n in facts.FLASH_ATTN_ARCHS)}): drop {arch}")
        if package.profile == "inference" and package.inference and "uneven_k" in package.inference.disable:
            bad = [d for d in package.inference.head_dims if d % 32 or (d > 128 and d % 64)]
            if bad:
                problems.append(f"flash-attn: disabling uneven_k needs head dims that are multiples of 32 "
                                f"up to 128 and of 64 above; {bad} are not")
    return problems


# ---- per-package environment ------------------------------------------------------------------
def _flash_attn_env(package: PackageRecipe, recipe: Recipe) -> dict[str, str]:
    archs = facts.parse_arch_list(recipe.target.torch_cuda_arch_list)
    fa = sorted({n for a in archs if (n := facts.flash_attn_arch(a)) is not None})
    env = {
        "FLASH_ATTN_CUDA_ARCHS": ";".join(str(n) for n in fa),
        "FLASH_ATTENTION_FORCE_BUILD": "TRUE",  # never download a prebuilt wheel
    }
    if package.profile == "inference" and package.inference:
        # Read by gpuwheel's flash-attn patch (patches/flash-attn/<v>/): prune TUs and switches.
        env["GPUWHEEL_FA_INFERENCE"] = "1"
        env["GPUWHEEL_FA_HEAD_DIMS"] = ";".join(str(d) for d in package.inference.head_dims)
        # Backward kernels and dropout are training-only: the profile always drops them.
        disabled = ("backward", "dropout", *(f for f in package.inference.disable if f != "dropout"))
        env["GPUWHEEL_FA_DISABLE"] = ";".join(f.upper() for f in disabled)
    return env


def _vllm_env(package: PackageRecipe, recipe: Recipe) -> dict[str, str]:
    env = {
        "VLLM_TARGET_DEVICE": "cuda",
        "TORCH_CUDA_ARCH_LIST": recipe.target.torch_cuda_arch_list,
        # Equal to the toolkit's version, so vLLM appends no +cuXYZ to its version.
        "VLLM_MAIN_CUDA_VERSION": facts.major_minor(recipe.toolchain.cuda),
        "CMAKE_BUILD_TYPE": recipe.build.build_type,
        **vllm_kind.rust_env(package.rust_frontend, str(package.cargo_vendor) if package.cargo_vendor else None),
    }
    if package.serving:
        env.update(vllm_kind.serving_env(package.serving.head_dims, package.serving.dtypes, package.serving.omit))
    cmake_args = ["-DFETCHCONTENT_FULLY_DISCONNECTED=ON"]  # no compile step touches the network
    for dep in package.dependencies:
        tree = f"{DEPS}/{dep.name}" + (f"/{dep.subdir}" if dep.subdir else "")
        if dep.src_dir_env:
            env[dep.src_dir_env] = tree
        else:
            cmake_args.append(f"-DFETCHCONTENT_SOURCE_DIR_{dep.fetchcontent_name.upper()}={tree}")
    env["CMAKE_ARGS"] = " ".join(cmake_args)
    return env


def stand_ins(package: PackageRecipe, recipe: Recipe) -> tuple[str, ...]:
    """The dependencies of a vLLM package that the recipe's archs never compile (or its serving
    profile leaves out) and that can stand in as Python files from the published wheel."""
    if package.name != "vllm" or package.stand_in is None:
        return ()
    archs = facts.parse_arch_list(recipe.target.torch_cuda_arch_list)
    omitted = vllm_kind.omitted_dependencies(package.serving.omit if package.serving else ())
    return tuple(dep.name for dep in package.dependencies
                 if vllm_kind.stand_in(package.version, dep.name) is not None
                 and (dep.name in omitted
                      or vllm_kind.compiled_for(package.version, dep.name, recipe.toolchain.cuda, archs) is False))


_PACKAGE_ENV = {"flash-attn": _flash_attn_env, "vllm": _vllm_env}


def _package_env(package: PackageRecipe, recipe: Recipe, jobs: Jobs) -> dict[str, str]:
    env = dict(_PACKAGE_ENV.get(package.name, lambda p, r: {
        "TORCH_CUDA_ARCH_LIST": r.target.torch_cuda_arch_list})(package, recipe))
    if package.source.kind == "git":
        # A git checkout has no sdist metadata: setuptools-scm would invent a dev version.
        env["SETUPTOOLS_SCM_PRETEND_VERSION"] = package.version
    env["MAX_JOBS"] = str(jobs.max_jobs)
    env["NVCC_THREADS"] = str(jobs.nvcc_threads)
    env.update(dict(package.env))  # the recipe's own env wins
    return env


# ---- the plan -------------------------------------------------------------------------------
def make_plan(recipe: Recipe, *, jobs: int | None = None, only: tuple[str, ...] = (),
              cluster_cpus: int | None = None) -> Plan:
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
        chosen = choose_jobs(package.name, archs, jobs=jobs or recipe.build.jobs,
                             nvcc_threads=recipe.build.nvcc_threads, cluster_cpus=cluster_cpus)
        patches = read_series(package.patches, tuple(d.name for d in package.dependencies)) \
            if package.patches else ()
        packages.append(PackagePlan(
            name=package.name, version=package.version, source=package.source, patches=patches,
            dependencies=package.dependencies, env=tuple(sorted(_package_env(package, recipe, chosen).items())),
            command=BUILD_COMMAND, profile=package.profile, inference=package.inference,
            audit_optional=package.audit_optional, jobs=chosen, serving=package.serving,
            stand_in=package.stand_in, stand_ins=stand_ins(package, recipe), rust_frontend=package.rust_frontend))
    packages_t = tuple(packages)
    digest = _content_hash(recipe, packages_t)
    return Plan(recipe=recipe.path, target=recipe.target, toolchain=recipe.toolchain,
                build_type=recipe.build.build_type, packages=packages_t, notes=tuple(notes), hash=digest)


def _select(recipe: Recipe, only: tuple[str, ...]) -> tuple[PackageRecipe, ...]:
    names = [p.name for p in recipe.packages]
    for name in only:
        if name not in names:
            close = closest(name, names)
            raise RecipeError(f"{recipe.path.name}: --only {name}: the recipe has no package '{name}'",
                              hint=f"did you mean '{close}'?" if close else f"packages: {', '.join(names)}")
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
            {**{k: v for k, v in _package_json(p).items() if k not in ("jobs", "measured_build")},
             "env": {k: v for k, v in p.env if k not in SCHEDULING_ENV}}
            for p in packages
        ],
    }


def _content_hash(recipe: Recipe, packages: tuple[PackagePlan, ...]) -> str:
    hashed = _hashed_inputs(recipe.target, recipe.toolchain, recipe.build.build_type, packages)
    canonical = json.dumps(hashed, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()

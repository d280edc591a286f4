"""What gpuwheel knows about building vLLM: data read from each pinned release's CMake, and the
few functions that turn a recipe into vLLM's build environment.

- Which archs make vLLM's CMake compile code from each FetchContent dependency
  (`cmake/external_projects/*.cmake` of that release). A dependency the recipe's archs never
  compile is still *read* — its Python files are installed into the wheel — so gpuwheel supplies
  a stand-in tree holding just those files, taken from vLLM's own published wheel of the same
  release (pinned by sha256 in the recipe) instead of needing the dependency's sources.
- The serving profile: which kernel families a recipe may leave out, and the variables that the
  profile patches of the release's patch set read.
- The optional Rust frontend (setuptools-rust, crates from crates.io) and how the build is kept
  from hanging on cargo where no crates registry is reachable.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from packaging.version import Version

from gpuwheel import facts
from gpuwheel.errors import RecipeError
from gpuwheel.kinds.base import DEPS, Kind, MeasuredBuild, SmokeGroup, StandIn, archs
from gpuwheel.provenance import Provenance
from gpuwheel.recipe_values import PackageRecipe, Recipe, ServingProfile, typo_hint
from gpuwheel.smoke import vllm as vllm_checks
from gpuwheel.smoke.report import FAIL, PASS, CheckResult

# ---- the torch each release pins ------------------------------------------------------------------
# vLLM release → torch it pins in requirements/cuda.txt, as its PyPI wheel's METADATA requires it
# (0.14.1, 0.15.x, 0.17.0, 0.18.1, 0.20.1, 0.20.2, 0.22.1, 0.25.x, 0.26.0, 0.27.0, 0.32.0, 0.33.0 read from
# PyPI 2026-11-30: docs/recipes.md, "Facts").
TORCH_PIN: dict[str, str] = {
    "0.10.1.1": "2.7.1",
    "0.10.2": "2.8.0",
    "0.11.0": "2.8.0",
    "0.11.1": "2.9.0",
    "0.11.2": "2.9.0",
    "0.12.0": "2.9.0",
    "0.13.0": "2.9.0",
    "0.14.0": "2.9.1",
    "0.14.1": "2.9.1",
    "0.15.0": "2.9.1",
    "0.15.1": "2.9.1",
    "0.16.0": "2.9.1",
    "0.17.0": "2.10.0",
    "0.17.1": "2.10.0",
    "0.18.0": "2.10.0",
    "0.18.1": "2.10.0",
    "0.19.0": "2.10.0",
    "0.19.1": "2.10.0",
    "0.20.0": "2.11.0",
    "0.20.1": "2.11.0",
    "0.20.2": "2.11.0",
    "0.21.0": "2.11.0",
    "0.22.0": "2.11.0",
    "0.22.1": "2.11.0",
    "0.23.0": "2.11.0",
    "0.24.0": "2.11.0",
    "0.25.0": "2.11.0",
    "0.25.1": "2.11.0",
    "0.26.0": "2.11.0",
    "0.27.0": "2.13.0",
    "0.27.1": "2.13.0",
    "0.28.0": "2.13.0",
    "0.29.0": "2.13.0",
    "0.30.0": "2.13.0",
    "0.31.0": "2.13.0",
    "0.32.0": "2.13.0",
    "0.33.0": "2.14.0",
}


# ---- what the CUDA toolkit must hold ---------------------------------------------------------------
# vLLM's CMake links CUDA::nvrtc and CUDA::cuda_driver (the driver's link stub) and includes cuBLAS's
# headers, beyond nvcc and the runtime. A toolkit without them (the nvcc-only PyPI wheels, a trimmed
# install) fails half a minute into configure with "CUDA_nvrtc_LIBRARY … NOTFOUND" or "cublas_v2.h:
# No such file" (seen here, 2026-12-06).
TOOLKIT_FILES = ("libnvrtc.so", "libcuda.so", "cublas_v2.h")


# ---- what the audit allows ---------------------------------------------------------------------------
# vLLM dispatches to these only on the GPUs they are built for (FlashMLA and FA3 on Hopper, the sm_100
# attention kernels on Blackwell datacenter parts): no code for other archs is by design.
AUDIT_OPTIONAL = (
    "vllm/_flashmla*.so",
    "vllm/vllm_flash_attn/_vllm_fa3_C*.so",
    "vllm/*fmha_sm100*.so",
    "vllm/*fa4*.so",
    "vllm/_qutlass_C*.so",
    "vllm/*deep_gemm*.so",
)


# ---- which archs compile which dependency -------------------------------------------------------
# Per vLLM release, dependency → rows of (oldest CUDA, arch entries of its CMake list). The row of
# the newest CUDA ≤ the recipe's applies. ALWAYS: compiled (or its headers used) for any CUDA arch;
# PYTHON_ONLY: nothing of it is ever compiled, only files copied into the wheel.
ArchRows = tuple[tuple[str, tuple[str, ...]], ...]
ALWAYS: str = "always"
PYTHON_ONLY: ArchRows = ()
DEPENDENCY_ARCHS: dict[str, dict[str, str | ArchRows]] = {
    "0.26.0": {
        "cutlass": ALWAYS,  # CMakeLists.txt: the headers of every CUTLASS kernel of _C
        "vllm-flash-attn": ALWAYS,  # vllm_flash_attn.cmake: FA2 "8.0+PTX" builds for any arch ≥ 8.0
        "deepgemm": (
            ("12.3", ("9.0a",)),
            ("12.8", ("9.0a", "10.0a", "12.0a", "12.1a")),  # deepgemm.cmake
            ("12.9", ("9.0a", "10.0f", "12.0a", "12.1a")),
            ("13.0", ("9.0a", "10.0f", "12.0f")),
        ),
        "qutlass": (("12.8", ("10.0a", "10.3a", "12.0a", "12.1a")), ("13.0", ("10.0f", "12.0f"))),  # qutlass.cmake
        "flashmla": (("12.3", ("9.0a",)), ("12.8", ("9.0a", "10.0a")), ("12.9", ("9.0a", "10.0f"))),  # flashmla.cmake
        "fmha_sm100": PYTHON_ONLY,  # fmha_sm100.cmake: installs python/fmha_sm100, compiles nothing
        "tml_fa4": PYTHON_ONLY,  # tml_fa4.cmake: installs flash_attn/cute/*.py, compiles nothing
        "triton_kernels": PYTHON_ONLY,  # triton_kernels.cmake: installs *.py, compiles nothing
    },
}


def compiled_for(version: str, dependency: str, cuda: str, archs: tuple[facts.Arch, ...]) -> bool | None:
    """Whether vLLM `version` compiles anything of `dependency` for these archs; None: unknown."""
    table = DEPENDENCY_ARCHS.get(version, {}).get(dependency)
    if table is None:
        return None
    if isinstance(table, str):  # ALWAYS, the one string
        return True
    rows = [entries for min_cuda, entries in table if Version(facts.major_minor(cuda)) >= Version(min_cuda)]
    entries = rows[-1] if rows else ()
    return any(_loosely_matches(facts.parse_arch(entry), arch) for entry in entries for arch in archs)


def _loosely_matches(entry: facts.Arch, arch: facts.Arch) -> bool:
    """vLLM's cuda_archs_loose_intersection for one pair: a plain or `a` entry takes its own
    major.minor (a requested 9.0 becomes 9.0a); an `f` entry takes its family's later minors."""
    if entry.major != arch.major:
        return False
    return arch.minor >= entry.minor if entry.suffix == "f" else arch.minor == entry.minor


# ---- stand-in trees ------------------------------------------------------------------------------
STAND_INS: dict[str, dict[str, StandIn]] = {
    "0.26.0": {
        # flashmla.cmake reads flash_mla/flash_mla_interface.py and inserts an import of _flashmla_C.
        "flashmla": StandIn(
            "vllm/third_party/flashmla/flash_mla_interface.py",
            "flash_mla/flash_mla_interface.py",
            rewrite=(
                "flash_mla_cuda = torch.ops._flashmla_C",
                "import vllm._flashmla_C\nflash_mla_cuda = torch.ops._flashmla_C",
            ),
        ),
        # fmha_sm100.cmake copies python/fmha_sm100/{*.py, csrc/, cute/, cutlass/…} verbatim.
        "fmha_sm100": StandIn("vllm/third_party/fmha_sm100/", "python/fmha_sm100/"),
        # tml_fa4.cmake copies flash_attn/cute/*.py, renaming the package in their imports.
        "tml_fa4": StandIn(
            "vllm/third_party/tml_fa4/",
            "flash_attn/cute/",
            rewrite=("flash_attn.cute", "vllm.third_party.tml_fa4"),
            suffixes=(".py",),
        ),
        # triton_kernels.cmake copies python/triton_kernels/triton_kernels/**/*.py verbatim.
        "triton_kernels": StandIn(
            "vllm/third_party/triton_kernels/", "python/triton_kernels/triton_kernels/", suffixes=(".py",)
        ),
    },
}


def stand_in(version: str, dependency: str) -> StandIn | None:
    return STAND_INS.get(version, {}).get(dependency)


# ---- the serving profile -------------------------------------------------------------------------
# Kernel families a serving recipe may leave out, what each serves, and the dependency whose
# sources are then no longer needed. Read by the profile patches through GPUWHEEL_VLLM_OMIT.
OMITTABLE: dict[str, tuple[str, str | None]] = {
    "fa3": ("FlashAttention 3 (Hopper attention; FA2 serves Hopper without it)", None),
    "flashmla": ("FlashMLA (MLA attention of DeepSeek-class models on Hopper/Blackwell)", "flashmla"),
    "marlin": ("Marlin GEMMs (GPTQ/AWQ-style int4/int8 weights, FP8/FP4 weight-only fallbacks; dense and MoE)", None),
}
HEAD_DIMS = (32, 64, 96, 128, 192, 256)  # FA2's kernel buckets in vllm-flash-attn
# The releases whose shipped patch set carries the profile patches (0004-0007 and 0009 of 0.26.0): for
# another, the variables would be read by nothing and the build would silently be the full one.
SERVING_PROFILE_VERSIONS = ("0.26.0",)
DTYPES = ("fp16", "bf16")


# The serving profile's patch that leaves out FA2's split-KV kernels appending new keys to the cache
# (unreachable from vLLM's own Python); a wheel whose provenance lists it must refuse such calls.
APPEND_KV_PATCH = "0012-vllm-flash-attn-fa2-no-append-kv.patch"


def omitted_dependencies(omit: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dep for family in omit if (dep := OMITTABLE[family][1]))


def serving_env(head_dims: tuple[int, ...], dtypes: tuple[str, ...], omit: tuple[str, ...]) -> dict[str, str]:
    """The variables the serving-profile patches read (patches/vllm/<version>/)."""
    return {
        "GPUWHEEL_VLLM_SERVING": "1",
        "GPUWHEEL_VLLM_FA2_HEAD_DIMS": ";".join(map(str, head_dims)),
        "GPUWHEEL_VLLM_FA2_DTYPES": ";".join(dtypes),
        "GPUWHEEL_VLLM_OMIT": ";".join(omit),
    }


# ---- the Rust frontend ---------------------------------------------------------------------------
# "off": never built (the same wheel on every host); "optional": built when cargo and the crates
# are at hand; "required": the build fails without it. Cargo never touches the network: crates
# come from a vendored directory (`cargo vendor`) or not at all, so no build hangs on crates.io.
RUST_MODES = ("off", "optional", "required")
# What the Rust frontend puts into vLLM's wheel (tools/build_rust.py of 0.26.0).
RUST_MEMBERS = ("vllm/vllm-rs", "vllm/_rust_")


# Set in the build environment when the recipe names vendored crates; the patch stage then writes
# cargo's source replacement into the tree (cargo_config()), where cargo, run from the tree, reads it.
CARGO_VENDOR_ENV = "GPUWHEEL_CARGO_VENDOR"


def rust_env(mode: str, vendor_dir: str | None) -> dict[str, str]:
    env = {"CARGO_NET_OFFLINE": "true"}
    if mode == "off":
        env["CARGO"] = "false"  # setuptools-rust finds no cargo and skips the optional extensions
    if mode == "required":
        env["VLLM_REQUIRE_RUST_FRONTEND"] = "1"
    if vendor_dir:
        env[CARGO_VENDOR_ENV] = vendor_dir
    return env


def tree_files(version: str, env: Mapping[str, str]) -> dict[str, str]:
    """Cargo's source replacement where the recipe names vendored crates (cargo, run from the tree, reads
    it), and the compile order table where the build has one (patch 0011 reads it)."""
    files = {}
    if vendor := env.get(CARGO_VENDOR_ENV):
        files[".cargo/config.toml"] = cargo_config(vendor)
    # Only the table build_env named: a value the recipe's own env set is the recipe's to provide.
    measured = COMPILE_ORDERS.get((version, env.get("TORCH_CUDA_ARCH_LIST", "")))
    if env.get(COMPILE_ORDER_ENV) == COMPILE_ORDER_FILE and measured:
        files[COMPILE_ORDER_FILE] = (COMPILE_ORDER_DIR / measured[1]).read_text(encoding="utf-8")
    return files


def components(rust_frontend: str, members: frozenset[str]) -> dict[str, Any]:
    """Whether the wheel holds the Rust frontend, and what the recipe asked of it."""
    rust = sorted(m for m in members if m.startswith(RUST_MEMBERS))
    return {"rust_frontend": {"mode": rust_frontend, "in_wheel": bool(rust), "members": rust}}


def cargo_config(vendor_dir: str) -> str:
    """`.cargo/config.toml` replacing crates.io with the vendored crates, as `cargo vendor` prints it.
    (Cargo does not take a replacement source from environment variables alone: tried, 1.95.)"""
    # A JSON string is a valid TOML basic string: quotes and backslashes in the path stay escaped.
    return (
        '[source.crates-io]\nreplace-with = "vendored-sources"\n\n'
        f"[source.vendored-sources]\ndirectory = {json.dumps(vendor_dir)}\n"
    )


# ---- what a build costs ----------------------------------------------------------------------------
# (release, TORCH_CUDA_ARCH_LIST, profile) → the measured build. profile: "full", or
# "serving:<head dims>:<dtypes>:<omitted families>" as serving_key() writes it.
MEASURED_BUILDS: dict[tuple[str, str, str], MeasuredBuild] = {
    ("0.26.0", "12.0", "full"): MeasuredBuild(
        31924, 1041, "stock vLLM 0.26.0, 397 steps on nvidia-h200-x2 (shared/ENVIRONMENT.md, 2026-11-30)"
    ),
    # The shipped serving recipes with patches 0001-0012, both on one H100 host's 16 cores (2026-12-06,
    # docs/gpu-runs.md); the stock figure's 32-core H200 host had a slower CPU (docs/benchmarks.md).
    ("0.26.0", "9.0a", "serving:128:fp16,bf16:fa3,flashmla"): MeasuredBuild(
        7261, 178, "docs/runs/ninja-h200-torch211-serving-0012-h100x16.log (gpuwheel build on nvidia-h100-x1)"
    ),
    ("0.26.0", "12.0", "serving:128:fp16,bf16:"): MeasuredBuild(
        5101, 140, "docs/runs/ninja-rtx6000pro-torch211-serving-0012-h100x16.log (gpuwheel build on nvidia-h100-x1)"
    ),
    # Before patch 0012 (its FA2 split-KV TUs ~1.8x longer), on another H100 host
    ("0.26.0", "12.0", "serving:128:fp16,bf16:marlin"): MeasuredBuild(
        3830, 203, "docs/runs/ninja-rtx6000pro-torch211-nomarlin-h100x16.log (gpuwheel build, an H100 host)"
    ),
}


# ---- the order of compiles -------------------------------------------------------------------------
# Patch 0011 makes ninja start the compiles in the order of a table, longest first, made from a measured
# build's .ninja_log (`benchmarks/build_vllm.py LOG --write-order`). (release, arch list) → the serving
# profile of that build and its table. A build gets the table only where it compiles no TU that build
# did not (the same or fewer head dims and dtypes, the same or more families left out): an object the
# table lacks starts after every listed one, and a long one (FA3's, for a table measured without FA3)
# would then end the build late. Objects the build lacks order nothing.
COMPILE_ORDER_DIR = Path(__file__).parent / "vllm_compile_order"
COMPILE_ORDER_ENV = "GPUWHEEL_VLLM_COMPILE_ORDER"
COMPILE_ORDER_FILE = ".gpuwheel-compile-order.tsv"  # in the tree, where CMake reads it
COMPILE_ORDERS: dict[tuple[str, str], tuple[ServingProfile, str]] = {
    # docs/runs/ninja-{rtx6000pro,h200}-torch211-serving-0012-h100x16.log (16 cores of one H100 host)
    ("0.26.0", "12.0"): (ServingProfile(head_dims=(128,), dtypes=("fp16", "bf16")), "0.26.0-12.0.tsv"),
    ("0.26.0", "9.0a"): (
        ServingProfile(head_dims=(128,), dtypes=("fp16", "bf16"), omit=("fa3", "flashmla")),
        "0.26.0-9.0a.tsv",
    ),
}


def has_compile_order(package: PackageRecipe, arch_list: str) -> bool:
    """Whether a measured table orders every compile of this build (see COMPILE_ORDERS)."""
    measured = COMPILE_ORDERS.get((package.version, arch_list))
    serving = package.serving
    return bool(
        measured
        and serving
        and set(serving.head_dims) <= set(measured[0].head_dims)
        and set(serving.dtypes) <= set(measured[0].dtypes)
        and set(serving.omit) >= set(measured[0].omit)
    )


def serving_key(head_dims: tuple[int, ...], dtypes: tuple[str, ...], omit: tuple[str, ...]) -> str:
    return f"serving:{','.join(map(str, head_dims))}:{','.join(dtypes)}:{','.join(omit)}"


def measured_build(package: PackageRecipe, arch_list: str) -> MeasuredBuild | None:
    """The measured cost of a build like this one: same release, arch list and profile."""
    profile = (
        serving_key(package.serving.head_dims, package.serving.dtypes, package.serving.omit)
        if package.serving
        else package.profile
    )
    return MEASURED_BUILDS.get((package.version, arch_list, profile))


# ---- the recipe's serving table ------------------------------------------------------------------
def serving_profile(spec: dict, where) -> ServingProfile:
    """[package.serving] checked: `where(key)` names the file:line of a key for errors."""
    head_dims = tuple(sorted(set(spec.get("head_dims", HEAD_DIMS))))
    dtypes = tuple(d for d in DTYPES if d in spec.get("dtypes", DTYPES))
    for key, values, valid in (
        ("head_dims", spec.get("head_dims", ()), HEAD_DIMS),
        ("dtypes", spec.get("dtypes", ()), DTYPES),
        ("omit", spec.get("omit", ()), tuple(OMITTABLE)),
    ):
        for value in values:
            if value not in valid:
                raise RecipeError(
                    f"{where(f'serving.{key}')}: '{value}' is not one of vLLM's FA2 {key.replace('_', ' ')}"
                    if key != "omit"
                    else f"{where('serving.omit')}: '{value}' is no kernel family gpuwheel can leave out of vLLM",
                    hint=typo_hint(str(value), [str(v) for v in valid], f"choose from {', '.join(map(str, valid))}"),
                )
    if not head_dims or not dtypes:
        raise RecipeError(
            f"{where('serving')}: the serving profile builds no FA2 kernels",
            hint="keep at least one head dim and one dtype",
        )
    return ServingProfile(head_dims=head_dims, dtypes=dtypes, omit=tuple(sorted(set(spec.get("omit", ())))))


# ---- the kind ------------------------------------------------------------------------------------
def build_env(package: PackageRecipe, recipe: Recipe) -> dict[str, str]:
    env = {
        "VLLM_TARGET_DEVICE": "cuda",
        "TORCH_CUDA_ARCH_LIST": recipe.target.torch_cuda_arch_list,
        # Equal to the toolkit's version, so vLLM appends no +cuXYZ to its version.
        "VLLM_MAIN_CUDA_VERSION": facts.major_minor(recipe.toolchain.cuda),
        "CMAKE_BUILD_TYPE": recipe.build.build_type,
        **rust_env(package.rust_frontend, str(package.cargo_vendor) if package.cargo_vendor else None),
    }
    if package.serving:
        env.update(serving_env(package.serving.head_dims, package.serving.dtypes, package.serving.omit))
    if has_compile_order(package, recipe.target.torch_cuda_arch_list):
        env[COMPILE_ORDER_ENV] = COMPILE_ORDER_FILE
    cmake_args = ["-DFETCHCONTENT_FULLY_DISCONNECTED=ON"]  # no compile step touches the network
    for dep in package.dependencies:
        tree = f"{DEPS}/{dep.name}" + (f"/{dep.subdir}" if dep.subdir else "")
        if dep.src_dir_env:
            env[dep.src_dir_env] = tree
        elif dep.fetchcontent_name:  # the recipe check requires one of the two
            cmake_args.append(f"-DFETCHCONTENT_SOURCE_DIR_{dep.fetchcontent_name.upper()}={tree}")
    env["CMAKE_ARGS"] = " ".join(cmake_args)
    return env


def problems(package: PackageRecipe, recipe: Recipe, notes: list[str]) -> list[str]:
    found = []
    torch = recipe.toolchain.torch
    pin = TORCH_PIN.get(package.version)
    if pin is None:
        notes.append(f"vLLM {package.version} is not in gpuwheel's pin table: its torch pin is unchecked")
    elif facts.major_minor(pin) != facts.major_minor(torch):
        found.append(
            f"vLLM {package.version} pins torch {pin} (recipe has {torch}): set [toolchain] "
            f'torch = "{pin}" or pick the vLLM release that pins {torch}'
        )
    elif pin != torch:
        notes.append(f"vLLM {package.version} pins torch {pin}; recipe has {torch} (same ABI series)")
    if package.serving and package.version not in SERVING_PROFILE_VERSIONS:
        found.append(
            f"vLLM {package.version}: gpuwheel's serving profile exists for vLLM "
            f"{', '.join(SERVING_PROFILE_VERSIONS)} only (its patches): set "
            f'profile = "full" or build one of those'
        )
    if package.version not in DEPENDENCY_ARCHS:
        notes.append(
            f"vLLM {package.version}: gpuwheel does not know which archs compile which of its "
            f"dependencies: every dependency is fetched from its sources"
        )
    elif package.stand_in is not None:
        standing = stand_ins(package, recipe)
        if standing:
            notes.append(
                f"vLLM {package.version}: {', '.join(standing)} stand in as the files "
                f"{package.stand_in.location} installs from them (nothing of them is compiled for "
                f"{recipe.target.torch_cuda_arch_list}"
                + (", or the serving profile leaves them out)" if package.serving and package.serving.omit else ")")
            )
    return found


def stand_ins(package: PackageRecipe, recipe: Recipe) -> tuple[str, ...]:
    """The dependencies that the recipe's archs never compile (or its serving profile leaves out)
    and that can stand in as Python files from the published wheel."""
    if package.stand_in is None:
        return ()
    omitted = omitted_dependencies(package.serving.omit if package.serving else ())
    return tuple(
        dep.name
        for dep in package.dependencies
        if stand_in(package.version, dep.name) is not None
        and (
            dep.name in omitted
            or compiled_for(package.version, dep.name, recipe.toolchain.cuda, archs(recipe)) is False
        )
    )


# ---- smoke ---------------------------------------------------------------------------------------
def built_serving(provenance: Provenance | None) -> dict[str, list] | None:
    """The serving profile as gpuwheel.json records it (build.serving), or None (a full build, or a
    wheel gpuwheel did not build)."""
    serving = provenance.build.serving if provenance and provenance.build else None
    if serving is None:
        return None
    try:
        head_dims = sorted(int(d) for d in serving.get("head_dims") or vllm_checks.FA2_HEAD_DIMS)
    except (TypeError, ValueError):
        return None
    dtypes = [d for d in vllm_checks.FA2_DTYPES if d in (serving.get("dtypes") or vllm_checks.FA2_DTYPES)]
    omit = [str(o) for o in serving.get("omit") or ()]
    return {"head_dims": head_dims, "dtypes": dtypes, "omit": omit}


def op_libraries(shared_objects: tuple[str, ...]) -> list[dict[str, Any]]:
    """The wheel's op libraries, named and with the ops each must register (smoke/vllm.py OP_LIBRARIES)."""
    found = []
    for name, globs, ops in vllm_checks.OP_LIBRARIES:
        path = next((m for g in globs for m in shared_objects if fnmatch.fnmatch(m, g)), None)
        if path is not None:
            found.append({"name": name, "path": path, "ops": {ns: list(names) for ns, names in ops.items()}})
    return found


def smoke_groups(
    project: str, provenance: Provenance | None, shared_objects: tuple[str, ...], work: Path
) -> tuple[SmokeGroup, ...]:
    serving = built_serving(provenance)
    dtypes: list[str] = serving["dtypes"] if serving else list(vllm_checks.FA2_DTYPES)
    fa2: dict[str, Any] = {"head_dims": serving["head_dims"] if serving else None, "dtypes": dtypes}
    if serving and provenance and any(p.get("name") == APPEND_KV_PATCH for p in provenance.patches or ()):
        fa2["append_kv"] = False
    spec = {
        "root": None,
        "moe_permute_file": None,
        "op_libraries": op_libraries(shared_objects),
        "fa2": fa2,
        "omit": serving["omit"] if serving else [],
    }
    built = f"head dims {', '.join(map(str, serving['head_dims']))}" if serving else "every head dim"
    # the profile's head dim (128 in the shipped recipes) and dtype, bf16 where built
    head_dim = 128 if not serving or 128 in serving["head_dims"] else serving["head_dims"][0]
    dtype = "bf16" if "bf16" in dtypes else dtypes[0]
    return (
        SmokeGroup("vllm-ops", spec, "op libraries load and register their ops", needs_gpu=False),
        SmokeGroup("vllm", spec, f"FA2 varlen ({built}), moe_permute and MoE at 8192 tokens"),
        SmokeGroup("vllm-fa2-errors", spec, "what the serving profile left out of FA2 raises"),
        SmokeGroup("vllm-boundary", spec, "moe_permute refuses mismatched rows at 8192 tokens"),
        *(
            SmokeGroup(
                "vllm-generate",
                {"workdir": str(work / "model"), "head_dim": head_dim, "dtype": dtype, "enforce_eager": eager},
                f"tiny model generating with 8192-token chunked prefill ({'eager' if eager else 'compiled'})",
            )
            for eager in (False, True)
        ),
    )


def libraries_check(provenance: Provenance | None, shared_objects: tuple[str, ...]) -> tuple[CheckResult, ...]:
    """The op libraries the engine needs are in the wheel; those the serving profile omits are not."""
    name = "op libraries in the wheel"
    serving = built_serving(provenance)
    present = {lib["name"]: lib["path"] for lib in op_libraries(shared_objects)}
    missing = [f"{lib} ({' or '.join(globs)})" for lib, globs, _ in vllm_checks.OP_LIBRARIES if lib not in present]
    omitted = [family for family in (serving or {}).get("omit", ()) if family in vllm_checks.OMITTABLE_LIBRARIES]
    leftover = [
        m
        for family in omitted
        for g in vllm_checks.OMITTABLE_LIBRARIES[family]
        for m in shared_objects
        if fnmatch.fnmatch(m, g)
    ]
    found = [f"the wheel has no {', '.join(missing)}"] if missing else []
    if leftover:
        found.append(f"the serving profile omits {', '.join(omitted)}, yet the wheel has {', '.join(leftover)}")
    if found:
        return (CheckResult(name, FAIL, "; ".join(found)),)
    detail = ", ".join(f"{lib} ({path})" for lib, path in present.items())
    if omitted:
        detail += f"; left out by the serving profile: {', '.join(omitted)}"
    return (CheckResult(name, PASS, detail),)


KIND = Kind(
    name="vllm",
    build_env=build_env,
    problems=problems,
    profiles=("serving",),
    # Its cutlass TUs peak at ~3–4 GB per arch (vLLM's own docs size MAX_JOBS so).
    job_memory_gb=(4.0, 1.5),
    stand_ins=stand_ins,
    stand_in_layout=stand_in,
    tree_files=tree_files,
    components=components,
    toolkit_files=TOOLKIT_FILES,
    audit_optional=AUDIT_OPTIONAL,
    smoke_groups=smoke_groups,
    smoke_checks=libraries_check,
    measured_build=measured_build,
)

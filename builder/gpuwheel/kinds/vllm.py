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

import json
from dataclasses import dataclass

from packaging.version import Version

from gpuwheel import facts

# ---- what the CUDA toolkit must hold ---------------------------------------------------------------
# vLLM's CMake links CUDA::nvrtc and CUDA::cuda_driver (the driver's link stub) and includes cuBLAS's
# headers, beyond nvcc and the runtime. A toolkit without them (the nvcc-only PyPI wheels, a trimmed
# install) fails half a minute into configure with "CUDA_nvrtc_LIBRARY … NOTFOUND" or "cublas_v2.h:
# No such file" (seen here, 2026-12-06).
TOOLKIT_FILES = ("libnvrtc.so", "libcuda.so", "cublas_v2.h")


# ---- which archs compile which dependency -------------------------------------------------------
# Per vLLM release, dependency → rows of (oldest CUDA, arch entries of its CMake list). The row of
# the newest CUDA ≤ the recipe's applies. ALWAYS: compiled (or its headers used) for any CUDA arch;
# PYTHON_ONLY: nothing of it is ever compiled, only files copied into the wheel.
ALWAYS, PYTHON_ONLY = "always", ()
DEPENDENCY_ARCHS: dict[str, dict[str, object]] = {
    "0.26.0": {
        "cutlass": ALWAYS,  # CMakeLists.txt: the headers of every CUTLASS kernel of _C
        "vllm-flash-attn": ALWAYS,  # vllm_flash_attn.cmake: FA2 "8.0+PTX" builds for any arch ≥ 8.0
        "deepgemm": (("12.3", ("9.0a",)), ("12.8", ("9.0a", "10.0a", "12.0a", "12.1a")),  # deepgemm.cmake
                     ("12.9", ("9.0a", "10.0f", "12.0a", "12.1a")), ("13.0", ("9.0a", "10.0f", "12.0f"))),
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
    if table == ALWAYS:
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
@dataclass(frozen=True)
class StandIn:
    """Where a dependency's Python files sit in vLLM's wheel and in the dependency's own tree.

    `rewrite` is the text replacement vLLM's CMake applies while installing (source → wheel);
    the stand-in undoes it, and the undo is checked to give the wheel's bytes back exactly.
    """

    wheel_dir: str  # e.g. vllm/third_party/fmha_sm100/
    tree_dir: str  # where those files go in the stand-in tree
    rewrite: tuple[str, str] | None = None  # (in the dependency's file, in the wheel's)
    suffixes: tuple[str, ...] = ()  # only files ending so; () = every file


STAND_INS: dict[str, dict[str, StandIn]] = {
    "0.26.0": {
        # flashmla.cmake reads flash_mla/flash_mla_interface.py and inserts an import of _flashmla_C.
        "flashmla": StandIn("vllm/third_party/flashmla/flash_mla_interface.py", "flash_mla/flash_mla_interface.py",
                            rewrite=("flash_mla_cuda = torch.ops._flashmla_C",
                                     "import vllm._flashmla_C\nflash_mla_cuda = torch.ops._flashmla_C")),
        # fmha_sm100.cmake copies python/fmha_sm100/{*.py, csrc/, cute/, cutlass/…} verbatim.
        "fmha_sm100": StandIn("vllm/third_party/fmha_sm100/", "python/fmha_sm100/"),
        # tml_fa4.cmake copies flash_attn/cute/*.py, renaming the package in their imports.
        "tml_fa4": StandIn("vllm/third_party/tml_fa4/", "flash_attn/cute/",
                           rewrite=("flash_attn.cute", "vllm.third_party.tml_fa4"), suffixes=(".py",)),
        # triton_kernels.cmake copies python/triton_kernels/triton_kernels/**/*.py verbatim.
        "triton_kernels": StandIn("vllm/third_party/triton_kernels/", "python/triton_kernels/triton_kernels/",
                                  suffixes=(".py",)),
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
}
HEAD_DIMS = (32, 64, 96, 128, 192, 256)  # FA2's kernel buckets in vllm-flash-attn
# The releases whose shipped patch set carries the profile patches (0004-0007 of 0.26.0): for
# another, the variables would be read by nothing and the build would silently be the full one.
SERVING_PROFILE_VERSIONS = ("0.26.0",)
DTYPES = ("fp16", "bf16")


def omitted_dependencies(omit: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dep for family in omit if (dep := OMITTABLE[family][1]))


def serving_env(head_dims: tuple[int, ...], dtypes: tuple[str, ...], omit: tuple[str, ...]) -> dict[str, str]:
    """The variables the serving-profile patches read (patches/vllm/<version>/)."""
    return {"GPUWHEEL_VLLM_SERVING": "1",
            "GPUWHEEL_VLLM_FA2_HEAD_DIMS": ";".join(map(str, head_dims)),
            "GPUWHEEL_VLLM_FA2_DTYPES": ";".join(dtypes),
            "GPUWHEEL_VLLM_OMIT": ";".join(omit)}


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


def cargo_config(vendor_dir: str) -> str:
    """`.cargo/config.toml` replacing crates.io with the vendored crates, as `cargo vendor` prints it.
    (Cargo does not take a replacement source from environment variables alone: tried, 1.95.)"""
    # A JSON string is a valid TOML basic string: quotes and backslashes in the path stay escaped.
    return ('[source.crates-io]\nreplace-with = "vendored-sources"\n\n'
            f'[source.vendored-sources]\ndirectory = {json.dumps(vendor_dir)}\n')


# ---- what a build costs ----------------------------------------------------------------------------
@dataclass(frozen=True)
class MeasuredBuild:
    """A vLLM build measured from its .ninja_log (benchmarks/build_vllm.py): the compile steps' CPU-s
    and the longest step, which no number of cores or build servers goes below."""

    cpu_s: float
    longest_s: float
    source: str  # where the figures come from

    def predicted_wall_s(self, cores: int) -> float:
        return max(self.cpu_s / max(cores, 1), self.longest_s)


# (release, TORCH_CUDA_ARCH_LIST, profile) → the measured build. profile: "full", or
# "serving:<head dims>:<dtypes>:<omitted families>" as serving_key() writes it.
MEASURED_BUILDS: dict[tuple[str, str, str], MeasuredBuild] = {
    ("0.26.0", "12.0", "full"): MeasuredBuild(
        31924, 1041, "stock vLLM 0.26.0, 397 steps on nvidia-h200-x2 (shared/ENVIRONMENT.md, 2026-11-30)"),
    ("0.26.0", "9.0a", "serving:128:fp16,bf16:fa3,flashmla"): MeasuredBuild(
        10643, 369, "docs/runs/ninja-h200-torch211-serving.log (gpuwheel build on nvidia-h200-x2)"),
    # An H100 host whose CPU took 0.70x the H200 host's CPU-s for the same 9.0a profile (docs/benchmarks.md)
    ("0.26.0", "12.0", "serving:128:fp16,bf16:"): MeasuredBuild(
        4973, 183, "docs/runs/ninja-rtx6000pro-torch211-serving-h100x16.log (gpuwheel build on nvidia-h100-x1)"),
}


def serving_key(head_dims: tuple[int, ...], dtypes: tuple[str, ...], omit: tuple[str, ...]) -> str:
    return f"serving:{','.join(map(str, head_dims))}:{','.join(dtypes)}:{','.join(omit)}"


def measured_build(version: str, arch_list: str, profile: str) -> MeasuredBuild | None:
    return MEASURED_BUILDS.get((version, arch_list, profile))

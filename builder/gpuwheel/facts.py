"""Facts about the CUDA world that gpuwheel checks recipes and binaries against.

Data only: every table cites what it encodes, and the few functions below just look
things up in it. Where a fact changes (a new toolkit, a new vLLM), change the table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from packaging.version import Version

# Minimum CUDA toolkit that can emit SASS for a plain arch (NVIDIA CUDA release notes; LLVM's
# clang/lib/Basic/Cuda.cpp MinVersionForOffloadArch for 7.2 → 9.1, 8.8 → 13.0; 5.2 came with CUDA 6.5's
# GTX 9xx release). `nvcc --list-gpu-arch` of CUDA 13.0 lists sm_75 … sm_121 with sm_88, no sm_101.
ARCH_MIN_CUDA: dict[str, str] = {
    "5.0": "6.0",
    "5.2": "6.5",
    "5.3": "7.0",
    "6.0": "8.0",
    "6.1": "8.0",
    "6.2": "8.0",
    "7.0": "9.0",
    "7.2": "9.1",
    "7.5": "10.0",
    "8.0": "11.0",
    "8.6": "11.1",
    "8.7": "11.4",
    "8.8": "13.0",
    "8.9": "11.8",
    "9.0": "11.8",
    "10.0": "12.8",
    "10.1": "12.8",
    "10.3": "12.9",
    "11.0": "13.0",
    "12.0": "12.8",
    "12.1": "12.9",
}
# Arch-specific ("a") and family ("f") variants need newer toolkits than the plain arch.
SUFFIX_MIN_CUDA: dict[str, str] = {"a": "12.0", "f": "12.9"}
# CUDA 13 removed SASS/PTX generation for Maxwell, Pascal and Volta (sm_50 … sm_72), and renamed
# sm_101 to sm_110 (nvcc 13.0: "Unsupported gpu architecture 'sm_101'").
ARCH_MAX_CUDA_MAJOR: dict[str, int] = {
    arch: 12 for arch in ("5.0", "5.2", "5.3", "6.0", "6.1", "6.2", "7.0", "7.2", "10.1")
}

# PTX ISA version → the CUDA release that introduced it (PTX ISA docs, "Release notes").
PTX_ISA_CUDA: dict[str, str] = {
    "7.0": "11.0",
    "7.1": "11.1",
    "7.2": "11.2",
    "7.3": "11.3",
    "7.4": "11.4",
    "7.5": "11.5",
    "7.6": "11.6",
    "7.7": "11.7",
    "7.8": "11.8",
    "8.0": "12.0",
    "8.1": "12.1",
    "8.2": "12.2",
    "8.3": "12.3",
    "8.4": "12.4",
    "8.5": "12.5",
    "8.6": "12.7",
    "8.7": "12.8",
    "8.8": "12.9",
    "9.0": "13.0",
    "9.1": "13.1",
}

# CUDA toolkit (major.minor) → oldest Linux driver that runs its binaries and JITs its PTX
# (CUDA Toolkit release notes, table 3 "toolkit driver version").
CUDA_MIN_DRIVER: dict[str, str] = {
    "11.8": "520.61.05",
    "12.0": "525.60.13",
    "12.1": "530.30.02",
    "12.2": "535.54.03",
    "12.3": "545.23.06",
    "12.4": "550.54.14",
    "12.5": "555.42.02",
    "12.6": "560.28.03",
    "12.7": "565.57.01",
    "12.8": "570.26",
    "12.9": "575.51.03",
    "13.0": "580.65.06",
    "13.1": "590.44.01",
}

# torch release (major.minor) → CUDA versions PyTorch publishes wheels of it for on its own index
# (download.pytorch.org/whl/cuXYZ), stable and experimental: PyTorch's RELEASE.md "Release
# Compatibility Matrix" (13.2 is experimental for 2.12/2.13, stable for 2.14). Not exhaustive:
# builds off the matrix exist (cu129 for 2.10). PyPI's own wheels are one of these: 2.10 a CUDA 12.8
# build, 2.11–2.14.1 CUDA 13.0 builds (their METADATA requires cuda-toolkit 13.0.x), 2.15 CUDA 13.2.
TORCH_CUDA_BUILDS: dict[str, tuple[str, ...]] = {
    "2.7": ("11.8", "12.6", "12.8"),
    "2.8": ("12.6", "12.8", "12.9"),
    "2.9": ("12.6", "12.8", "13.0"),
    "2.10": ("12.6", "12.8", "13.0"),
    "2.11": ("12.6", "12.8", "13.0"),
    "2.12": ("12.6", "13.0", "13.2"),
    "2.13": ("12.6", "13.0", "13.2"),
    "2.14": ("12.6", "13.0", "13.2"),
}
# CUDA build → the last torch release (major.minor) PyTorch published it for, where that has ended.
# cu128: wheels counted on download.pytorch.org, none for 2.12 or 2.13, 2.11 the last (pytorch/FBGEMM
# PR 5976; PyTorch removed cu128 from 2.12 on, googlecolab/colabtools issue 5982).
CUDA_LAST_TORCH: dict[str, str] = {"12.8": "2.11"}
# torch release (major.minor) → the CUDA build PyPI serves as plain `torch` (the METADATA checks above).
# Any other build is PyTorch's variant, named by its local version (2.11.0+cu128) on PyTorch's index.
TORCH_PYPI_CUDA: dict[str, str] = {
    "2.10": "12.8",
    "2.11": "13.0",
    "2.12": "13.0",
    "2.13": "13.0",
    "2.14": "13.0",
    "2.15": "13.2",
}

# CUDA toolkit (major.minor) → the PyPI wheels that make a complete nvcc toolchain, every part
# pinned (else pip mixes in newer ones), and the directory under site-packages they fill
# (ENVIRONMENT.md). CUDA 12's PyPI wheels hold no nvcc: a 12.x toolkit comes from a host install
# or a CUDA base image.
CUDA_PYPI_TOOLCHAIN: dict[str, tuple[tuple[str, ...], str]] = {
    "13.0": (
        (
            "nvidia-cuda-nvcc==13.0.88",
            "nvidia-cuda-crt==13.0.88",
            "nvidia-nvvm==13.0.88",
            "nvidia-cuda-runtime==13.0.96",
            "nvidia-cuda-cccl==13.0.85",
        ),
        "nvidia/cu13",
    ),
}

_ARCH_RE = re.compile(r"^(?P<major>\d+)\.(?P<minor>\d)(?P<suffix>[af]?)(?P<ptx>\+PTX)?$")


@dataclass(frozen=True, order=True)
class Arch:
    """One entry of TORCH_CUDA_ARCH_LIST: 12.0, 9.0a, 10.0f, 8.0+PTX."""

    major: int
    minor: int
    suffix: str = ""  # "", "a" (arch-specific) or "f" (family)
    ptx: bool = False  # also embed PTX for this arch

    @property
    def number(self) -> int:
        """The sm_NN number: 12.0 → 120."""
        return self.major * 10 + self.minor

    @property
    def plain(self) -> str:
        return f"{self.major}.{self.minor}"

    def __str__(self) -> str:
        return f"{self.plain}{self.suffix}{'+PTX' if self.ptx else ''}"


def parse_arch(text: str) -> Arch:
    """Parse one arch as TORCH_CUDA_ARCH_LIST writes it; raises ValueError on anything else."""
    match = _ARCH_RE.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not an arch like 8.9, 9.0a, 12.0f or 8.0+PTX")
    arch = Arch(int(match["major"]), int(match["minor"]), match["suffix"], bool(match["ptx"]))
    if arch.plain not in ARCH_MIN_CUDA:
        known = ", ".join(ARCH_MIN_CUDA)
        raise ValueError(f"{text!r} is not a CUDA compute capability (known: {known})")
    return arch


def parse_arch_list(text: str) -> tuple[Arch, ...]:
    """Parse a TORCH_CUDA_ARCH_LIST value ("9.0a;12.0", "8.0 8.6+PTX")."""
    parts = [p for p in re.split(r"[;\s,]+", text.strip()) if p]
    if not parts:
        raise ValueError("the arch list is empty")
    return tuple(parse_arch(p) for p in parts)


def major_minor(version: str) -> str:
    """'12.8.1' → '12.8'."""
    release = Version(version).release
    return f"{release[0]}.{release[1] if len(release) > 1 else 0}"


def driver_tuple(driver: str) -> tuple[int, ...]:
    """'570.195.03' → (570, 195, 3); raises ValueError when it is no driver version."""
    if not re.fullmatch(r"\d+(\.\d+){1,2}", driver.strip()):
        raise ValueError(f"{driver!r} is not a driver version like 570.195.03")
    return tuple(int(p) for p in driver.strip().split("."))


def arch_min_cuda(arch: Arch) -> str:
    """The oldest toolkit (major.minor) that can build this arch, suffix included."""
    need = Version(ARCH_MIN_CUDA[arch.plain])
    if arch.suffix:
        need = max(need, Version(SUFFIX_MIN_CUDA[arch.suffix]))
    return str(need)


def cuda_min_driver(cuda: str) -> str | None:
    """Oldest driver for binaries of this toolkit, or None when the table lacks it."""
    return CUDA_MIN_DRIVER.get(major_minor(cuda))


def driver_max_cuda(driver: str) -> str | None:
    """Newest toolkit (major.minor) whose binaries and PTX this driver runs."""
    have = driver_tuple(driver)
    fitting = [c for c, d in CUDA_MIN_DRIVER.items() if driver_tuple(d) <= have]
    return max(fitting, key=Version) if fitting else None


def ptx_isa_min_driver(isa: str) -> str | None:
    """Oldest driver that can JIT-compile PTX of this ISA version."""
    cuda = PTX_ISA_CUDA.get(isa)
    return CUDA_MIN_DRIVER.get(cuda) if cuda else None


def driver_max_ptx_isa(driver: str) -> str | None:
    """Newest PTX ISA version a driver can JIT-compile."""
    cuda = driver_max_cuda(driver)
    if cuda is None:
        return None
    fitting = [isa for isa, c in PTX_ISA_CUDA.items() if Version(c) <= Version(cuda)]
    return max(fitting, key=Version) if fitting else None


def torch_cuda_builds(torch: str) -> tuple[str, ...] | None:
    """CUDA versions PyTorch publishes wheels of this torch for, or None if unknown."""
    return TORCH_CUDA_BUILDS.get(major_minor(torch))


def cuda_last_torch(cuda: str, torch: str) -> str | None:
    """The last torch (major.minor) with a build for this CUDA, when `torch` comes after it."""
    last = CUDA_LAST_TORCH.get(major_minor(cuda))
    return last if last is not None and Version(major_minor(torch)) > Version(last) else None


def torch_requirement(torch: str, cuda: str) -> str:
    """The pip requirement for torch's build for this toolkit: PyPI's own wheel where that is the
    build, else the variant's local version (torch==2.11.0+cu128), which pip finds on the indexes
    it is configured with (PyTorch's cuXYZ index, or a mirror of it, as extra-index-url)."""
    if "+" in torch or TORCH_PYPI_CUDA.get(major_minor(torch)) == major_minor(cuda):
        return f"torch=={torch}"
    return f"torch=={torch}+{cuda_tag(cuda)}"


def cuda_tag(cuda: str) -> str:
    """'12.8.1' → 'cu128', as PyTorch and vLLM name their CUDA builds."""
    return "cu" + major_minor(cuda).replace(".", "")


def runs_natively(sass: Arch, target: Arch) -> bool:
    """Whether SASS built for `sass` runs on a GPU of compute capability `target`.

    Plain SASS runs on the same major with an equal or later minor; `a` SASS only on its exact
    arch; `f` SASS on the later minors of its family (same major).
    """
    if sass.major != target.major:
        return False
    if sass.suffix == "a":
        return sass.minor == target.minor
    return sass.minor <= target.minor

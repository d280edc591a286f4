"""Real things the smoke tests need: a small wheel with a real CUDA .so (nvcc, sm_90 SASS), one whose
.so has an undefined symbol (the torch ABI mismatch), .so files that link the NVIDIA driver's
libcuda.so.1 as vLLM's op libraries do, a vLLM-shaped wheel of them, and the tables of a 9.0 target's recipe."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from wheels_helpers import write_wheel

NVCC = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
TARGET = "h100-smoke"
TAG = "py3-none-linux_x86_64"  # a platform wheel any CPython installs: the smoke venv's Python is the recipe's

KERNEL = """
__global__ void add(float* a, const float* b, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) a[i] += b[i];
}
extern "C" int launch_add(float* a, const float* b, int n) { add<<<(n + 255) / 256, 256>>>(a, b, n); return 0; }
"""
# What a .so built against another torch looks like to the loader: a symbol nothing provides.
UNRESOLVED = 'extern void _ZN3c1019UndefinedTensorImpl10_singletonE(void);\nvoid call(void) { _ZN3c1019UndefinedTensorImpl10_singletonE(); }\n'

INIT = """import ctypes, pathlib
_library = ctypes.CDLL(str(pathlib.Path(__file__).with_name("_kernels.so")))
VALUE = "kernels"
"""


def smoke_recipe(python: str = "3.11", torch: str = "2.11.0") -> dict:
    """make_recipe's arguments for the 9.0 smoke target (TARGET.toml, for a recipes folder): its one
    package is the test wheel's."""
    return {
        "name": f"{TARGET}.toml",
        "target": {"name": TARGET, "gpu": "H100", "compute_capability": "9.0", "torch_cuda_arch_list": "9.0",
                   "min_driver": "580.65.06"},
        "toolchain": {"cuda": "13.0", "python": python, "torch": torch},
        "package": [{"name": "gw-smoke-kernels", "version": "1.0",
                     "source": {"sdist": "gw_smoke_kernels-1.0.tar.gz", "sha256": "0" * 64}}],
    }


def build_cuda_so(directory: Path) -> Path:
    source = directory / "kernels.cu"
    source.write_text(KERNEL, encoding="utf-8")
    out = directory / "kernels.so"
    subprocess.run([NVCC, "-shared", "-Xcompiler", "-fPIC", "-gencode", "arch=compute_90,code=sm_90",
                    str(source), "-o", str(out)], check=True, capture_output=True)
    return out


def build_unresolved_so(directory: Path) -> Path:
    source = directory / "unresolved.c"
    source.write_text(UNRESOLVED, encoding="utf-8")
    out = directory / "unresolved.so"
    subprocess.run(["cc", "-shared", "-fPIC", str(source), "-o", str(out)], check=True, capture_output=True)
    return out


def build_libcuda_stub(directory: Path, symbols: tuple[str, ...] = ("cuGetProcAddress_v2",)) -> Path:
    """A libcuda.so.1 exporting `symbols` (each returns CUDA_ERROR_NO_DEVICE): what a machine without
    the NVIDIA driver lacks, for linking (and, on LD_LIBRARY_PATH, loading) .so files that need it."""
    directory.mkdir(parents=True, exist_ok=True)
    source = directory / "libcuda_stub.c"
    source.write_text("".join(f"int {name}(void) {{ return 100; }}\n" for name in symbols), encoding="utf-8")
    out = directory / "libcuda.so.1"
    subprocess.run(["cc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", str(source), "-o", str(out)], check=True,
                   capture_output=True)
    return out


def build_driver_linked_so(directory: Path, libcuda: Path, name: str = "ops") -> Path:
    """A .so that links libcuda.so.1 (NEEDED) and calls into it, as vLLM's op libraries do."""
    directory.mkdir(parents=True, exist_ok=True)
    source = directory / f"{name}.c"
    source.write_text("int cuGetProcAddress_v2(void);\nint probe(void) { return cuGetProcAddress_v2(); }\n",
                      encoding="utf-8")
    out = directory / f"{name}.so"
    subprocess.run(["cc", "-shared", "-fPIC", str(source), "-o", str(out), f"-L{libcuda.parent}", "-l:libcuda.so.1"],
                   check=True, capture_output=True)
    return out


def make_vllm_wheel(directory: Path, shared_objects: dict[str, Path], *, version: str = "0.26.0",
                    provenance: dict | None = None) -> Path:
    """A wheel named vllm holding `shared_objects` (wheel path → .so) and an importable package."""
    files: dict[str, bytes | Path] = {"vllm/__init__.py": b"VALUE = 'vllm'\n", "vllm/vllm_flash_attn/__init__.py": b""}
    return write_wheel(directory, "vllm", version, {**files, **shared_objects}, tag=TAG, provenance=provenance)


def make_wheel(directory: Path, shared_object: Path, *, name: str = "gw-smoke-kernels", version: str = "1.0",
               provenance: dict | None = None) -> Path:
    """A platform wheel whose package loads its .so at import."""
    module = name.replace("-", "_")
    return write_wheel(directory, name, version, {f"{module}/__init__.py": INIT.encode(),
                                                  f"{module}/_kernels.so": shared_object}, tag=TAG,
                       provenance=provenance)

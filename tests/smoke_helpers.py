"""Real things the smoke tests need: a small wheel with a real CUDA .so (nvcc, sm_90 SASS), one whose
.so has an undefined symbol (the torch ABI mismatch), and a recipe for a 9.0 target."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

NVCC = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
TARGET = "h100-smoke"

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


def write_recipe(directory: Path, python: str = "3.11", torch: str = "2.11.0") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{TARGET}.toml"
    path.write_text(f"""\
[target]
name = "{TARGET}"
gpu = "H100"
compute_capability = "9.0"
torch_cuda_arch_list = "9.0"
min_driver = "580.65.06"

[toolchain]
cuda = "13.0"
python = "{python}"
torch = "{torch}"

[[package]]
name = "gw-smoke-kernels"
version = "1.0"
source = {{ sdist = "gw_smoke_kernels-1.0.tar.gz", sha256 = "{'0' * 64}" }}
""", encoding="utf-8")
    return path


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


def make_wheel(directory: Path, shared_object: Path, *, name: str = "gw-smoke-kernels", version: str = "1.0",
               provenance: dict | None = None) -> Path:
    """A platform wheel (py3-none-linux_x86_64) whose package loads its .so at import."""
    directory.mkdir(parents=True, exist_ok=True)
    module = name.replace("-", "_")
    dist = f"{module}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": INIT.encode(),
        f"{module}/_kernels.so": shared_object.read_bytes(),
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: gpuwheel-tests\nRoot-Is-Purelib: false\n"
                         b"Tag: py3-none-linux_x86_64\n",
    }
    if provenance is not None:
        files[f"{dist}/gpuwheel.json"] = json.dumps(provenance).encode()
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
              f"{len(data)}" for path, data in files.items()]
    files[f"{dist}/RECORD"] = ("\n".join(record + [f"{dist}/RECORD,,"]) + "\n").encode()
    wheel = directory / f"{module}-{version}-py3-none-linux_x86_64.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel

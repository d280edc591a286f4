"""Real raw wheels for the finishing tests: kernels compiled by the machine's nvcc, linked against torch's
own libc10/libtorch (taken from the torch 2.14.1 CUDA wheel on this disk) and the CUDA runtime, and
packed by `pip wheel` of a tiny setuptools project, as the build stage's `pip wheel` packs vLLM."""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

NVCC = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
TORCH_WHEEL = Path("/opt/pypi-more/files/torch-2.14.1-cp311-cp311-manylinux_2_28_x86_64.whl")
TORCH_LIBS = ("torch/lib/libc10.so", "torch/lib/libtorch.so")

KERNEL = """
__global__ void scale(float* a, float s, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) a[i] *= s;
}
extern "C" void launch_scale(float* a, float s, int n) { scale<<<(n + 255) / 256, 256>>>(a, s, n); }
"""
SM120 = ["-gencode", "arch=compute_120,code=sm_120"]
PTX80 = ["-gencode", "arch=compute_80,code=compute_80"]

SETUP_PY = """
from setuptools import setup
from setuptools.dist import Distribution


class BinaryDistribution(Distribution):
    def has_ext_modules(self):  # a platform wheel, as a CUDA extension's build makes
        return True


setup(name={name!r}, version={version!r}, packages=[{package!r}], package_data={{{package!r}: ["*.so"]}},
      scripts={scripts!r}, distclass=BinaryDistribution)
"""


def toolchain() -> dict[str, str]:
    """What built these wheels, as the build stage observes it."""
    nvcc = subprocess.run([NVCC, "--version"], capture_output=True, text=True, check=True).stdout
    gcc = subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=True).stdout
    release = next(line for line in nvcc.splitlines() if "release" in line)  # "Cuda compilation tools, release 13.0, V13.0.88"
    return {"nvcc": release, "torch": "2.14.1+cu130", "python": platform.python_version(),
            "cc": gcc.splitlines()[0], "cxx": gcc.splitlines()[0], "base_image": None, "base_image_digest": None,
            "backend": "local"}


def extract_torch_libs(into: Path) -> Path:
    """libc10.so and libtorch.so of the real torch wheel, to link against (not to ship)."""
    into.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(TORCH_WHEEL) as wheel:
        for member in TORCH_LIBS:
            (into / Path(member).name).write_bytes(wheel.read(member))
    return into


def compile_so(workdir: Path, name: str, gencode: list[str], *, link: list[str] = ()) -> Path:
    """A CUDA .so from KERNEL; `link` adds linker arguments (-L, -l) so that it NEEDs those libraries."""
    source = workdir / f"{name}.cu"
    source.write_text(KERNEL)
    out = workdir / f"{name}.so"
    subprocess.run([NVCC, "-shared", "-Xcompiler", "-fPIC", *gencode, str(source), "-o", str(out),
                    *(["-Xlinker", "--no-as-needed", *link] if link else [])],
                   check=True, capture_output=True, text=True)
    return out


def compile_plain_library(workdir: Path, soname: str) -> Path:
    """A host-only shared library (libNAME.so) that no exclusion covers: auditwheel must graft it or fail."""
    source = workdir / f"{soname}.c"
    source.write_text("int gw_extra(int x) { return x + 1; }\n")
    out = workdir / soname
    subprocess.run(["gcc", "-shared", "-fPIC", f"-Wl,-soname,{soname}", str(source), "-o", str(out)], check=True,
                   capture_output=True, text=True)
    return out


def raw_wheel(workdir: Path, name: str, version: str, package: str, so_files: dict[str, Path],
              scripts: dict[str, str] | None = None) -> Path:
    """`pip wheel` of a setuptools project holding `so_files` (file name in the package → .so) and
    `scripts` (name → text; they land in the wheel's .data/scripts/)."""
    project = workdir / f"{name}-project"
    (project / package).mkdir(parents=True)
    for script, text in (scripts or {}).items():
        (project / script).write_text(text)
    (project / package / "__init__.py").write_text('"""Kernels for the finishing tests."""\n')
    for member, built in so_files.items():
        shutil.copy2(built, project / package / member)
    (project / "setup.py").write_text(textwrap.dedent(SETUP_PY.format(name=name, version=version, package=package,
                                                                 scripts=sorted(scripts or {}))))
    dist = workdir / f"{name}-dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(dist),
                    str(project)], check=True, capture_output=True, text=True)
    (wheel,) = dist.glob("*.whl")
    return wheel


def rewrite_member(source: Path, target: Path, changed: dict[str, bytes]) -> Path:
    """Copy a wheel, replacing members' bytes but not RECORD (a wheel edited by hand)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as new:
        for info in old.infolist():
            new.writestr(info, changed.get(info.filename, old.read(info)))
    return target

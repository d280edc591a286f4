"""Test wheels. `write_wheel` is the tests' one writer of a wheel from its members (every test wheel not
made by a real build goes through it). The rest are real raw wheels for the finishing tests: kernels
compiled by the machine's nvcc, linked against torch's own libc10/libtorch (taken from the torch 2.14.1
CUDA wheel on this disk) and the CUDA runtime, and packed by `pip wheel` of a tiny setuptools project,
as the build stage's `pip wheel` packs vLLM."""

from __future__ import annotations

import base64
import hashlib
import platform
import shutil
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Mapping
from pathlib import Path

from gpuwheel.wheelfile import PROVENANCE_FILE, check_wheel, provenance_text
from packaging.utils import canonicalize_name

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


def write_wheel(directory: Path, name: str, version: str = "1.0", files: Mapping[str, bytes | Path] | None = None, *,
                tag: str = "cp311-cp311-linux_x86_64", provenance: Mapping | None = None,
                metadata: Mapping[str, str] | None = None, compression: int = zipfile.ZIP_DEFLATED,
                check: bool = True) -> Path:
    """A wheel in `directory` holding `files` (member path → bytes, or a file whose bytes to take) and a
    .dist-info with METADATA (Name, Version, then the `metadata` fields), WHEEL (`tag`; Root-Is-Purelib
    for a -any wheel), gpuwheel.json when `provenance` is given (written as the finish stage writes it)
    and a RECORD with every member's sha256 and size. Members deflated as pip's wheels are, or stored
    (`zipfile.ZIP_STORED`), which the zip format allows too.

    Not wheelfile.repack: that rewrites a wheel that exists, always with a gpuwheel.json and deflated.
    check=True (the default) has gpuwheel's own check_wheel accept the result, so a test wheel is one
    gpuwheel agrees is valid; check=False only for a test that writes a wheel gpuwheel must refuse
    (a member outside the install root)."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{canonicalize_name(name).replace('-', '_')}-{version}"
    dist_info = f"{stem}.dist-info"
    fields = {"Metadata-Version": "2.1", "Name": name, "Version": version, **(metadata or {})}
    contents = {path: (data.read_bytes() if isinstance(data, Path) else data) for path, data in (files or {}).items()}
    contents[f"{dist_info}/METADATA"] = "".join(f"{key}: {value}\n" for key, value in fields.items()).encode()
    contents[f"{dist_info}/WHEEL"] = (f"Wheel-Version: 1.0\nGenerator: gpuwheel-tests\n"
                                      f"Root-Is-Purelib: {str(tag.endswith('-any')).lower()}\nTag: {tag}\n").encode()
    if provenance is not None:
        contents[f"{dist_info}/{PROVENANCE_FILE}"] = provenance_text(provenance).encode()
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
              f"{len(data)}" for path, data in contents.items()]
    contents[f"{dist_info}/RECORD"] = ("\n".join([*record, f"{dist_info}/RECORD,,"]) + "\n").encode()
    wheel = directory / f"{stem}-{tag}.whl"
    with zipfile.ZipFile(wheel, "w", compression) as archive:
        for path, data in contents.items():
            archive.writestr(path, data)
    if check:
        check_wheel(wheel)
    return wheel


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

"""Real GPU binaries for the audit tests: small kernels compiled by the machine's nvcc, wheels written
around them (wheels_helpers.write_wheel), and cuobjdump's view of the same files to compare the parser against."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

from wheels_helpers import write_wheel

NVCC = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
# Digests of the audit's JSON recorded before the reader was rewritten (issue 17): its verdicts must not move.
GOLDEN = Path(__file__).parent / "fixtures" / "audit_golden.json"

KERNEL = """
__global__ void {name}(float* a, const float* b, int n) {{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) a[i] {op}= b[i];
}}
extern "C" void launch_{name}(float* a, const float* b, int n) {{ {name}<<<(n + 255) / 256, 256>>>(a, b, n); }}
"""

# name → nvcc arguments (beyond -shared/-c); each a real way wheels end up built.
SHARED_OBJECTS: dict[str, list[str]] = {
    "sm90a": ["-gencode", "arch=compute_90a,code=sm_90a"],
    "sm120": ["-gencode", "arch=compute_120,code=sm_120"],
    # As torch extensions link it: libcudart.so.13 in DT_NEEDED (nvcc's default is the static one).
    "sm120_shared_cudart": ["-gencode", "arch=compute_120,code=sm_120", "-cudart", "shared"],
    "ptx80": ["-gencode", "arch=compute_80,code=compute_80"],
    "compressed_zstd": ["-gencode", "arch=compute_120,code=sm_120", "-gencode", "arch=compute_120,code=compute_120",
                        "-Xfatbin", "-compress-all"],
    "compressed_lz4": ["-gencode", "arch=compute_120,code=sm_120", "-gencode", "arch=compute_120,code=compute_120",
                       "-Xfatbin", "-compress-all", "-Xfatbin", "-compress-mode=speed"],
    "variants": ["-gencode", "arch=compute_100f,code=sm_100f", "-gencode", "arch=compute_120a,code=sm_120a",
                 "-gencode", "arch=compute_90a,code=compute_90a"],
}
# The mixed .so: one object per arch set, linked together (as a large extension is).
MIXED_OBJECTS: dict[str, list[str]] = {
    "hopper_only": ["-gencode", "arch=compute_90a,code=sm_90a"],
    "native_and_ptx": ["-gencode", "arch=compute_120,code=sm_120", "-gencode", "arch=compute_80,code=compute_80"],
    "ptx_only": ["-gencode", "arch=compute_80,code=compute_80"],
}


def _compile(args: list[str], source: Path, out: Path, *, shared: bool) -> None:
    mode = ["-shared"] if shared else ["-c"]
    subprocess.run([NVCC, *mode, "-Xcompiler", "-fPIC", *args, str(source), "-o", str(out)],
                   check=True, capture_output=True, text=True)


def build_fixtures(root: Path) -> dict[str, Path]:
    """Compile every fixture .so into root; returns name → path (plus "mixed" and "moved")."""
    built: dict[str, Path] = {}
    for index, (name, args) in enumerate(SHARED_OBJECTS.items()):
        source = root / f"{name}.cu"
        source.write_text(KERNEL.format(name=f"k{index}", op="+"))
        built[name] = root / f"{name}.so"
        _compile(args, source, built[name], shared=True)
    objects = []
    for index, (name, args) in enumerate(MIXED_OBJECTS.items()):
        source = root / f"mixed_{name}.cu"
        source.write_text(KERNEL.format(name=f"m{index}", op="*"))
        objects.append(root / f"mixed_{name}.o")
        _compile(args, source, objects[-1], shared=False)
    built["mixed"] = root / "mixed.so"
    subprocess.run([NVCC, "-shared", *map(str, objects), "-o", str(built["mixed"])], check=True, capture_output=True)
    # The same code with .nv_fatbin renamed: only the .nvFatBinSegment wrappers say where it is.
    built["moved"] = root / "moved.so"
    subprocess.run(["objcopy", "--rename-section", ".nv_fatbin=.gw_fatbin", str(built["compressed_zstd"]),
                    str(built["moved"])], check=True, capture_output=True)
    return built


def cuobjdump_path() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    import nvidia  # the nvidia-cuda-cuobjdump wheel (test extra) installs nvidia/cu13/bin/cuobjdump

    for base in nvidia.__path__:
        for candidate in sorted(Path(base).glob("cu*/bin/cuobjdump")):
            return str(candidate)
    raise AssertionError("cuobjdump not found: pip install nvidia-cuda-cuobjdump (it is in the test extra)")


_LISTED = re.compile(r"^(ELF|PTX) file\s+\d+: .*\.(sm_\d+[af]?)\.(?:cubin|ptx)$", re.M)


def cuobjdump_listing(path: Path) -> dict[str, list[str]]:
    """cuobjdump --list-elf --list-ptx, as {"ELF": [sm_NN…], "PTX": [sm_NN…]} in file order."""
    done = subprocess.run([cuobjdump_path(), "--list-elf", "--list-ptx", str(path)], capture_output=True, text=True)
    listing: dict[str, list[str]] = {"ELF": [], "PTX": []}
    if done.returncode and "does not contain device code" in done.stderr:
        return listing
    done.check_returncode()
    out = done.stdout
    for match in _LISTED.finditer(out):
        listing[match[1]].append(match[2])
    return listing


def our_listing(units) -> dict[str, list[str]]:
    """The parser's units in cuobjdump's naming: it drops the `f` of family cubins (not of family PTX)."""
    return {
        "ELF": [f"sm_{e.arch}{'a' if e.variant == 'a' else ''}" for unit in units for e in unit.sass],
        "PTX": [f"sm_{e.arch}{e.variant}" for unit in units for e in unit.ptx],
    }


def verdict_digests(report) -> dict:
    """sha256 of the report's JSON (as `gpuwheel audit --json` prints it) and of each .so's, the input's
    location cut to its file name: what the audit found, not where the file lay."""
    data = report.to_json()
    data["path"] = Path(data["path"]).name
    for wheel in data["wheels"]:
        wheel["path"] = Path(wheel["path"]).name

    def digest(value) -> str:
        return hashlib.sha256(json.dumps(value, indent=2).encode()).hexdigest()
    return {"report": digest(data), "sos": {so["path"]: digest(so) for so in data["sos"]}}


def golden_target(name: str):
    """One of the targets the golden digests were recorded for, as recorded (recipes may move on)."""
    from gpuwheel import facts
    from gpuwheel.audit.report import AuditTarget

    recorded = json.loads(GOLDEN.read_text())["targets"][name]
    return AuditTarget(facts.parse_arch(recorded["arch"]), recorded["min_driver"], tuple(recorded["optional_globs"]))


def golden_fixture_wheels(sos: dict[str, Path], directory: Path, compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """The directory of wheels the fixture digests are recorded for: every fixture .so in one wheel, and
    the FA2-style PTX-only .so in another."""
    directory.mkdir()
    write_wheel(directory, "fixtures", "1.0", {f"fixtures/{name}.so": path for name, path in sos.items()},
                compression=compression)
    write_wheel(directory, "fa2", "1.0", {"fa2/_fa2_C.abi3.so": sos["ptx80"]}, compression=compression)
    return directory


def nvcc_version() -> str:
    """The last line of `nvcc --version` (its build): fixture offsets are only comparable under one nvcc."""
    return subprocess.run([NVCC, "--version"], check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]

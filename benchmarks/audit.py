"""`gpuwheel audit` of a whole wheel vs the cuobjdump way to the same facts, in one run, interleaved.

The cuobjdump way: `unzip` the wheel's .so files, then per .so `cuobjdump --list-elf` (the SASS) and
`cuobjdump -ptx | grep` (each PTX's arch and `.version`, the ISA a driver must JIT) — what a person
scripts. gpuwheel: `gpuwheel audit WHEEL --target rtx6000pro --json`, the whole process, and `audit()`
in this process (no interpreter start). Both ways start from a warm page cache. The facts must be
equal, .so by .so, and the verdicts those recorded before issue 17 (tests/fixtures/audit_golden.json).

    python benchmarks/audit.py [--runs N] [WHEEL ...]
    (default: vLLM 0.14.0's own wheel, 495 MB, downloaded once from PyPI into the test cache)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from audit_helpers import GOLDEN, cuobjdump_path, golden_target, verdict_digests  # noqa: E402
from vllm_patches_helpers import vllm_dist  # noqa: E402

from gpuwheel.audit.report import AuditReport, audit  # noqa: E402

VLLM_WHEEL = "vllm-0.14.0-cp38-abi3-manylinux_2_31_x86_64.whl"
TARGET = "rtx6000pro"  # 12.0 + driver 570.195.03, as recorded in the golden file
_LISTED_ELF = re.compile(r"^ELF file\s+\d+: .*\.(sm_\d+[af]?)\.cubin$", re.M)
_DUMPED = re.compile(r"^(?:Fatbin (?P<kind>elf|ptx) code:|arch = (?P<arch>sm_\d+[af]?)|\.version (?P<isa>\d+\.\d+))")


def cuobjdump_way(wheel: Path, names: list[str], cuobjdump: str) -> dict[str, dict]:
    """Per ELF .so of the wheel: its SASS list and its PTX (arch, ISA) list, as cuobjdump prints them."""
    facts = {}
    with tempfile.TemporaryDirectory(prefix="gpuwheel-bench-") as scratch:
        subprocess.run(["unzip", "-q", "-o", str(wheel), *names, "-d", scratch], check=True)
        for so in (Path(scratch) / name for name in names):
            with open(so, "rb") as file:
                if file.read(4) != b"\x7fELF":
                    continue
            listed = subprocess.run([cuobjdump, "--list-elf", str(so)], capture_output=True, text=True)
            # -ptx prints every PTX text (1 GB for vLLM 0.14.0), and a header for each cubin too; grep
            # keeps the lines that say which entry is PTX, for which arch, and its `.version`.
            dump = subprocess.Popen([cuobjdump, "-ptx", str(so)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            lines = subprocess.run(["grep", "-E", r"^(Fatbin (elf|ptx) code:|arch = |\.version )"], stdin=dump.stdout,
                                   capture_output=True, text=True).stdout.splitlines()
            dump.stdout.close()
            dump.wait()
            facts[str(so.relative_to(scratch))] = {"ELF": _LISTED_ELF.findall(listed.stdout), "PTX": _ptx_facts(lines)}
    return facts


def _ptx_facts(lines: list[str]) -> list[tuple[str, str]]:
    """(arch, ISA) of each PTX in cuobjdump -ptx's order: the arch from its header, the ISA from its text."""
    ptx, kind = [], None
    for line in lines:
        match = _DUMPED.match(line)
        if match is None:
            continue
        if match["kind"]:
            kind = match["kind"]
        elif match["arch"] and kind == "ptx":
            ptx.append([match["arch"], None])
        elif match["isa"] and kind == "ptx" and ptx and ptx[-1][1] is None:
            ptx[-1][1] = match["isa"]
    return [tuple(entry) for entry in ptx]


def our_facts(report: AuditReport) -> dict[str, dict]:
    """The same facts from the audit's report, in cuobjdump's naming: sm_ for PTX too, and no `f` on
    family cubins (cuobjdump --list-elf drops it; -ptx keeps it)."""
    return {so.path: {"ELF": [re.sub(r"f$", "", name) for unit in so.units for name in unit.sass],
                      "PTX": [("sm_" + name.removeprefix("compute_"), isa) for unit in so.units
                              for name, isa in zip(unit.ptx, unit.ptx_isas)]}
            for so in report.sos}


def children_cpu() -> float:
    """CPU seconds of the child processes that have ended (commands run, the audit's worker processes)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def all_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime + children_cpu()


def measure(wheel: Path, runs: int, cuobjdump: str) -> None:
    target = golden_target(TARGET)
    members = [m for m in zipfile.ZipFile(wheel).infolist() if Path(m.filename).name.endswith(".so")
               or ".so." in Path(m.filename).name]
    names = [member.filename for member in members]
    print(f"{wheel.name}: {wheel.stat().st_size / 1e6:.0f} MB, {len(members)} .so members "
          f"({sum(m.file_size for m in members) / 1e6:.0f} MB inflated); target {TARGET} = "
          f"{target.arch.plain} + driver {target.min_driver}; {len(os.sched_getaffinity(0))} cores, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    wheel.read_bytes()  # warm the page cache for both ways
    times: dict[str, list[float]] = {"cli": [], "audit()": [], "cuobjdump": []}
    cpu: dict[str, list[float]] = {key: [] for key in times}
    for run in range(1, runs + 1):  # interleaved, so a busier moment of the shared machine hits all ways
        before, start = children_cpu(), time.perf_counter()
        cli = subprocess.run([sys.executable, "-m", "gpuwheel", "audit", str(wheel), "--target", TARGET, "--json"],
                             capture_output=True)
        times["cli"].append(time.perf_counter() - start)
        cpu["cli"].append(children_cpu() - before)
        before, start = all_cpu(), time.perf_counter()
        report = audit(wheel, target)
        times["audit()"].append(time.perf_counter() - start)
        cpu["audit()"].append(all_cpu() - before)
        before, start = children_cpu(), time.perf_counter()
        theirs = cuobjdump_way(wheel, names, cuobjdump)
        times["cuobjdump"].append(time.perf_counter() - start)
        cpu["cuobjdump"].append(children_cpu() - before)
        print(f"  run {run}: gpuwheel audit {times['cli'][-1]:6.2f} s (exit {cli.returncode}), audit() "
              f"{times['audit()'][-1]:6.2f} s, cuobjdump way {times['cuobjdump'][-1]:6.2f} s")
    median = {key: statistics.median(values) for key, values in times.items()}
    labels = {"cli": "gpuwheel audit WHEEL --target rtx6000pro --json",
              "audit()": "audit() in this process",
              "cuobjdump": "unzip + cuobjdump --list-elf, -ptx | grep"}
    for key, label in labels.items():
        print(f"median {label:48s} {median[key]:6.2f} s   ({statistics.median(cpu[key]):5.2f} CPU-s)")
    ratio = median["cuobjdump"] / median["cli"]
    print(f"ratio cuobjdump way / gpuwheel audit (medians): {ratio:.1f}x   "
          f"[issue 17 asks ≤ 2 s: {'yes' if median['cli'] <= 2 else 'NO'}; ≥ 5x: {'yes' if ratio >= 5 else 'NO'}]")
    ours = our_facts(report)
    print(f"same SASS, PTX and PTX ISA per .so as cuobjdump: {'yes' if ours == theirs else 'NO'}")
    if ours != theirs:
        for path in sorted(set(ours) | set(theirs)):
            if ours.get(path) != theirs.get(path):
                print(f"  differs: {path}")
    recorded = json.loads(GOLDEN.read_text())["wheels"].get(wheel.name)
    if recorded is None:
        print("verdicts: no digest recorded for this wheel")
    else:
        same = verdict_digests(report) == recorded["digests"][TARGET]
        print(f"same verdicts as recorded before issue 17: {'yes' if same else 'NO'}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("wheels", nargs="*", type=Path)
    args = parser.parse_args(argv)
    golden = json.loads(GOLDEN.read_text())["wheels"]
    wheels = args.wheels or [vllm_dist(VLLM_WHEEL, golden[VLLM_WHEEL]["sha256"])]
    cuobjdump = cuobjdump_path()
    print(subprocess.run([cuobjdump, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1])
    for wheel in wheels:
        measure(wheel, args.runs, cuobjdump)


if __name__ == "__main__":
    main(sys.argv[1:])

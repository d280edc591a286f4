"""How fast `gpuwheel` starts, against `python -c pass` in the same run (the floor no CLI beats).

    python benchmarks/startup.py [--runs N] [--gpuwheel PATH]

Each command runs N times (default 15) after one warm-up; the median wall time is printed, and the
part gpuwheel adds over the bare interpreter. The aim (issue 14): `--help` and `targets` ≤ 0.15 s.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def median_seconds(argv: list[str], runs: int) -> tuple[float, float]:
    """Median wall and CPU (user + sys) seconds; CPU time barely moves when other jobs share the cores."""
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)  # warm the page cache
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--gpuwheel", default=shutil.which("gpuwheel") or str(Path(sys.executable).with_name("gpuwheel")))
    args = parser.parse_args()
    floor, floor_cpu = median_seconds([sys.executable, "-c", "pass"], args.runs)
    print(f"{'command':<26} {'wall':>8} {'cpu':>8}   (Python {sys.version.split()[0]}, {args.runs} runs, medians; "
          f"load average {os.getloadavg()[0]:.1f})")
    print(f"{'python -c pass':<26} {floor * 1000:6.1f}ms {floor_cpu * 1000:6.1f}ms")
    for label, extra in (("gpuwheel --help", ["--help"]), ("gpuwheel --version", ["--version"]),
                         ("gpuwheel targets", ["targets"]), ("gpuwheel plan h100 --json", ["plan", "h100", "--json"])):
        wall, cpu = median_seconds([args.gpuwheel, *extra], args.runs)
        print(f"{label:<26} {wall * 1000:6.1f}ms {cpu * 1000:6.1f}ms   (+{(wall - floor) * 1000:.1f} ms wall over python)")

if __name__ == "__main__":
    main()

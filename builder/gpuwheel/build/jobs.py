"""Memory-aware parallelism: how many compiler jobs, and nvcc threads each, fit this machine.

nvcc's peak memory grows with the archs it compiles at once; running out of memory kills the
build after minutes or hours, so jobs are sized from *available* memory, not from cores alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Peak GB of one compiler job: a base for one arch plus a share per extra nvcc thread.
# flash-attn: measured 4.2–6.2 GB per TU at one arch, ~8 GB with four archs at --threads 2.
# vLLM: its cutlass TUs peak at ~3–4 GB per arch (CONTEXT.md; vLLM's own docs size MAX_JOBS so).
JOB_MEMORY_GB: dict[str, tuple[float, float]] = {
    "flash-attn": (5.0, 1.5),
    "vllm": (4.0, 1.5),
}
DEFAULT_JOB_MEMORY_GB = (4.0, 1.5)


@dataclass(frozen=True)
class Jobs:
    max_jobs: int
    nvcc_threads: int
    reason: str  # why these numbers, shown by `plan` and in OOM messages


def available_memory_gb() -> float:
    """Memory this process may still use: MemAvailable, capped by the cgroup limit if any.

    psutil reports the host's memory and ignores cgroup limits (containers, CI), so read both.
    """
    available = _meminfo_kb("MemAvailable") / 2**20
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            available = min(available, (int(limit) - usage) / 2**30)
        break
    return max(available, 0.0)


def _meminfo_kb(field: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 8 * 2**20  # unknown: assume 8 GB rather than over-commit


def choose_jobs(package: str, archs: int, *, cores: int | None = None, memory_gb: float | None = None,
                jobs: int | None = None, nvcc_threads: int | None = None) -> Jobs:
    """MAX_JOBS × NVCC_THREADS for one package; explicit jobs/nvcc_threads win."""
    cores = cores or os.cpu_count() or 1
    memory_gb = available_memory_gb() if memory_gb is None else memory_gb
    base, per_thread = JOB_MEMORY_GB.get(package, DEFAULT_JOB_MEMORY_GB)
    # One arch per TU: nvcc's threads parallelise across archs only, so extra threads are idle.
    threads = nvcc_threads or (1 if archs <= 1 else min(archs, 2))
    per_job = base + per_thread * (threads - 1)
    by_memory = max(1, int(memory_gb // per_job))
    by_cores = max(1, cores // threads)
    if jobs:
        return Jobs(jobs, threads, f"set explicitly ({jobs} jobs × {threads} nvcc threads)")
    chosen = min(by_memory, by_cores)
    limit = "memory" if by_memory < by_cores else "cores"
    return Jobs(chosen, threads, f"{chosen} jobs × {threads} nvcc threads: limited by {limit} "
                                 f"({cores} cores, {memory_gb:.0f} GB available, ~{per_job:.1f} GB per job)")

"""Memory-aware parallelism: how many compiler jobs, and nvcc threads each, fit this machine.

nvcc's peak memory grows with the archs it compiles at once; running out of memory kills the
build after minutes or hours, so jobs are sized from *available* memory, not from cores alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Peak GB of one job on this machine when its compiles run on a cluster: sccache's client still runs
# nvcc's preprocessing (gcc -E, cudafe++), fatbinary and the link here. An estimate, not a measurement:
# a vLLM TU's preprocessed source is tens of MB and gcc -E's peak a few hundred; 1.5 leaves room.
DIST_LOCAL_JOB_GB = 1.5


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
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
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


def choose_jobs(
    job_memory_gb: tuple[float, float],
    archs: int,
    *,
    cores: int | None = None,
    memory_gb: float | None = None,
    jobs: int | None = None,
    nvcc_threads: int | None = None,
    cluster_cpus: int | None = None,
) -> Jobs:
    """MAX_JOBS × NVCC_THREADS for one package whose compiler job peaks at `job_memory_gb` GB (a base
    for one arch plus a share per extra nvcc thread: its kind's figure); explicit jobs/nvcc_threads
    win. With cluster_cpus (an sccache-dist cluster's cores) the compiles run there: the cluster's
    cores bound the jobs, and this machine's memory only what stays here (DIST_LOCAL_JOB_GB a job)."""
    cores = cores or os.cpu_count() or 1
    memory_gb = available_memory_gb() if memory_gb is None else memory_gb
    base, per_thread = job_memory_gb
    # One arch per TU: nvcc's threads parallelise across archs only, so extra threads are idle.
    threads = nvcc_threads or (1 if archs <= 1 else min(archs, 2))
    per_job = base + per_thread * (threads - 1)
    by_memory = max(1, int(memory_gb // per_job))
    by_cores = max(1, cores // threads)
    if jobs:
        return Jobs(jobs, threads, f"set explicitly ({jobs} jobs × {threads} nvcc threads)")
    if cluster_cpus:
        by_cluster = max(1, cluster_cpus // threads)
        by_local = max(1, int(memory_gb // DIST_LOCAL_JOB_GB))
        chosen = min(by_cluster, by_local)
        limit = (
            f"the cluster's {cluster_cpus} cores"
            if by_cluster <= by_local
            else f"this machine's memory for the preprocessing that stays here ({memory_gb:.0f} GB available, "
            f"~{DIST_LOCAL_JOB_GB} GB per job)"
        )
        return Jobs(chosen, threads, f"{chosen} jobs × {threads} nvcc threads: distributed, limited by {limit}")
    chosen = min(by_memory, by_cores)
    limit = "memory" if by_memory < by_cores else "cores"
    return Jobs(
        chosen,
        threads,
        f"{chosen} jobs × {threads} nvcc threads: limited by {limit} "
        f"({cores} cores, {memory_gb:.0f} GB available, ~{per_job:.1f} GB per job)",
    )

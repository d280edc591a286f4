"""What an sccache-dist cluster would make of a real build: replay a `.ninja_log`'s compiles onto k build
servers of c cores and print the makespan, beside the single host the log came from.

    python benchmarks/dist_model.py docs/runs/ninja-h200-torch211-serving.log
    python benchmarks/dist_model.py LOG --cores 32 --server-memory-gb 128 --job-overhead-s 0.5 --package-s 25

The model, and what it leaves out:
- Every compile step (an `.o`) is a job of the duration the log measured (one TU at NVCC_THREADS=1 is
  its CPU time), plus `--job-overhead-s` for sccache's round trip: local preprocessing, the inputs
  upload, the scheduler's allocation, the outputs download (measured on the namespace cluster of
  tests/test_dist.py: 0.43 s, benchmarks/dist_overhead.py). Servers are as fast per core as the machine
  of the log.
- A server runs min(cores, memory / GB per job) jobs at once (vLLM's ~4 GB a TU, backends/jobs.py).
- Jobs start in the order ninja started them, each on the first free slot (list scheduling: what the
  scheduler's least-loaded choice comes to when every job is ready).
- Link and other non-compile steps run here, after their CMake target's last compile, on `--local-cores`.
- `--package-s` once at the start: sccache packs nvcc's stages and gcc before the first remote job
  (servers then fetch the archive; on a LAN that is seconds beside it).
Not modelled: CMake's own ordering beyond targets, network contention, servers slower than the log's.
"""

from __future__ import annotations

import argparse
import heapq
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "builder"))

from build_vllm import Step, read_log, summarize  # noqa: E402  the one ninja-log parser
from gpuwheel.kinds import vllm as vllm_kind  # noqa: E402

FIRST = ("fa2", "fa3", "qutlass")  # build_vllm's families of the subdirectory targets patch 0008 starts first
# The orders a replay can start the compiles in: as the log started them; as patch 0008 alone gives ninja
# (the FA2/FA3/qutlass objects before the rest, each group in the logged order); as patch 0011 gives it
# with a table made from this same log (longest first, across targets).
ORDERS = {
    "logged": lambda s: s.start,
    "attention-first": lambda s: (s.family not in FIRST, s.start),
    "longest-first": lambda s: (-s.seconds, s.start),
}


def makespan(steps: list[Step], *, servers: int, cores: int, server_memory_gb: float, job_gb: float,
             job_overhead_s: float, package_s: float, local_cores: int, order: str = "logged") -> float:
    slots = max(1, min(cores, int(server_memory_gb // job_gb))) * servers
    free = [package_s] * slots  # when each slot is next free
    heapq.heapify(free)
    target_done: dict[str, float] = defaultdict(float)
    for step in sorted((s for s in steps if s.is_compile), key=ORDERS[order]):
        start = heapq.heappop(free)
        end = start + step.seconds + job_overhead_s
        heapq.heappush(free, end)
        target_done[step.target] = max(target_done[step.target], end)
    compiles_end = max(target_done.values(), default=0.0)
    local = [0.0] * local_cores
    heapq.heapify(local)
    end = compiles_end
    for step in sorted((s for s in steps if not s.is_compile), key=lambda s: target_done.get(s.target, compiles_end)):
        # A link waits for its target's objects; others (the final install, stamps) for all of them.
        ready = target_done.get(step.target, compiles_end) if step.target != "(link/other)" else compiles_end
        start = max(heapq.heappop(local), ready)
        heapq.heappush(local, start + step.seconds)
        end = max(end, start + step.seconds)
    return end


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+", type=Path)
    parser.add_argument("--servers", default="1,4,16", help="cluster sizes to model (comma-separated)")
    parser.add_argument("--cores", type=int, default=32, help="cores per build server")
    parser.add_argument("--server-memory-gb", type=float, default=128)
    parser.add_argument("--job-gb", type=float, default=vllm_kind.KIND.job_memory_gb[0], help="peak GB per TU")
    parser.add_argument("--job-overhead-s", type=float, default=0.5,
                        help="sccache's per-job round trip (0.43 s measured by benchmarks/dist_overhead.py on the namespace cluster)")
    parser.add_argument("--package-s", type=float, default=29.0,
                        help="toolchain packaging, once (measured cold here: gcc 7.6 s, nvcc's stages 21 s)")
    parser.add_argument("--local-cores", type=int, default=16, help="cores of the machine that links")
    parser.add_argument("--order", action="append", choices=list(ORDERS),
                        help="the order the compiles start in (repeatable): as logged (the default); the attention "
                             "and qutlass TUs first (vLLM patch 0008); longest first (patch 0011)")
    args = parser.parse_args()
    sizes = [int(n) for n in args.servers.split(",")]
    print(f"servers of {args.cores} cores, {args.server_memory_gb:.0f} GB ({args.job_gb:.1f} GB a job); "
          f"{args.job_overhead_s:.2f} s a job and {args.package_s:.0f} s packaging overhead; links on "
          f"{args.local_cores} local cores\n")
    print("| log | compiles | CPU | measured wall | " + " | ".join(f"{n} server{'s' * (n > 1)}" for n in sizes) + " | floor (longest TU) |")
    print("|---|---|---|---|" + "---|" * len(sizes) + "---|")
    for log in args.logs:
        steps = read_log(log)
        summary = summarize(steps)
        for order in args.order or ["logged"]:
            walls = [makespan(steps, servers=n, cores=args.cores, server_memory_gb=args.server_memory_gb,
                              job_gb=args.job_gb, job_overhead_s=args.job_overhead_s, package_s=args.package_s,
                              local_cores=args.local_cores, order=order) for n in sizes]
            name = f"{log.name}{'' if order == 'logged' else f' ({order})'}"
            print(f"| {name} | {summary.compiles} | {summary.cpu_s / 3600:.2f} CPU-h | {_minutes(summary.wall_s)} | "
                  + " | ".join(_minutes(w) for w in walls)
                  + f" | {_minutes(summary.longest[0].seconds) if summary.longest else '-'} |")


if __name__ == "__main__":
    main()

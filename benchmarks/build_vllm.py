"""Where a vLLM build's time goes, from ninja's own log: CPU-s per target and kernel family, the
longest steps (the wall-time floor), and the ratio of a build to a baseline build.

    python benchmarks/build_vllm.py docs/runs/ninja-rtx6000pro-torch211-serving.log
    python benchmarks/build_vllm.py PROFILE.log --baseline STOCK.log [--cores 32]
    python benchmarks/build_vllm.py LOG --write-order builder/gpuwheel/kinds/vllm_compile_order/V-ARCHS.tsv

FA2's kernel TUs are also split by kind (plain forward, split-KV, split-align, sparse), with the
split-KV and split-align TUs' CPU-s as a multiple of the plain forward ones': a ratio within one log,
which the host's speed cancels out of (patch 0012 changes the split kernels only).

Each `.ninja_log` line is one step: start and end (ms since the build began) and its output.
vLLM's steps compile one translation unit each with NVCC_THREADS=1, so a step's duration is its
CPU time. A log that a resumed build appended to keeps only each output's latest step (as ninja
reads it). The predicted wall for N cores is max(CPU-s / N, longest step): no scheduler beats
either bound.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

# Kernel families by the source path of a compiled object (first match wins).
FAMILIES = (
    ("fa3", r"_vllm_fa3_C\.dir|hopper/"),
    ("fa2", r"_vllm_fa2_C\.dir"),
    ("flashmla", r"_flashmla"),
    ("qutlass", r"_qutlass_C\.dir"),
    ("deepgemm", r"deep_gemm|deepgemm"),
    ("machete", r"machete"),
    ("marlin", r"marlin"),
    ("cutlass w8a8 (scaled_mm)", r"w8a8/cutlass/(scaled_mm|c3x)"),
    ("cutlass moe", r"w8a8/cutlass/moe|grouped_mm|moe_data"),
    ("fp4", r"fp4"),
    ("sparse", r"sparse"),
    ("attention", r"attention|mla"),
    ("moe (other)", r"/moe/|_moe_C"),
    ("other", r""),
)
# FA2's kernel TUs by kind (flash_fwd_<kind>hdim<N>_<dtype>[_causal]_sm80.cu), first match wins.
FA2_KINDS = (
    ("split-align", r"flash_fwd_split_align_hdim"),
    ("split-KV", r"flash_fwd_split_hdim"),
    ("sparse", r"flash_fwd_sparse_hdim"),
    ("forward", r"flash_fwd_hdim"),
    ("api", r""),
)


@dataclass(frozen=True)
class Step:
    output: str
    seconds: float
    start: float
    end: float

    @property
    def target(self) -> str:
        match = re.search(r"CMakeFiles/([^/]+)\.dir/", self.output)
        return match[1] if match else "(link/other)"

    @property
    def family(self) -> str:
        return next(name for name, pattern in FAMILIES if re.search(pattern, self.output))

    @property
    def fa2_kind(self) -> str | None:
        if self.family != "fa2":
            return None
        return next(name for name, pattern in FA2_KINDS if re.search(pattern, self.output))

    @property
    def is_compile(self) -> bool:
        return self.output.endswith(".o")

    @property
    def source_name(self) -> str:
        """The compiled file's name (`gemm.cu` of `.../CMakeFiles/_qutlass_C.dir/.../gemm.cu.o`)."""
        return Path(self.output).name.removesuffix(".o")


def read_log(path: Path) -> list[Step]:
    latest: dict[str, Step] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) < 4:
            continue
        start, end = int(fields[0]) / 1000, int(fields[1]) / 1000
        latest[fields[3]] = Step(fields[3], end - start, start, end)
    return list(latest.values())


@dataclass(frozen=True)
class Summary:
    steps: int
    compiles: int
    cpu_s: float
    wall_s: float
    longest: tuple[Step, ...]
    by_target: dict[str, tuple[int, float]]
    by_family: dict[str, tuple[int, float]]
    by_fa2_kind: dict[str, tuple[int, float]]

    def predicted_wall(self, cores: int) -> float:
        return max(self.cpu_s / cores, self.longest[0].seconds if self.longest else 0.0)

    @property
    def fa2_split_per_forward(self) -> float | None:
        """FA2's split-KV and split-align TUs' CPU-s over its plain forward TUs' (None without both)."""
        split = sum(self.by_fa2_kind.get(kind, (0, 0.0))[1] for kind in ("split-KV", "split-align"))
        forward = self.by_fa2_kind.get("forward", (0, 0.0))[1]
        return split / forward if split and forward else None


def summarize(steps: list[Step]) -> Summary:
    by_target: dict[str, list[float]] = defaultdict(list)
    by_family: dict[str, list[float]] = defaultdict(list)
    by_fa2_kind: dict[str, list[float]] = defaultdict(list)
    for step in steps:
        if step.is_compile:
            by_target[step.target].append(step.seconds)
            by_family[step.family].append(step.seconds)
            if (kind := step.fa2_kind) is not None:
                by_fa2_kind[kind].append(step.seconds)
    compiles = [s for s in steps if s.is_compile]
    return Summary(
        steps=len(steps), compiles=len(compiles), cpu_s=sum(s.seconds for s in compiles),
        wall_s=(max(s.end for s in steps) - min(s.start for s in steps)) if steps else 0.0,
        longest=tuple(sorted(compiles, key=lambda s: -s.seconds)[:8]),
        by_target={k: (len(v), sum(v)) for k, v in by_target.items()},
        by_family={k: (len(v), sum(v)) for k, v in by_family.items()},
        by_fa2_kind={k: (len(v), sum(v)) for k, v in by_fa2_kind.items()})


# What patch 0011's CMake matches an object by (its target and file name, dots escaped there).
ORDER_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# Long steps that are no compile of an object, by the custom target that runs them: DeepGEMM's C++
# extension (tools/build_deepgemm_C.py, 42-75 s on one core), which ninja otherwise starts last.
CUSTOM_STEPS = ((re.compile(r"(^|/)deepgemm_C_[^/]+/\.built$"), "_deep_gemm_C"),)


def _order_key(step: Step) -> tuple[str, str] | None:
    """(target, name) patch 0011 orders this step by, or None for a step it leaves in CMake's order."""
    if step.is_compile and step.target != "(link/other)":
        return step.target, step.source_name
    target = next((target for pattern, target in CUSTOM_STEPS if pattern.search(step.output)), None)
    return (target, step.source_name) if target else None


def compile_order(steps: list[Step], log_name: str) -> str:
    """The table vLLM patch 0011 reads (GPUWHEEL_VLLM_COMPILE_ORDER): this log's compiles and long custom
    steps, longest first, one "seconds<TAB>target<TAB>file name" line each (a step logged twice, as
    DeepGEMM's is under two paths, keeps its longer time)."""
    longest: dict[tuple[str, str], float] = {}
    for step in steps:
        if (key := _order_key(step)) is None:
            continue
        if not (ORDER_NAME.fullmatch(key[0]) and ORDER_NAME.fullmatch(key[1])):
            raise SystemExit(f"{log_name}: {step.output}: a name patch 0011 cannot match")
        longest[key] = max(longest.get(key, 0.0), step.seconds)
    lines = sorted(longest.items(), key=lambda item: (-item[1], item[0]))
    return (f"# Compile order for vLLM patch 0011, longest first, from {log_name}\n"
            "# (python benchmarks/build_vllm.py LOG --write-order FILE): seconds, target, file name\n"
            + "".join(f"{seconds:.1f}\t{target}\t{name}\n" for (target, name), seconds in lines))


def _table(title: str, rows: dict[str, tuple[int, float]], baseline: dict[str, tuple[int, float]] | None) -> None:
    print(f"\n{title:<28} {'TUs':>5} {'CPU-s':>9}" + (f" {'baseline':>9} {'ratio':>7}" if baseline is not None else ""))
    for name in sorted(set(rows) | set(baseline or {}), key=lambda n: -rows.get(n, (0, 0.0))[1]):
        count, seconds = rows.get(name, (0, 0.0))
        line = f"{name:<28} {count:>5} {seconds:>9.0f}"
        if baseline is not None:
            base = baseline.get(name, (0, 0.0))[1]
            line += f" {base:>9.0f} {(seconds / base if base else float('nan')):>7.2f}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", type=Path, help="the .ninja_log of the build to measure")
    parser.add_argument("--baseline", type=Path, help="the .ninja_log of the build to compare against")
    parser.add_argument("--cores", type=int, default=32, help="cores for the predicted wall time")
    parser.add_argument("--write-order", type=Path, metavar="FILE",
                        help="write the log's compiles, longest first, as vLLM patch 0011's order table")
    args = parser.parse_args()
    if args.write_order:
        args.write_order.write_text(compile_order(read_log(args.log), args.log.name), encoding="utf-8")
        print(f"wrote {args.write_order}")
        return
    run = summarize(read_log(args.log))
    base = summarize(read_log(args.baseline)) if args.baseline else None
    print(f"{args.log}: {run.steps} steps, {run.compiles} compiles, {run.cpu_s:,.0f} CPU-s, "
          f"{run.wall_s:,.0f} s wall as logged")
    print(f"predicted wall on {args.cores} cores: {run.predicted_wall(args.cores):,.0f} s "
          f"(max of CPU-s/{args.cores} and the longest step)")
    _table("target", run.by_target, base.by_target if base else None)
    _table("kernel family", run.by_family, base.by_family if base else None)
    if run.by_fa2_kind:
        _table("FA2 TUs by kernel", run.by_fa2_kind, base.by_fa2_kind if base else None)
        ratio, base_ratio = run.fa2_split_per_forward, base.fa2_split_per_forward if base else None
        if ratio is not None:
            print(f"FA2 split-KV + split-align CPU-s per plain forward CPU-s: {ratio:.2f}"
                  + (f" (baseline {base_ratio:.2f}, ratio {ratio / base_ratio:.2f}x)" if base_ratio else ""))
    print("\nlongest steps (the wall-time floor):")
    for step in run.longest:
        print(f"  {step.seconds:>7.0f} s  {step.output}")
    if base:
        print(f"\nbaseline {args.baseline}: {base.compiles} compiles, {base.cpu_s:,.0f} CPU-s, "
              f"{base.wall_s:,.0f} s wall as logged")
        print(f"ratio (baseline / this): CPU {base.cpu_s / run.cpu_s:.2f}x, "
              f"wall as logged {base.wall_s / max(run.wall_s, 1e-9):.2f}x, "
              f"predicted wall on {args.cores} cores {base.predicted_wall(args.cores) / run.predicted_wall(args.cores):.2f}x")


if __name__ == "__main__":
    main()

"""flash-attn 2.8.3: compile cost of one upstream-default TU vs the same TU in gpuwheel's inference profile.

Both compiles run in this invocation, on the same patched tree (patches/flash-attn/2.8.3), same nvcc,
same torch headers, same arch:
  upstream  the TU with setup.py's flags, no feature macros, --threads NVCC_THREADS (upstream default 4)
  profile   the TU with the macros GPUWHEEL_FA_DISABLE selects (gpuwheel_fa_profile.flags()), --threads 1
Prints wall time, CPU time and peak RSS of each, the measured per-TU ratio, and the projected full
builds: upstream = 72 TUs x its default archs, profile = forward + split-KV TUs of the chosen head dims
x 1 arch, each as (TUs x CPU-s per TU) / cores, since compiles are CPU-bound at one arch per TU.

    python benchmarks/build_flash_attn.py --python /work/venvs/torch2141/bin/python
        [--tree PATCHED_TREE] [--arch 120] [--head-dims 128] [--tu hdim128_fp16] [--cores N]

--python: an interpreter with the CUDA torch the build uses (its headers and nvcc flags).
Without --tree the sdist is fetched and patched the way `gpuwheel build` does (recipe rtx6000pro-cu13).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpuwheel.run import capture

UPSTREAM_DEFAULT_ARCHS = ("80", "90", "100", "120")  # setup.py: FLASH_ATTN_CUDA_ARCHS default
UPSTREAM_NVCC_THREADS = "4"  # setup.py: append_nvcc_threads default
# setup.py's nvcc_flags (2.8.3); -std is set like patch 0001 does (C++20 from torch 2.14).
SETUP_NVCC_FLAGS = ("-O3", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                    "-U__CUDA_NO_HALF2_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                    "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math")
TORCH_QUERY = """
import json, sysconfig, torch
from torch.utils import cpp_extension as ce
try:
    includes = ce.include_paths(device_type="cuda")
except TypeError:  # torch < 2.6
    includes = ce.include_paths(cuda=True)
print(json.dumps({"torch": torch.__version__, "includes": includes, "common": ce.COMMON_NVCC_FLAGS,
                  "python_include": sysconfig.get_paths()["include"]}))
"""


def prepared_tree(workdir: Path) -> Path:
    """The flash-attn sdist fetched (cached) and patched exactly as a gpuwheel build prepares it."""
    from gpuwheel.patches import prepare_trees
    from gpuwheel.plan import make_plan
    from gpuwheel.recipe import load_recipe
    from gpuwheel.sources import fetch_sources

    plan = make_plan(load_recipe("rtx6000pro-cu13"), only=("flash-attn",))
    sources = fetch_sources(plan, only=("flash-attn",), progress=False)
    return prepare_trees(plan, sources, workdir, only=("flash-attn",)).package("flash-attn").tree


def upstream_sources(tree: Path) -> list[str]:
    """The TU list setup.py passes to gpuwheel_fa_profile.sources(), read from setup.py itself."""
    for node in ast.walk(ast.parse((tree / "setup.py").read_text())):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "gpuwheel_fa_profile.sources":
            return ast.literal_eval(node.args[0])
    raise SystemExit(f"{tree}/setup.py: no gpuwheel_fa_profile.sources([...]) call; is patch 0002 applied?")


def profile_module(tree: Path):
    sys.path.insert(0, str(tree))
    import gpuwheel_fa_profile
    return gpuwheel_fa_profile


def compile_tu(nvcc: str, argv: list[str], log: Path) -> dict:
    """Run one nvcc compile; wall, CPU (user+sys of nvcc and its children) and the largest RSS."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    with log.open("w") as out:
        process = subprocess.Popen([nvcc, *argv], stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.monotonic() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"nvcc failed (exit {os.waitstatus_to_exitcode(status)}); see {log}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    # ru_maxrss of wait4: the largest single process of the compile (cicc/ptxas/cc1plus), in KiB.
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_gb": usage.ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter with the CUDA torch to build against")
    parser.add_argument("--tree", type=Path, help="a flash-attn 2.8.3 tree with gpuwheel's patches applied")
    parser.add_argument("--nvcc", default=str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin/nvcc"))
    parser.add_argument("--arch", default="120", help="FLASH_ATTN_CUDA_ARCHS-style arch of both compiles")
    parser.add_argument("--head-dims", default="128", help="profile head dims, ';'-separated (for the projection)")
    parser.add_argument("--disable", default="DROPOUT;ALIBI;SOFTCAP;LOCAL;UNEVEN_K", help="GPUWHEEL_FA_DISABLE")
    parser.add_argument("--tu", default="hdim128_fp16", help="which forward TU: flash_fwd_<TU>_sm80.cu")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="cores of the machine projected")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="gpuwheel-bench-fa-") as scratch:
        scratch = Path(scratch)
        tree = args.tree.resolve() if args.tree else prepared_tree(scratch / "work")
        cuda_home = Path(args.nvcc).resolve().parents[1]  # torch's include paths follow CUDA_HOME
        query = capture([args.python, "-c", TORCH_QUERY], env={**os.environ, "CUDA_HOME": str(cuda_home)})
        if query.returncode != 0:
            raise SystemExit(f"{args.python}: cannot read torch's build flags: {query.stderr.strip()[-300:]}")
        torch_info = json.loads(query.stdout)
        release = tuple(int(x) for x in torch_info["torch"].split("+")[0].split(".")[:2])
        cxx_std = "c++20" if release >= (2, 14) else "c++17"

        profile = profile_module(tree)
        env = {"GPUWHEEL_FA_INFERENCE": "1", "GPUWHEEL_FA_HEAD_DIMS": args.head_dims,
               "GPUWHEEL_FA_DISABLE": args.disable}
        all_tus = [s for s in upstream_sources(tree) if s.endswith(".cu")]
        profile_tus = [s for s in profile.sources(all_tus, env) if s.endswith(".cu")]
        source = tree / f"csrc/flash_attn/src/flash_fwd_{args.tu}_sm80.cu"
        if not source.is_file():
            raise SystemExit(f"{source}: no such TU (--tu takes e.g. hdim128_fp16, split_hdim64_bf16_causal)")

        includes = [str(tree / "csrc/flash_attn"), str(tree / "csrc/flash_attn/src"),
                    str(tree / "csrc/cutlass/include"), *torch_info["includes"], torch_info["python_include"]]
        base = ([f"-I{i}" for i in includes] + ["-c", str(source)] + torch_info["common"]
                + ["--compiler-options", "-fPIC", f"-std={cxx_std}", *SETUP_NVCC_FLAGS,
                   "-gencode", f"arch=compute_{args.arch},code=sm_{args.arch}",
                   "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=flash_attn_2_cuda"])
        runs = {
            "upstream": base + ["--threads", UPSTREAM_NVCC_THREADS, "-o", str(scratch / "upstream.o")],
            "profile": base + profile.flags(env) + ["--threads", "1", "-o", str(scratch / "profile.o")],
        }
        print(f"TU {source.name}, sm_{args.arch}, nvcc {args.nvcc}, torch {torch_info['torch']} (-std={cxx_std}), "
              f"{args.cores} cores", flush=True)
        results = {}
        for name, argv in runs.items():
            results[name] = compile_tu(args.nvcc, argv, scratch / f"{name}.log")
            r = results[name]
            print(f"  {name:8s} wall {r['wall_s']:6.1f} s  cpu {r['cpu_s']:6.1f} s  "
                  f"peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)

    up, pr = results["upstream"], results["profile"]
    n_archs = len(UPSTREAM_DEFAULT_ARCHS)
    upstream_cpu = len(all_tus) * n_archs * up["cpu_s"]
    profile_cpu = len(profile_tus) * pr["cpu_s"]
    print(f"per-TU ratio (upstream / profile): wall {up['wall_s'] / pr['wall_s']:.2f}x, "
          f"cpu {up['cpu_s'] / pr['cpu_s']:.2f}x")
    print(f"projected upstream default: {len(all_tus)} TUs x {n_archs} archs x {up['cpu_s']:.0f} cpu-s "
          f"/ {args.cores} cores = {upstream_cpu / args.cores / 60:.0f} min "
          f"(arch cost taken as linear; bwd/split TUs as this TU)")
    print(f"projected profile: {len(profile_tus)} TUs (head dims {args.head_dims}) x 1 arch x "
          f"{pr['cpu_s']:.0f} cpu-s / {args.cores} cores = {profile_cpu / args.cores / 60:.1f} min "
          f"(+ flash_api.cpp in both)")
    print(f"projected full-build ratio: {upstream_cpu / profile_cpu:.0f}x")


if __name__ == "__main__":
    main()

"""Run an nvcc command line with the source's canonical path and a seed derived from it.

    python nvcc_canonical.py [LAUNCHER…] NVCC ARGS…     (GPUWHEEL_PATH_MAP: one `real=canonical` a line)

nvcc's front end names internal-linkage entities `_INTERNAL_<hash of the .cu's absolute path>_…`,
with a random part besides; both reach the `.so` (its registration strings and the cubins' symbol
names). For each `.cu` argument this adds `-Xcudafe --orig_src_path_name=<its canonical path>` (the
path as the container backend compiles it) and `-frandom-seed=<that path>` (a seed of its own per
file, as nvcc asks), then runs the command. Run by the local backend through `PYTORCH_NVCC` (torch
extensions) and CMake's CUDA compiler launcher; standard library only, for any toolchain Python.
"""

from __future__ import annotations

import os
import sys


def canonical_flags(args: list[str], path_map: list[tuple[str, str]]) -> list[str]:
    flags = []
    for arg in args:
        if not arg.endswith(".cu") or not os.path.isfile(arg):
            continue
        source = os.path.realpath(arg)
        for real, canonical in path_map:
            if source == real or source.startswith(real.rstrip("/") + "/"):
                source = canonical + source[len(real.rstrip("/")) :]
                break
        flags += ["-Xcudafe", f"--orig_src_path_name={source}", f"-frandom-seed={source}"]
    return flags


def main() -> None:
    command = sys.argv[1:]
    path_map = [
        tuple(line.split("=", 1)) for line in os.environ.get("GPUWHEEL_PATH_MAP", "").splitlines() if "=" in line
    ]
    argv = command + canonical_flags(command, [(os.path.realpath(real), canonical) for real, canonical in path_map])
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()

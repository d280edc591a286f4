"""Cold toolchain-venv creation, uv against pip, in one run (issue 14).

    python benchmarks/toolchain_venv.py [TARGET] [--keep]

Makes TARGET's toolchain venv (default rtx6000pro-cu13: torch and its CUDA libraries, the build
requirements, and the PyPI CUDA toolkit where no nvcc is installed) twice, exactly as `gpuwheel build
--backend local` does: once with uv and once with pip, each with an empty download cache of its own
(UV_CACHE_DIR, PIP_CACHE_DIR) and into a scratch GPUWHEEL_CACHE, so nothing is reused. Both read the
packages from where pip's configuration says (uv through gpuwheel's hand-over). Prints each wall time
and pip's over uv's. The scratch folders are removed afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", nargs="?", default="rtx6000pro-cu13")
    parser.add_argument("--keep", action="store_true", help="keep the scratch venvs and caches")
    args = parser.parse_args()

    from gpuwheel.backends import local
    from gpuwheel.backends.venv import find_uv
    from gpuwheel.recipe import load_recipe

    if find_uv() is None:
        sys.exit("no uv on PATH or beside this interpreter: pip install uv")
    toolchain = load_recipe(args.target).toolchain
    base = local._find_python(toolchain.python)
    provision_cuda = local._find_nvcc() is None  # as LocalBackend.prepare decides
    scratch = Path(tempfile.mkdtemp(prefix="gpuwheel-venv-bench-"))
    times: dict[str, float] = {}
    try:
        # uv first: whatever the first run leaves in the page cache (the local wheel files) favours pip.
        for installer in ("uv", "pip"):
            os.environ.update(GPUWHEEL_CACHE=str(scratch / installer / "gpuwheel"),
                              UV_CACHE_DIR=str(scratch / installer / "uv-cache"),
                              PIP_CACHE_DIR=str(scratch / installer / "pip-cache"))
            venv, requirements = local.toolchain_venv(toolchain, base, provision_cuda=provision_cuda)
            venv.parent.mkdir(parents=True)
            start = time.perf_counter()
            local.LocalBackend(installer=installer)._make_venv(venv, base, requirements)
            times[installer] = time.perf_counter() - start
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"cold toolchain venv for {args.target} (torch {toolchain.torch}, CUDA {toolchain.cuda}, "
          f"{len(requirements)} requirements, Python {toolchain.python}; load average {os.getloadavg()[0]:.1f})")
    for installer, seconds in times.items():
        print(f"  {installer:<4} {seconds:7.1f} s")
    print(f"  pip / uv: {times['pip'] / times['uv']:.1f}x")


if __name__ == "__main__":
    main()

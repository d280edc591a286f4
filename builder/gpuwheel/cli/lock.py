"""`gpuwheel lock TARGET`: write <recipe dir>/<target>.lock; `--check`: fail when it is stale."""

from __future__ import annotations

import json

import click

from gpuwheel.cli.group import TARGET, main


@main.command("lock")
@TARGET
@click.option(
    "--only",
    multiple=True,
    metavar="PACKAGE",
    help="Lock just this package (repeatable); `build --only` of the same packages then builds from it.",
)
@click.option(
    "--check",
    is_flag=True,
    help="Write nothing; exit 21 when the lock is missing or stale (the CI step). "
    "Needs no network: compares the recipe's inputs and the toolchain requirements.",
)
@click.option(
    "--python",
    "python",
    metavar="PY",
    help="The interpreter the toolchain venv is made from "
    "(default: python<x.y> of the recipe on PATH), which pip resolves for.",
)
@click.option(
    "--cuda-from",
    type=click.Choice(["auto", "host", "pypi"]),
    default="auto",
    show_default=True,
    help="Where the locked build's CUDA toolkit comes from: the host's nvcc, or the pinned PyPI wheels "
    "(CUDA 13.0; for CI runners without CUDA); auto: the host's where there is one.",
)
@click.option("--offline", is_flag=True, help="Use only cached sources.")
@click.option("--json", "as_json", is_flag=True, help="Print the lock as JSON on stdout.")
def lock(
    target: str, only: tuple[str, ...], check: bool, python: str | None, cuda_from: str, offline: bool, as_json: bool
) -> None:
    """Pin every input of TARGET's build — sources, toolchain packages with hashes, nvcc — in a lock file."""
    from gpuwheel.backends.base import toolchain_requirements
    from gpuwheel.backends.local import LocalBackend
    from gpuwheel.cache import cache_root
    from gpuwheel.lock import lock_path, make_lock, read_lock, resolve_environment, write_lock
    from gpuwheel.log import out, say
    from gpuwheel.plan import make_plan
    from gpuwheel.recipe import load_recipe
    from gpuwheel.sources import fetch_sources

    recipe = load_recipe(target)
    plan = make_plan(recipe, only=only)
    path = lock_path(plan)
    if check:
        existing = read_lock(path)
        # What the lock holds is checked, not what --only names: CI checks the file it commits.
        existing.check_plan(
            plan
            if not only and tuple(p.name for p in plan.packages) == existing.packages
            else make_plan(recipe, only=existing.packages)
        )
        # The same toolkit choice as when locked (host nvcc or PyPI wheels): a CPU runner without
        # nvcc checks the recipe's requirements, not its own machine.
        existing.check_requirements(
            toolchain_requirements(plan.toolchain, cuda_from_pypi=existing.cuda_toolkit is None)
        )
        if as_json:
            click.echo(json.dumps({"lock": existing.to_json(), "stale": False}, indent=2))
        else:
            out.print(f"{path}: up to date (plan {existing.plan_hash[:16]})", markup=False, soft_wrap=True)
        return
    sources = fetch_sources(plan, offline=offline, progress=not as_json)
    inputs = LocalBackend(python=python).resolution_inputs(
        plan.toolchain, cuda_from_pypi={"auto": None, "host": False, "pypi": True}[cuda_from]
    )
    log_path = cache_root() / "logs" / plan.hash[:16] / "lock-resolve.log"
    say(
        f"resolving the toolchain environment ({len(inputs.requirements)} requirements) with {inputs.python} -m pip; "
        f"log {log_path}"
    )
    environment = resolve_environment(inputs.python, inputs.requirements, log_path=log_path)
    written = make_lock(
        plan,
        sources,
        python=inputs.python_version,
        requirements=inputs.requirements,
        environment=environment,
        cuda_toolkit=inputs.nvcc,
        path=path,
    )
    write_lock(written)
    if as_json:
        click.echo(json.dumps(written.to_json(), indent=2))
        return
    out.print(
        f"{path}: {len(written.sources)} sources, {len(environment)} toolchain packages, "
        f"nvcc {inputs.nvcc or 'from PyPI'}; plan {plan.hash[:16]}",
        markup=False,
        soft_wrap=True,
    )

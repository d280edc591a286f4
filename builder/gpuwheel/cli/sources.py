"""`gpuwheel fetch` and `gpuwheel patches check`: hermetic sources and the patch sets on them."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

import click

from gpuwheel.cli.group import TARGET, main
from gpuwheel.errors import PatchError

if TYPE_CHECKING:  # stage modules load in the command that runs them, not for `gpuwheel --help` (group.py)
    from gpuwheel.sources import Sources
OFFLINE = click.option(
    "--offline", is_flag=True, help="Use only the cache (also GPUWHEEL_OFFLINE=1); never touch the network."
)
ONLY = click.option("--only", "only", multiple=True, metavar="PKG", help="Only this package (repeatable).")
JSON = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")


@main.command()
@TARGET
@OFFLINE
@ONLY
@click.option(
    "--dependency-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="DIR/<name>/: each dependency as a git checkout at its pin, or a git mirror (bare "
    "repository) it is checked out of, its submodules from the mirrors DIR/<repository name>.",
)
@click.option("--strict", is_flag=True, help="Fail (exit 4) while any dependency still needs network.")
@JSON
def fetch(
    target: str, offline: bool, only: tuple[str, ...], dependency_dir: Path | None, strict: bool, as_json: bool
) -> None:
    """Fetch and verify every source of TARGET, and its packages' build-time dependencies, into the cache."""
    from gpuwheel.plan import make_plan
    from gpuwheel.recipe import load_recipe
    from gpuwheel.sources import fetch_sources

    # Download progress goes to stderr, so it stays on beside --json (which is on stdout).
    sources = fetch_sources(
        make_plan(load_recipe(target), only=only), offline=offline, dependency_dir=dependency_dir, progress=True
    )
    if as_json:
        click.echo(json.dumps(sources.to_json(), indent=2))
    else:
        _render_sources(sources)
    if strict:
        sources.require_complete()


def _render_sources(sources: Sources) -> None:
    from rich.markup import escape
    from rich.table import Table

    from gpuwheel.log import console, out
    from gpuwheel.sources import NEEDS_NETWORK

    table = Table(
        "package",
        "version",
        "source",
        "status",
        "pin",
        "tree",
        title=escape(f"sources ({sources.cache})"),
        title_justify="left",
    )
    for p in sources.packages:
        table.add_row(
            escape(p.name), escape(p.version), p.kind, p.status, (p.sha256 or p.commit or "")[:16], escape(str(p.tree))
        )
    out.print(table)
    deps = [(p.name, d) for p in sources.packages for d in p.dependencies]
    if deps:
        table = Table(
            "package",
            "dependency",
            "rev",
            "status",
            "tree / command on a connected machine",
            title_justify="left",
            title="build-time dependencies",
        )
        for package, d in deps:
            style = "yellow" if d.status == NEEDS_NETWORK else ""
            # Recipe values are shown as text, never read as rich markup (a URL may hold '[/x]').
            table.add_row(
                escape(package),
                escape(d.name),
                escape(d.rev[:16]),
                f"[{style}]{d.status}[/{style}]" if style else d.status,
                escape(d.fetch_command if d.tree is None else str(d.tree)),
            )
        out.print(table)
    missing = sources.needs_network
    if missing:
        console.print(
            f"[yellow]{len(missing)} dependencies need network[/yellow]: run the commands above on a "
            f"connected machine, copy deps/ here, then `gpuwheel fetch {escape(shlex.quote(sources.target))} "
            f"--dependency-dir deps` (or copy that machine's {escape(str(sources.cache))})"
        )
    else:
        out.print("every source is in the cache")


@main.group("patches")
def patches_group() -> None:
    """Patch sets applied to the fetched sources."""


@patches_group.command("check")
@TARGET
@OFFLINE
@ONLY
@JSON
def check(target: str, offline: bool, only: tuple[str, ...], as_json: bool) -> None:
    """Apply every patch of TARGET to fresh trees: applied / already upstream / failed (exit 6)."""
    from gpuwheel.patches import APPLIED, FAILED, SKIPPED, UPSTREAM, check_patches
    from gpuwheel.plan import make_plan
    from gpuwheel.recipe import load_recipe
    from gpuwheel.sources import fetch_sources

    plan = make_plan(load_recipe(target), only=only)
    report = check_patches(plan, fetch_sources(plan, offline=offline, progress=True))
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        from rich.markup import escape
        from rich.table import Table

        from gpuwheel.log import console, out

        colours = {APPLIED: "green", UPSTREAM: "cyan", FAILED: "red"}
        table = Table("package", "patch", "tree", "status", "detail")
        for o in report.outcomes:
            colour = colours.get(o.status, "yellow")
            table.add_row(
                escape(o.package),
                escape(o.patch),
                escape(o.where),
                f"[{colour}]{o.status}[/{colour}]",
                escape(o.detail),
            )
        out.print(table if report.outcomes else "the plan carries no patches")
        skipped = [o for o in report.outcomes if o.status == SKIPPED]
        if skipped:
            console.print(
                f"[yellow]{len(skipped)} patches not checked[/yellow]: their dependency trees need "
                f"network (`gpuwheel fetch {escape(target)}` lists how to bring them)"
            )
    if report.failed:
        first = report.failed[0]
        raise PatchError(
            f"{len(report.failed)} of {len(report.outcomes)} patches do not apply; first: "
            f"{first.package} {first.patch}: {first.detail}",
            hint="refresh them against the fetched sources or drop them from their series",
        )

"""`gpuwheel ci github [TARGET…]`: a GitHub Actions workflow from the recipes; `gpuwheel ci summary`."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import click

from gpuwheel.cli.group import complete_target, main

WORKFLOW = Path(".github/workflows/gpuwheel.yml")


@main.group()
def ci() -> None:
    """CI generated from the recipes."""


@ci.command("github")
@click.argument("targets", nargs=-1, metavar="[TARGET]...", shell_complete=complete_target)
@click.option("--only", multiple=True, metavar="PACKAGE", help="Build just this package of every target (repeatable).")
@click.option(
    "--install",
    default="gpuwheel",
    show_default=True,
    metavar="SPEC",
    help="What the jobs `pip install` gpuwheel from (a version pin, a git URL, `.` for this checkout).",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=WORKFLOW,
    show_default=True,
    help="Where the workflow is written; - for stdout.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the workflow's path and matrix as JSON on stdout.")
def github(targets: tuple[str, ...], only: tuple[str, ...], install: str, output: Path, as_json: bool) -> None:
    """Write a GitHub Actions workflow building, auditing, smoke-testing and publishing TARGETs (default: all)."""
    from gpuwheel.ci import ci_target, github_workflow
    from gpuwheel.log import out
    from gpuwheel.plan import make_plan
    from gpuwheel.recipe import list_targets, load_recipe

    references = targets or tuple(list_targets())
    rows = [ci_target(reference, make_plan(load_recipe(reference), only=only), only) for reference in references]
    command = " ".join(
        [
            "gpuwheel ci github",
            *map(shlex.quote, targets),
            *(f"--only {shlex.quote(p)}" for p in only),
            *([f"--install {shlex.quote(install)}"] if install != "gpuwheel" else []),
        ]
    )
    text = github_workflow(rows, install=install, command=command)
    if str(output) == "-":
        click.echo(text, nl=False)
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
    if as_json:
        click.echo(json.dumps({"path": str(output), "matrix": [row.row() for row in rows]}, indent=2))
        return
    out.print(f"{output}: {len(rows)} target(s): {', '.join(row.target for row in rows)}", markup=False, soft_wrap=True)


@ci.command("summary")
@click.argument("reports", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
def summary(reports: tuple[Path, ...]) -> None:
    """Markdown for $GITHUB_STEP_SUMMARY from build --json, audit --json, smoke and verify --json reports."""
    from gpuwheel.ci import summary_markdown

    parsed = []
    for path in reports:
        try:
            parsed.append((path.name, json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError):
            parsed.append((path.name, None))  # the step that writes it failed: the summary says so
    click.echo(summary_markdown(parsed), nl=False)

"""`gpuwheel smoke`: install a target's wheels from an index and run the checks on the target GPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from gpuwheel.cli.group import TARGET, main
from gpuwheel.errors import SmokeFailure, SmokeNotOnTarget

if TYPE_CHECKING:  # stage modules load in the command that runs them, not for `gpuwheel --help` (group.py)
    from gpuwheel.smoke.report import SmokeReport

_STYLE = {"pass": "green", "fail": "bold red", "skip": "yellow"}


@main.command()
@TARGET
@click.option(
    "--index",
    "index_url",
    metavar="URL",
    help="Install the wheels from this index (a simple URL or a local index directory).",
)
@click.option(
    "--wheels",
    "wheels_dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Install the wheels of DIR, through a throwaway static index (default: wheels/<target>/staging/).",
)
@click.option(
    "--python", metavar="PY", help="Run in this interpreter (one holding the pinned torch) instead of a fresh venv."
)
@click.option("--junit", type=click.Path(dir_okay=False, path_type=Path), help="Write JUnit XML here.")
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the report file here (default: smoke.json beside the wheels, which `gpuwheel publish` reads).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the report as JSON on stdout (the report file is written too)."
)
def smoke(
    target: str,
    index_url: str | None,
    wheels_dir: Path | None,
    python: str | None,
    junit: Path | None,
    report_path: Path | None,
    as_json: bool,
) -> None:
    """Smoke-test TARGET's wheels: imports, .so loads against torch, native code for the GPU, and
    the kernels at the users' crashing shapes (8192 tokens) on the target GPU.

    Exits 12 when a check fails, 14 when nothing failed but the GPU checks were skipped (no GPU,
    or a GPU of another compute capability): that is never a pass.
    """
    if index_url and wheels_dir:
        raise click.UsageError("give --index URL or --wheels DIR, not both")
    from gpuwheel.smoke.report import FAIL
    from gpuwheel.smoke.runner import run_smoke

    report = run_smoke(
        target, index_url=index_url, wheels_dir=wheels_dir, python=python, junit=junit, json_out=report_path
    )
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        _render(report)
    if report.failed:
        failed = [f"{suite}: {c.name}" for suite, c in _rows(report) if c.status == FAIL]
        raise SmokeFailure(
            f"{len(failed)} smoke check(s) failed for target {report.target}: {failed[0]}"
            + (f" (+{len(failed) - 1} more)" if len(failed) > 1 else "")
        )
    if not report.gpu_ran:
        raise SmokeNotOnTarget(
            f"not smoke-tested on the target GPU: {report.gpu_skip_reason}",
            hint="run on a machine with the target GPU; the publish gate refuses these wheels",
        )


def _rows(report: SmokeReport):
    yield from (("environment", check) for check in report.checks)
    for wheel in report.wheels:
        yield from ((wheel.filename, check) for check in wheel.checks)


def _render(report: SmokeReport) -> None:
    from rich.markup import escape
    from rich.table import Table

    from gpuwheel.log import out

    gpu = f"{report.gpu.name} ({report.gpu.compute_capability})" if report.gpu else "no GPU"
    table = Table(
        "wheel",
        "check",
        "result",
        "s",
        "detail",
        title_justify="left",
        title=escape(
            f"smoke of {report.target} (compute capability {report.compute_capability}) on {gpu}, "
            f"python {report.python}, torch {report.torch or '-'}"
        ),
    )
    for suite, check in _rows(report):
        style = _STYLE[check.status]
        table.add_row(
            escape(suite),
            escape(check.name),
            f"[{style}]{check.status}[/{style}]",
            f"{check.seconds:.1f}",
            escape(check.detail),
        )
    out.print(table)
    verdict = (
        "[green]passed on the target GPU[/green]"
        if report.passed
        else "[bold red]failed[/bold red]"
        if report.failed
        else "[yellow]not smoke-tested on the target GPU[/yellow]"
    )
    out.print(f"smoke: {verdict}; installed from {escape(report.index_url)}", soft_wrap=True)

"""`gpuwheel publish`: a target's audited and smoke-tested wheels to its static index or a remote one."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from gpuwheel.cli import main
from gpuwheel.index import publish_target
from gpuwheel.log import console


@main.command()
@click.argument("target", metavar="[TARGET]", required=False)
@click.option("--wheels", "wheels_dir", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Publish the wheels in DIR (default: wheels/<target>/staging/).")
@click.option("--repository", "-r", metavar="URL|NAME",
              help="Upload with twine to this upload URL or .pypirc section, instead of the local index.")
@click.option("--simple-url", metavar="URL",
              help="The remote index's simple URL, to check what is already there "
                   "(default: <repository>/simple/ or /+simple/).")
@click.option("--config-file", type=click.Path(dir_okay=False, path_type=Path),
              help="The .pypirc to read (default: ~/.pypirc).")
@click.option("--index-dir", type=click.Path(file_okay=False, path_type=Path),
              help="The local static index (default: wheels/<target>/).")
@click.option("--smoke-report", type=click.Path(dir_okay=False, path_type=Path),
              help="The smoke report to gate on (default: smoke.json beside the wheels).")
@click.option("--force", is_flag=True, help="Publish without the audit and smoke checks (warns per wheel).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def publish(target: str | None, wheels_dir: Path | None, repository: str | None, simple_url: str | None,
            config_file: Path | None, index_dir: Path | None, smoke_report: Path | None, force: bool,
            as_json: bool) -> None:
    """Publish TARGET's wheels that passed audit and smoke on the target's GPU.

    Credentials for --repository come from TWINE_USERNAME / TWINE_PASSWORD, the .pypirc section or
    keyring; they are never printed.
    """
    report = publish_target(target, wheels_dir=wheels_dir, repository=repository, index_dir=index_dir,
                            smoke_report=smoke_report, force=force, simple_url=simple_url,
                            config_file=config_file)
    for wheel in report.wheels:
        for warning in wheel.warnings:
            console.print(f"[bold yellow]gpuwheel: warning:[/bold yellow] {warning}", soft_wrap=True)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    table = Table("wheel", "sha256", "result", title=f"published to {report.destination}", title_justify="left")
    for wheel in report.wheels:
        result = ("[green]published[/green]" if wheel.action == "published"
                  else "[dim]skipped: already there with the same sha256[/dim]")
        table.add_row(wheel.filename, wheel.sha256[:16], result)
    console.print(table)
    console.print(f"install with: pip install --index-url {report.index_url} <package>", soft_wrap=True)

"""`gpuwheel publish`: a target's audited and smoke-tested wheels to its static index or a remote one."""

from __future__ import annotations

import json
from pathlib import Path

import click

from gpuwheel.cli.group import complete_target, main


@main.command()
@click.argument("target", metavar="[TARGET]", required=False, shell_complete=complete_target)
@click.option(
    "--wheels",
    "wheels_dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Publish the wheels in DIR (default: wheels/<target>/staging/).",
)
@click.option(
    "--repository",
    "-r",
    metavar="URL|NAME",
    help="Upload with twine to this upload URL or .pypirc section, instead of the local index.",
)
@click.option(
    "--simple-url",
    metavar="URL",
    help="The remote index's simple URL, to check what is already there (default: <repository>/simple/ or /+simple/).",
)
@click.option(
    "--config-file", type=click.Path(dir_okay=False, path_type=Path), help="The .pypirc to read (default: ~/.pypirc)."
)
@click.option(
    "--index-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="The local static index (default: wheels/<target>/).",
)
@click.option(
    "--smoke-report",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The smoke report to gate on (default: smoke.json beside the wheels).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Publish wheels the gate would refuse: skips the audit check (passed, for the target and its "
    "arch) and the smoke check (passed on a GPU of the target's compute capability). Each wheel "
    "let through gets a warning naming what it skipped, and is published marked (gpuwheel.json "
    "`publish`, the index's `_gpuwheel`) as force-published and, without a passing smoke, "
    "not GPU-tested.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def publish(
    target: str | None,
    wheels_dir: Path | None,
    repository: str | None,
    simple_url: str | None,
    config_file: Path | None,
    index_dir: Path | None,
    smoke_report: Path | None,
    force: bool,
    as_json: bool,
) -> None:
    """Publish TARGET's wheels that passed audit and smoke on the target's GPU.

    Credentials for --repository come from TWINE_USERNAME / TWINE_PASSWORD, the .pypirc section or
    keyring; they are never printed.
    """
    from rich.markup import escape

    from gpuwheel.log import console
    from gpuwheel.publish import publish as publish_stage

    report = publish_stage(
        target,
        wheels_dir=wheels_dir,
        repository=repository,
        index_dir=index_dir,
        smoke_report=smoke_report,
        force=force,
        simple_url=simple_url,
        config_file=config_file,
    )
    for wheel in report.wheels:
        for warning in wheel.warnings:
            console.print(f"[bold yellow]gpuwheel: warning:[/bold yellow] {escape(warning)}", soft_wrap=True)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    from rich.table import Table

    from gpuwheel.log import out

    table = Table("wheel", "sha256", "result", title=escape(f"published to {report.destination}"), title_justify="left")
    for wheel in report.wheels:
        result = (
            "[green]published[/green]"
            if wheel.action == "published"
            else "[dim]skipped: already there with the same sha256[/dim]"
        )
        table.add_row(escape(wheel.filename), wheel.sha256[:16], result)
    out.print(table)
    for line in install_hint(report.index_url, [w.filename for w in report.wheels]):
        out.print(line, markup=False, highlight=False, soft_wrap=True)


def install_hint(index_url: str, filenames: list[str]) -> list[str]:
    """How a serving host installs these wheels, with pip and with uv.

    The index holds only gpuwheel's wheels, not torch or their other dependencies: pip takes it as an
    extra index beside PyPI (or PyTorch's variant index for cu128 torch) and the exact pins with
    their local labels select gpuwheel's builds; uv pins those packages to an explicit index.
    """
    from packaging.utils import InvalidWheelFilename, parse_wheel_filename

    pins: dict[str, str] = {}
    for filename in filenames:
        try:
            name, version, _, _ = parse_wheel_filename(filename)
        except InvalidWheelFilename:
            continue
        pins[str(name)] = str(version)
    requirements = " ".join(f"'{name}=={version}'" for name, version in sorted(pins.items())) or "PACKAGE"
    sources = (
        ", ".join(f'{name} = {{ index = "gpuwheel" }}' for name in sorted(pins)) or 'PACKAGE = { index = "gpuwheel" }'
    )
    return [
        "install on a serving host (torch from PyPI; add --extra-index-url https://download.pytorch.org/whl/cuXYZ "
        "for a variant build):",
        f"  pip install --extra-index-url {index_url} {requirements}",
        '  uv, in pyproject.toml: [[tool.uv.index]] name = "gpuwheel", url = '
        f'"{index_url}", explicit = true; [tool.uv.sources] {sources}',
    ]

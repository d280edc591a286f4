"""`gpuwheel audit`: can every kernel of a wheel run on the target GPU and driver?"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from gpuwheel.cli.group import complete_target, main
from gpuwheel.errors import AuditFailure

if TYPE_CHECKING:  # stage modules load in the command that runs them, not for `gpuwheel --help` (group.py)
    from gpuwheel import facts
    from gpuwheel.audit.report import AuditReport


def _arch(ctx: click.Context, param: click.Parameter, value: str | None) -> facts.Arch | None:
    if value is None:
        return None
    from gpuwheel import facts

    try:
        arch = facts.parse_arch(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
    if arch.suffix or arch.ptx:
        raise click.BadParameter(f"{value!r}: give the GPU's compute capability, like {arch.plain}")
    return arch


def _driver(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        from gpuwheel import facts

        try:
            facts.driver_tuple(value)
        except ValueError as error:
            raise click.BadParameter(str(error)) from None
    return value


@main.command("audit")
@click.argument("path", type=click.Path(exists=True, dir_okay=True))
@click.option(
    "--target",
    "target_name",
    metavar="TARGET",
    shell_complete=complete_target,
    help="Recipe (name or path): its GPU, min driver and audit.optional globs.",
)
@click.option("--arch", callback=_arch, metavar="X.Y", help="The target GPU's compute capability, e.g. 12.0.")
@click.option(
    "--driver",
    callback=_driver,
    metavar="VERSION",
    help="Oldest driver of the fleet, e.g. 570.195.03 (overrides the target's).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--details", is_flag=True, help="List every fatbin unit of every .so.")
def audit_command(
    path: str, target_name: str | None, arch: facts.Arch | None, driver: str | None, as_json: bool, details: bool
) -> None:
    """Check the SASS/PTX of a wheel, a directory of wheels or a .so against the target GPU and driver."""
    if (target_name is None) == (arch is None):
        raise click.UsageError("give exactly one of --target TARGET or --arch X.Y")
    from gpuwheel.audit.report import AuditTarget, audit

    if target_name is not None:
        from gpuwheel.recipe import load_recipe  # only --target needs the recipe machinery

        target = AuditTarget.from_recipe(load_recipe(target_name), driver)
    else:
        assert arch is not None  # exactly one of --target and --arch, checked above
        target = AuditTarget(arch, driver)
    report = audit(path, target)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        _render(report, details)
    if not report.passed:
        raise AuditFailure(
            f"audit failed for {_target_words(report)}: {report.problems[0]}"
            + (f" (+{len(report.problems) - 1} more)" if len(report.problems) > 1 else "")
        )


def _target_words(report: AuditReport) -> str:
    target = report.target
    return f"GPU {target.arch.plain}" + (f" + driver {target.min_driver}" if target.min_driver else "")


def _render(report: AuditReport, details: bool) -> None:
    from rich.markup import escape
    from rich.table import Table

    from gpuwheel.log import console, out

    with_code = [so for so in report.sos if so.has_gpu_code]
    if not with_code:
        return  # nothing to tabulate: the error line says the input carries no GPU code
    several_wheels = len(report.wheels) > 1
    table = Table(
        *(["wheel"] if several_wheels else []),
        ".so",
        "native",
        "JIT",
        "none",
        "PTX ISA",
        "verdict",
        title=escape(f"audit of {report.path} for {_target_words(report)}"),
    )
    for so in with_code:
        style = {"fail": "red", "optional": "yellow"}.get(so.verdict, "green")
        table.add_row(
            *([escape(so.wheel or "")] if several_wheels else []),
            escape(so.path),
            str(so.count("native")),
            str(so.count("jit")),
            str(so.count("none")),
            so.ptx_isa_range or "—",
            f"[{style}]{so.verdict}[/{style}]",
        )
    out.print(table)
    without = [so.path for so in report.sos if not so.has_gpu_code]
    if without:
        out.print(
            f"{len(without)} ELF file(s) without GPU code" + (": " + ", ".join(without) if details else ""),
            markup=False,
        )
    if not report.driver_checked:
        console.print(
            "[yellow]no driver given: PTX that needs JIT was not checked against any driver "
            "(pass --driver or --target)[/yellow]"
        )
    for so in with_code:
        if so.none_archs:
            out.print(
                f"{so.path}: {so.count('none')} unit(s) with no code for {report.target.arch.plain} "
                f"(carry {', '.join(so.none_archs)}); the library must not dispatch to them there",
                markup=False,
            )
        for waived in so.waived:
            out.print(f"[yellow]waived (audit.optional): {escape(waived)}[/yellow]")
    if details:
        for so in with_code:
            units = Table("unit", "offset", "verdict", "runs as", "SASS", "PTX", "problem", title=escape(so.path))
            for unit in so.units:
                units.add_row(
                    str(unit.index),
                    f"{unit.offset:#x}",
                    unit.verdict,
                    unit.runs_as or "—",
                    " ".join(unit.sass) or "—",
                    escape(
                        ", ".join(f"{name} ({isa})" for name, isa in zip(unit.ptx, unit.ptx_isas, strict=True)) or "—"
                    ),
                    escape(unit.problem or ""),
                )
            out.print(units)
    for problem in report.problems:
        out.print(f"[red]✗ {escape(problem)}[/red]")
    if report.passed:
        out.print(f"[green]✓ every GPU .so runs on {escape(_target_words(report))}[/green]")

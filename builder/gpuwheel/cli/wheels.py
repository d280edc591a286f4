"""`gpuwheel finish` (raw wheels → finished ones) and `gpuwheel show-wheel` (a finished wheel's provenance)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from gpuwheel.cli.group import TARGET, main


def _toolchain(ctx: click.Context, param: click.Parameter, value: Path | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        parsed = json.loads(value.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise click.BadParameter(f"{value}: not a readable JSON file ({error})") from None
    if not isinstance(parsed, dict):
        raise click.BadParameter(f"{value}: must hold a JSON object (nvcc, torch, python, cc, cxx, ...)")
    return parsed


@main.command("finish")
@TARGET
@click.argument(
    "raw_wheels", metavar="RAW_WHEEL...", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path)
)
@click.option("--package", metavar="NAME", help="The plan's package these raw wheels are (default: each file's name).")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the finished wheels go (default: wheels/<target>/staging/).",
)
@click.option(
    "--toolchain",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    callback=_toolchain,
    help="JSON object of the toolchain that built them (nvcc, torch, python, cc, cxx, base_image, "
    "base_image_digest, backend); without it the label uses the plan's pins and the provenance "
    "says the toolchain was not observed.",
)
@click.option(
    "--source-date-epoch",
    type=int,
    envvar="SOURCE_DATE_EPOCH",
    show_envvar=True,
    help="Timestamp of every zip entry (default: the plan's SOURCE_DATE_EPOCH, else 1980-01-01).",
)
@click.option(
    "--allow-audit-failure",
    is_flag=True,
    help="Finish a wheel whose audit fails, marked failed (the publish gate refuses it).",
)
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON on stdout.")
def finish(
    target: str,
    raw_wheels: tuple[Path, ...],
    package: str | None,
    out_dir: Path | None,
    toolchain: dict[str, Any] | None,
    source_date_epoch: int | None,
    allow_audit_failure: bool,
    as_json: bool,
) -> None:
    """Finish RAW_WHEEL(s) built elsewhere for TARGET: label, platform tag, audit, provenance."""
    from gpuwheel.cache import target_lock
    from gpuwheel.layout import target_paths
    from gpuwheel.plan import make_plan
    from gpuwheel.recipe import load_recipe
    from gpuwheel.wheels import finish_wheels

    plan = make_plan(load_recipe(target))
    raw = [(package, path) for path in raw_wheels] if package else list(raw_wheels)
    with target_lock(plan.target.name):  # a build of the target writes the same staging folder
        wheels = finish_wheels(
            plan,
            raw,
            toolchain=toolchain,
            out_dir=out_dir or target_paths(plan.target.name).staging_dir,
            source_date_epoch=source_date_epoch,
            allow_audit_failure=allow_audit_failure,
        )
    if as_json:
        click.echo(json.dumps(wheels.to_json(), indent=2))
        return
    from rich.markup import escape
    from rich.table import Table

    from gpuwheel.log import out

    table = Table(
        "wheel",
        "platform",
        "grafted",
        "audit",
        title=escape(f"finished for {wheels.target} in {wheels.out_dir}"),
        title_justify="left",
    )
    for wheel in wheels.wheels:
        verdict = "[green]passed[/green]" if wheel.audit_passed else "[bold red]FAILED (allowed)[/bold red]"
        table.add_row(escape(wheel.filename), ", ".join(wheel.platform_tags), str(len(wheel.grafted)), verdict)
    out.print(table)


@main.command("show-wheel")
@click.argument("wheel", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the wheel's identity and gpuwheel.json on stdout.")
def show_wheel_command(wheel: Path, as_json: bool) -> None:
    """Print what a finished WHEEL says about itself: target, toolchain, sources, patches, audit."""
    from gpuwheel.wheels import show_wheel

    shown = show_wheel(wheel)
    if as_json:
        click.echo(json.dumps(shown, indent=2, sort_keys=True))
        return
    _render(shown)


def _render(shown: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    from gpuwheel.log import out

    shown = _escaped(shown, escape)
    record = shown["provenance"]
    spec, audit, wheel = record.get("target_spec", {}), record.get("audit", {}), record.get("wheel", {})
    toolchain = record.get("toolchain", {})
    table = Table("field", "value", title=shown["filename"], title_justify="left", show_header=False)
    table.add_row("package", f"{shown['name']} {shown['version']}")
    table.add_row(
        "target",
        f"{record.get('target')} ({spec.get('gpu', '?')}, compute capability "
        f"{spec.get('compute_capability', '?')}, arch list {spec.get('torch_cuda_arch_list', '?')}, "
        f"min driver {spec.get('min_driver', '?')})",
    )
    table.add_row("plan hash", str(record.get("plan_hash")))
    table.add_row("platform tags", ", ".join(shown["tags"]))
    table.add_row("sha256", shown["sha256"])
    passed = audit.get("passed")
    verdict = "[green]passed[/green]" if passed is True else "[bold red]FAILED[/bold red]"
    table.add_row(
        "audit",
        f"{verdict} for arch {audit.get('arch')}, driver {audit.get('driver')}"
        + (" (finished with --allow-audit-failure)" if audit.get("allowed_failure") else ""),
    )
    for problem in audit.get("problems", []):
        table.add_row("", f"[red]{problem}[/red]")
    observed = toolchain.get("observed")
    if observed:
        for key, value in observed.items():
            table.add_row(f"toolchain {key}", str(value))
    else:
        table.add_row(
            "toolchain",
            "not observed; planned: "
            + ", ".join(f"{key} {value}" for key, value in toolchain.get("planned", {}).items() if value),
        )
    table.add_row("grafted", ", ".join(wheel.get("grafted", [])) or "nothing")
    table.add_row("SOURCE_DATE_EPOCH", str(wheel.get("source_date_epoch")))
    out.print(table)
    sources = Table(
        "source", "role", "kind", "location", "sha256 / commit / rev", title="sources", title_justify="left"
    )
    for source in record.get("sources", []):
        pin = source.get("sha256") or source.get("commit") or source.get("rev") or "—"
        sources.add_row(source.get("name"), source.get("role"), source.get("kind"), source.get("location"), pin)
    out.print(sources)
    patches = Table("patch", "tree", "sha256", title="patches", title_justify="left")
    for patch in record.get("patches", []):
        patches.add_row(patch.get("name"), patch.get("tree") or "package", patch.get("sha256"))
    out.print(patches if record.get("patches") else "patches: none")
    build = record.get("build", {})
    env = Table(
        "variable",
        "value",
        title=f"build env (without {', '.join(build.get('env_excluded', [])) or '—'})",
        title_justify="left",
    )
    for key, value in build.get("env", {}).items():
        env.add_row(key, value)
    out.print(env)


def _escaped(value: Any, escape) -> Any:
    """Every string of the provenance with rich markup escaped: `[flash-attn]` is text, not a style."""
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, dict):
        return {_escaped(key, escape): _escaped(item, escape) for key, item in value.items()}
    if isinstance(value, list):
        return [_escaped(item, escape) for item in value]
    return value

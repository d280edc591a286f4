"""`gpuwheel verify WHEEL...`: rebuild finished wheels from their provenance and lock, and compare the bytes."""

from __future__ import annotations

import json
from pathlib import Path

import click

from gpuwheel import log
from gpuwheel.cli.build import ENGINES, build_error_tail
from gpuwheel.cli.group import complete_target, main
from gpuwheel.errors import VerifyMismatch
from gpuwheel.limits import MAX_JOBS


@main.command("verify")
@click.argument(
    "wheels", metavar="WHEEL...", nargs=-1, required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path)
)
@click.option(
    "--target",
    "target_name",
    metavar="TARGET",
    shell_complete=complete_target,
    help="The recipe (name or path) the wheels were built from (default: the target they record, on the recipe path).",
)
@click.option(
    "--lock",
    "lock_file",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="LOCK",
    help="The lock to rebuild from (default: <target>.lock beside the recipe).",
)
@click.option(
    "--backend",
    type=click.Choice(["auto", "local", "container"]),
    help="Where to rebuild (default: the backend that built the wheels, as they record; else auto).",
)
@click.option("--engine", type=click.Choice(ENGINES), help="container: the engine (as for build).")
@click.option("--jobs", type=click.IntRange(min=1, max=MAX_JOBS), help="Compiler jobs (they do not change the bytes).")
@click.option("--offline", is_flag=True, help="Use only cached sources.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON on stdout.")
def verify(
    wheels: tuple[Path, ...],
    target_name: str | None,
    lock_file: Path | None,
    backend: str | None,
    engine: str | None,
    jobs: int | None,
    offline: bool,
    as_json: bool,
) -> None:
    """Rebuild the WHEELs of one build from their gpuwheel.json and the lock, once, into the cache, and compare:
    exit 0 when every sha256 is the same, 22 naming each member that differs and how."""
    from gpuwheel.cache import target_lock
    from gpuwheel.verify import one_build, recorded_in, verify_wheels

    recorded = [recorded_in(path) for path in dict.fromkeys(wheels)]
    # The rebuild shares the target's trees and work folders with `gpuwheel build`: one at a time.
    click.get_current_context().with_resource(target_lock(one_build(recorded).target))
    with build_error_tail():
        verification = verify_wheels(
            recorded,
            target=target_name,
            lock=lock_file,
            backend=backend,
            engine=engine,
            jobs=jobs,
            offline=offline,
            quiet=as_json or log._quiet,
        )
    if as_json:
        click.echo(json.dumps(verification.to_json(), indent=2))
    else:
        _render(verification)
    differing = [check for check in verification.wheels if not check.same]
    if differing:
        found = [
            line for check in differing for line in (*(m.summary() for m in check.diff.members), *check.diff.archive)
        ]
        raise VerifyMismatch(
            f"{differing[0].wheel.filename}: the rebuild is not the same bytes: {found[0]}"
            + (f" (+{len(found) - 1} more)" if len(found) > 1 else ""),
            hint=f"the rebuild is in {verification.rebuilt_dir}",
        )


def _render(verification) -> None:
    from rich.markup import escape

    from gpuwheel.log import out

    out.print(
        f"rebuilt plan {verification.plan_hash[:16]} of {escape(verification.target)} from "
        f"{escape(str(verification.lock))} ({verification.backend} backend) in "
        f"{escape(str(verification.rebuilt_dir))}",
        soft_wrap=True,
        highlight=False,
    )
    for check in verification.wheels:
        diff = check.diff
        if check.same:
            out.print(
                f"[green]✓ {escape(check.wheel.filename)}: the same sha256 {diff.sha256[0]}[/green]", soft_wrap=True
            )
            continue
        out.print(
            f"[red]✗ {escape(check.wheel.filename)}: sha256 {diff.sha256[0]}, rebuilt {diff.sha256[1]}[/red]",
            soft_wrap=True,
        )
        for member in diff.members:
            out.print(f"  {member.summary()}", markup=False, highlight=False, soft_wrap=True)
            if member.change == "changed":
                out.print(
                    f"    wheel:   {member.excerpts[0]}\n    rebuilt: {member.excerpts[1]}",
                    markup=False,
                    highlight=False,
                    soft_wrap=True,
                )
            for line in member.diff:
                out.print(f"    {line}", markup=False, highlight=False, soft_wrap=True)
        for note in diff.archive:
            out.print(f"  {note}", markup=False, highlight=False, soft_wrap=True)
        if check.diffoscope:
            out.print(f"  diffoscope's report: {check.diffoscope}", markup=False, soft_wrap=True)
        elif check.diffoscope_note:
            out.print(f"  {check.diffoscope_note}", markup=False, soft_wrap=True)

"""`gpuwheel verify WHEEL`: rebuild a finished wheel from its provenance and lock, and compare the bytes."""

from __future__ import annotations

import json
from pathlib import Path

import click

from gpuwheel.cli import main
from gpuwheel.cli.build import ENGINES
from gpuwheel.limits import MAX_JOBS


@main.command("verify")
@click.argument("wheel", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--lock", "lock_file", type=click.Path(dir_okay=False, path_type=Path), metavar="LOCK",
              help="The lock to rebuild from (default: <target>.lock beside the wheel's recipe).")
@click.option("--backend", type=click.Choice(["auto", "local", "container"]),
              help="Where to rebuild (default: the backend that built the wheel, as it records; else auto).")
@click.option("--engine", type=click.Choice(ENGINES), help="container: the engine (as for build).")
@click.option("--jobs", type=click.IntRange(min=1, max=MAX_JOBS), help="Compiler jobs (do not change the bytes).")
@click.option("--offline", is_flag=True, help="Use only cached sources.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON on stdout.")
def verify(wheel: Path, lock_file: Path | None, backend: str | None, engine: str | None, jobs: int | None,
           offline: bool, as_json: bool) -> None:
    """Rebuild WHEEL from its gpuwheel.json and the lock, into the cache, and compare: exit 0 when the sha256 is
    the same, 22 naming each member that differs and how."""
    from gpuwheel import log
    from gpuwheel.cache import target_lock
    from gpuwheel.cli.build import build_error_tail
    from gpuwheel.errors import VerifyMismatch
    from gpuwheel.verify import recorded_in, verify_wheel

    # The rebuild shares the target's trees and work folders with `gpuwheel build`: one at a time.
    recorded = recorded_in(wheel)
    click.get_current_context().with_resource(target_lock(recorded.target))
    with build_error_tail():
        verification = verify_wheel(recorded, lock=lock_file, backend=backend, engine=engine, jobs=jobs,
                                    offline=offline, quiet=as_json or log._quiet)
    if as_json:
        click.echo(json.dumps(verification.to_json(), indent=2))
    else:
        _render(verification)
    if not verification.same:
        diff = verification.diff
        first = diff.members[0].summary() if diff.members else diff.archive[0]
        count = len(diff.members) or len(diff.archive)
        raise VerifyMismatch(f"{verification.wheel.filename}: the rebuild is not the same bytes: {first}"
                             + (f" (+{count - 1} more)" if count > 1 else ""),
                             hint=f"the rebuilt wheel is {verification.rebuilt}")


def _render(verification) -> None:
    from rich.markup import escape

    from gpuwheel.log import out

    diff = verification.diff
    if verification.same:
        out.print(f"[green]✓ {escape(verification.wheel.filename)}: rebuilt from plan "
                  f"{verification.wheel.plan_hash[:16]} and {escape(str(verification.lock))} "
                  f"({verification.backend} backend): the same sha256 {diff.sha256[0]}[/green]", soft_wrap=True)
        return
    out.print(f"[red]✗ {escape(verification.wheel.filename)}: sha256 {diff.sha256[0]}, rebuilt "
              f"{diff.sha256[1]} ({escape(str(verification.rebuilt))})[/red]", soft_wrap=True)
    for member in diff.members:
        out.print(f"  {escape(member.summary())}", soft_wrap=True, highlight=False)
        if member.change == "changed":
            out.print(f"    wheel:   {member.excerpts[0]}\n    rebuilt: {member.excerpts[1]}", markup=False,
                      highlight=False, soft_wrap=True)
        for line in member.diff:
            out.print(f"    {line}", markup=False, highlight=False, soft_wrap=True)
    for note in diff.archive:
        out.print(f"  {escape(note)}", soft_wrap=True, highlight=False)
    if verification.diffoscope:
        out.print(f"diffoscope's report: {escape(str(verification.diffoscope))}", soft_wrap=True)
    elif verification.diffoscope_note:
        out.print(escape(verification.diffoscope_note), soft_wrap=True)

"""`gpuwheel cache dir|list|prune`: the cache of sources, toolchain venvs and builds (it reaches GBs)."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import click

from gpuwheel.cli.group import main

# What each folder under the cache root holds (gpuwheel.cache says where they come from).
PARTS = {
    "sources": "verified downloads, their extracted trees and git checkouts (gpuwheel fetch)",
    "toolchains": "venvs holding each recipe's torch and build tools (local backend)",
    "compile": "the compiler cache (sccache) that makes rebuilds fast",
    "trees": "patched source trees of past builds",
    "raw": "raw wheels of past builds, before finishing",
    "work": "build directories of past builds",
    "verify": "wheels `gpuwheel verify` rebuilt, and diffoscope's reports",
    "logs": "build and image logs",
}


@main.group()
def cache() -> None:
    """Where gpuwheel keeps sources, toolchains and builds; how big they are; remove them."""


@cache.command("dir")
def cache_dir() -> None:
    """Print the cache folder ($GPUWHEEL_CACHE, else the user cache folder)."""
    from gpuwheel.cache import cache_root

    click.echo(str(cache_root()))


@cache.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the parts as JSON on stdout.")
def cache_list(as_json: bool) -> None:
    """Each part of the cache: what it holds, its size and where it is."""
    from gpuwheel.cache import cache_root

    root = cache_root()
    parts: list[dict[str, Any]] = [
        {"name": name, "path": str(root / name), "bytes": _size(root / name), "holds": holds}
        for name, holds in PARTS.items()
    ]
    if as_json:
        click.echo(json.dumps({"cache": str(root), "parts": parts}, indent=2))
        return
    from rich.markup import escape
    from rich.table import Table

    from gpuwheel.log import out

    table = Table("part", "size", "holds", title=escape(f"cache {root}"), title_justify="left")
    for part in parts:
        table.add_row(part["name"], _human(part["bytes"]), part["holds"])
    table.add_row("all", _human(sum(p["bytes"] for p in parts)), "")
    out.print(table)


@cache.command("prune")
@click.argument("parts", nargs=-1, type=click.Choice(sorted(PARTS)))
@click.option("--all", "everything", is_flag=True, help="Remove every part.")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
def cache_prune(parts: tuple[str, ...], everything: bool, dry_run: bool) -> None:
    """Remove PARTS of the cache (sources, toolchains, ...), or --all. Run it while no build runs.

    Everything removed is made again when needed: sources are fetched, toolchains rebuilt.
    """
    from gpuwheel.cache import cache_root
    from gpuwheel.log import out

    if not parts and not everything:
        raise click.UsageError(f"name the parts to remove ({', '.join(PARTS)}) or pass --all")
    root = cache_root()
    for name in sorted(PARTS) if everything else parts:
        folder = root / name
        size = _size(folder)
        if not folder.exists():
            continue
        if not dry_run:
            shutil.rmtree(folder)
        out.print(
            f"{'would remove' if dry_run else 'removed'} {name}: {_human(size)} ({folder})",
            markup=False,
            soft_wrap=True,
        )


def _size(folder) -> int:
    total = 0
    for directory, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
            except OSError:
                pass
    return total


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"

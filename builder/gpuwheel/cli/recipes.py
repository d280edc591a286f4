"""`gpuwheel targets`, `show` and `plan`: what can be built, from which files, and how."""

from __future__ import annotations

import json
import os

import click
from rich.markup import escape
from rich.table import Table

from gpuwheel.cli import main
from gpuwheel.errors import GpuwheelError
from gpuwheel.log import console
from gpuwheel.plan import make_plan, measured_build
from gpuwheel.recipe import list_targets, load_recipe
from gpuwheel.redact import safe_value

TARGET = click.argument("target", metavar="TARGET")


@main.command()
def targets() -> None:
    """List the shipped targets: GPU, archs, toolkit and pins."""
    table = Table("target", "GPU", "arch list", "CUDA", "min driver", "torch", "vLLM", "flash-attn")
    for name in list_targets():
        try:
            recipe = load_recipe(name)
        except GpuwheelError as error:
            table.add_row(name, f"[red]broken recipe: {error}[/red]", *[""] * 6)
            continue
        versions = {p.name: p.version + (" (inference)" if p.profile == "inference" else "")
                    for p in recipe.packages}
        table.add_row(name, recipe.target.gpu, recipe.target.torch_cuda_arch_list, recipe.toolchain.cuda,
                      recipe.target.min_driver, recipe.toolchain.torch, versions.get("vllm", "—"),
                      versions.get("flash-attn", "—"))
    console.print(table)


@main.command()
@TARGET
def show(target: str) -> None:
    """Show the resolved recipe, each value with the file and line it came from."""
    recipe = load_recipe(target)
    table = Table("key", "value", "from", title=f"{recipe.name} ({' → '.join(f.name for f in recipe.files)})")
    for key, origin in sorted(recipe.origins.items(), key=_show_order):
        table.add_row(key, escape(safe_value(key.rpartition(".")[2], _value_at(recipe, key))), escape(str(origin)))
    console.print(table)


@main.command()
@TARGET
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON on stdout.")
@click.option("--jobs", type=click.IntRange(min=1), help="Compiler jobs (default: from cores and memory).")
@click.option("--only", multiple=True, metavar="PACKAGE", help="Plan just this package (repeatable).")
def plan(target: str, as_json: bool, jobs: int | None, only: tuple[str, ...]) -> None:
    """Resolve TARGET into the exact build: steps, env per package, content hash."""
    resolved = make_plan(load_recipe(target), jobs=jobs, only=only)
    if as_json:
        click.echo(json.dumps(resolved.to_json(), indent=2))
        return
    t, tc = resolved.target, resolved.toolchain
    console.print(f"[bold]{t.name}[/bold] — {t.gpu}: compute capability {t.compute_capability}, "
                  f"arch list {t.torch_cuda_arch_list}, fleet driver ≥ {t.min_driver}")
    console.print(f"toolchain: CUDA {tc.cuda}, Python {tc.python}, torch {tc.torch}"
                  + (f", image {tc.base_image}" if tc.base_image else ""))
    console.print(f"plan hash: [bold]{resolved.hash}[/bold]")
    for note in resolved.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    console.print("\n[bold]steps[/bold]")
    for number, step in enumerate(resolved.steps, start=1):
        console.print(f"  {number:2}. {escape(step)}")
    for package in resolved.packages:
        if measured := measured_build(package, t.torch_cuda_arch_list):
            cores = os.cpu_count() or 1
            console.print(f"{package.name} {package.version}: measured {measured.cpu_s:,.0f} CPU-s, longest step "
                          f"{measured.longest_s:,.0f} s ({measured.source}): ~{measured.predicted_wall_s(cores) / 60:.0f} min "
                          f"on this machine's {cores} cores, ~{measured.predicted_wall_s(32) / 60:.0f} min on 32")
        table = Table("variable", "value", title=f"{package.name} {package.version} — build environment "
                      f"({package.jobs.reason})", title_justify="left")
        for key, value in package.env:
            table.add_row(key, escape(safe_value(key, value)))
        console.print(table)


def _show_order(item):
    key = item[0]
    return (0 if key.startswith("target") else 1 if key.startswith("toolchain") else
            2 if key.startswith("build") else 3, key)


def _value_at(recipe, key: str) -> str:
    """The merged value for a dotted origin key, read back from the Recipe."""
    parts = key.replace("]", "").replace("[", ".").split(".")
    if parts[0] == "package":
        package = recipe.package(parts[1])
        node = _package_view(package) if package else {}
        parts = parts[2:]
    else:
        node = getattr(recipe, parts[0], None)
        parts = parts[1:]
    for part in parts:
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, (list, tuple)) and part.isdigit():
            node = node[int(part)] if int(part) < len(node) else None
        else:
            node = getattr(node, part, None)
    return "" if node is None else str(node)


def _package_view(package) -> dict:
    source = package.source
    return {
        "name": package.name, "version": package.version, "profile": package.profile,
        "patches": package.patches, "env": dict(package.env),
        "source": {source.kind: source.location, "sha256": source.sha256, "commit": source.commit,
                   "index": source.index, "submodules": source.submodules},
        "inference": package.inference, "audit": {"optional": list(package.audit_optional)},
        "dependency": [vars(d) for d in package.dependencies],
    }

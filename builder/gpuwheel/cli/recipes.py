"""`gpuwheel targets`, `show` and `plan`: what can be built, from which files, and how."""

from __future__ import annotations

import json
import os
from typing import Any

import click

from gpuwheel.cli.group import TARGET, main
from gpuwheel.errors import GpuwheelError
from gpuwheel.limits import MAX_JOBS
from gpuwheel.redact import MASK, is_secret_name, safe_tree, safe_value

JSON = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")


@main.command()
@JSON
def targets(as_json: bool) -> None:
    """List the targets: GPU, archs, toolkit and pins (yours from --recipes first, then the shipped ones)."""
    from gpuwheel.recipe import list_targets, load_recipe

    rows: list[dict[str, Any]] = []
    for name in list_targets():
        try:
            recipe = load_recipe(name)
        except GpuwheelError as error:
            rows.append({"name": name, "error": str(error)})
            continue
        rows.append(
            {
                "name": name,
                "file": str(recipe.path),
                "gpu": recipe.target.gpu,
                "compute_capability": recipe.target.compute_capability,
                "torch_cuda_arch_list": recipe.target.torch_cuda_arch_list,
                "cuda": recipe.toolchain.cuda,
                "min_driver": recipe.target.min_driver,
                "python": recipe.toolchain.python,
                "torch": recipe.toolchain.torch,
                "packages": {p.name: {"version": p.version, "profile": p.profile} for p in recipe.packages},
            }
        )
    if as_json:
        click.echo(json.dumps({"targets": rows}, indent=2))
        return
    from rich.markup import escape
    from rich.table import Table

    from gpuwheel.log import out

    table = Table("target", "GPU", "arch list", "CUDA", "min driver", "torch", "vLLM", "flash-attn")
    for row in rows:
        if "error" in row:
            table.add_row(escape(row["name"]), f"[red]broken recipe: {escape(row['error'])}[/red]", *[""] * 6)
            continue
        versions = {
            name: p["version"] + (f" ({p['profile']})" if p["profile"] != "full" else "")
            for name, p in row["packages"].items()
        }
        table.add_row(
            *(
                escape(str(v))
                for v in (
                    row["name"],
                    row["gpu"],
                    row["torch_cuda_arch_list"],
                    row["cuda"],
                    row["min_driver"],
                    row["torch"],
                    versions.get("vllm", "—"),
                    versions.get("flash-attn", "—"),
                )
            )
        )
    out.print(table)


@main.command()
@TARGET
@JSON
def show(target: str, as_json: bool) -> None:
    """Show the resolved recipe as TOML, each value with the file and line it came from."""
    from gpuwheel.recipe import load_recipe

    recipe = load_recipe(target)
    # Secrets are shown masked: a secret-named env key whole, URL credentials in any value.
    entries = [
        (
            key,
            MASK
            if is_secret_name(key.rpartition(".")[2]) and _value_at(recipe, key)
            else safe_tree(_value_at(recipe, key)),
            str(origin),
        )
        for key, origin in sorted(recipe.origins.items(), key=_show_order)
    ]
    if as_json:
        click.echo(
            json.dumps(
                {
                    "target": recipe.name,
                    "files": [str(f) for f in recipe.files],
                    "values": [{"key": k, "value": v, "from": o} for k, v, o in entries],
                },
                indent=2,
            )
        )
        return
    from rich.markup import escape
    from rich.table import Table

    from gpuwheel.log import out

    table = Table(
        "key", "value (TOML)", "from", title=escape(f"{recipe.name} ({' → '.join(f.name for f in recipe.files)})")
    )
    for key, value, origin in entries:
        table.add_row(escape(key), escape(_toml(value)), escape(origin))
    out.print(table)


@main.command()
@TARGET
@JSON
@click.option(
    "--jobs", type=click.IntRange(min=1, max=MAX_JOBS), help="Compiler jobs (default: from cores and memory)."
)
@click.option("--only", multiple=True, metavar="PACKAGE", help="Plan just this package (repeatable).")
def plan(target: str, as_json: bool, jobs: int | None, only: tuple[str, ...]) -> None:
    """Resolve TARGET into the exact build: steps, env per package, content hash."""
    from gpuwheel.plan import make_plan
    from gpuwheel.recipe import load_recipe

    resolved = make_plan(load_recipe(target), jobs=jobs, only=only)
    if as_json:
        click.echo(json.dumps(resolved.to_json(), indent=2))
        return
    from rich.markup import escape
    from rich.table import Table

    from gpuwheel.log import out

    t, tc = resolved.target, resolved.toolchain
    out.print(
        escape(
            f"{t.name} — {t.gpu}: compute capability {t.compute_capability}, "
            f"arch list {t.torch_cuda_arch_list}, fleet driver ≥ {t.min_driver}"
        )
    )
    out.print(
        escape(
            f"toolchain: CUDA {tc.cuda}, Python {tc.python}, torch {tc.torch}"
            + (f", image {tc.base_image}" if tc.base_image else "")
        )
    )
    out.print(f"plan hash: [bold]{resolved.hash}[/bold]")
    for note in resolved.notes:
        out.print(f"[yellow]note:[/yellow] {escape(note)}")
    out.print("\n[bold]steps[/bold]")
    for number, step in enumerate(resolved.steps, start=1):
        out.print(f"  {number:2}. {escape(step)}")
    for package in resolved.packages:
        if measured := package.measured:
            cores = os.cpu_count() or 1
            out.print(
                escape(
                    f"{package.name} {package.version}: measured {measured.cpu_s:,.0f} CPU-s, longest step "
                    f"{measured.longest_s:,.0f} s ({measured.source}): "
                    f"~{measured.predicted_wall_s(cores) / 60:.0f} min on this machine's {cores} cores, "
                    f"~{measured.predicted_wall_s(32) / 60:.0f} min on 32"
                )
            )
        table = Table(
            "variable",
            "value",
            title=escape(
                f"{package.name} {package.version} ({package.kind} kind) — build environment ({package.jobs.reason})"
            ),
            title_justify="left",
        )
        for key, value in package.env:
            table.add_row(escape(key), escape(safe_value(key, value)))
        out.print(table)


def _show_order(item):
    key = item[0]
    return (
        0 if key.startswith("target") else 1 if key.startswith("toolchain") else 2 if key.startswith("build") else 3,
        key,
    )


def _toml(value) -> str:
    """A value as TOML writes it: strings quoted, lists bracketed, booleans lower case."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value), ensure_ascii=False)  # a TOML basic string: JSON's escapes are TOML's


def _value_at(recipe, key: str):
    """The merged value for a dotted origin key, read back from the Recipe (None when unset)."""
    parts = key.replace("]", "").replace("[", ".").split(".")
    if parts[0] == "package":
        package = recipe.package(parts[1])
        node: Any = _package_view(package) if package else {}
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
    if node is None or isinstance(node, (str, bool, int)):
        return node
    if isinstance(node, (list, tuple)):
        return list(node)
    return str(node)


def _package_view(package) -> dict:
    source = package.source
    return {
        "name": package.name,
        "version": package.version,
        "kind": package.kind,
        "profile": package.profile,
        "patches": package.patches,
        "env": dict(package.env),
        "source": {
            source.kind: source.location,
            "sha256": source.sha256,
            "commit": source.commit,
            "index": source.index,
            "submodules": source.submodules,
        },
        "inference": package.inference,
        "audit": {"optional": list(package.audit_optional)},
        "dependency": [vars(d) for d in package.dependencies],
    }


@main.command()
def schema() -> None:
    """Print the recipe format as a JSON Schema, for editors (taplo: `#:schema recipe.schema.json`)."""
    from gpuwheel.recipe_schema import recipe_json_schema

    click.echo(json.dumps(recipe_json_schema(), indent=2))

"""TOML recipe → Recipe: `extends` inheritance, schema, and "did you mean" on typos.

A recipe is named by target (`rtx6000pro` → recipes/rtx6000pro.toml) or given as a path.
Targets are looked up along a search path: `--recipes DIR`s (else $GPUWHEEL_RECIPES), then the
shipped recipes/. `extends` names a target or base along that path (`_base/cuda-12.8`, `h100`;
a file never extends itself, so a user's h100.toml can extend the shipped h100) or a path
relative to the file.
Tables merge key by key; `[[package]]` entries merge with the base's entry of the same name.
Every leaf value remembers the file and line it came from (`gpuwheel show`). The values themselves
(Recipe, PackageRecipe, …) are in recipe_values.py; a package's kind-specific tables are checked by
its kind (gpuwheel.kinds).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

from packaging.utils import InvalidWheelFilename, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from gpuwheel import facts
from gpuwheel.errors import RecipeError
from gpuwheel.imageref import image_reference_problem
from gpuwheel.kinds import flash_attn as flash_attn_kind
from gpuwheel.kinds import registry
from gpuwheel.kinds import vllm as vllm_kind
from gpuwheel.kinds.vllm import RUST_MODES
from gpuwheel.limits import MAX_JOBS
from gpuwheel.recipe_values import (
    BuildOptions,
    Dependency,
    Origin,
    PackageRecipe,
    Recipe,
    ServingProfile,
    Source,
    Target,
    Toolchain,
    display_path,
    typo_hint,
    url_filename,
)
from gpuwheel.shipped import CHECKOUT, shipped

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PROJECT_ROOT = CHECKOUT  # the repository, for code that works in a checkout (tests, benchmarks)

_cli_paths: tuple[Path, ...] | None = None  # the CLI's --recipes, which replace $GPUWHEEL_RECIPES


def set_recipe_paths(paths: tuple[Path, ...] | None) -> None:
    """The CLI's `--recipes DIR`s (None: read $GPUWHEEL_RECIPES again)."""
    global _cli_paths
    _cli_paths = tuple(paths) if paths is not None else None


def recipe_paths() -> tuple[Path, ...]:
    """Where named targets are looked up, first match first: the user's folders, then the shipped one.

    The user's folders come from `--recipes DIR` (repeatable), else $GPUWHEEL_RECIPES (folders
    separated by os.pathsep). They add targets in front of the shipped ones; they never hide them.
    """
    if _cli_paths is not None:
        extra = _cli_paths
    else:
        extra = tuple(Path(p).expanduser() for p in os.environ.get("GPUWHEEL_RECIPES", "").split(os.pathsep) if p)
        for folder in extra:
            if not folder.is_dir():
                raise RecipeError(
                    f"GPUWHEEL_RECIPES names {folder}, which is not a folder",
                    hint="point it at folders of recipes, separated by ':'",
                )
    paths: list[Path] = []
    for folder in (*extra, shipped("recipes")):
        folder = folder.resolve()
        if folder not in paths:
            paths.append(folder)
    return tuple(paths)


# ---- schema: table → key → (type, description); used for checks and docs ------------------
_STR, _INT, _LIST_STR, _LIST_INT, _TABLE, _BOOL = (
    "string",
    "integer",
    "list of strings",
    "list of integers",
    "table",
    "boolean",
)
_BOOL_OR_LIST = "boolean or list of strings"

SCHEMA: dict[str, dict[str, str]] = {
    "": {"extends": _STR, "target": _TABLE, "toolchain": _TABLE, "build": _TABLE, "package": "array of tables"},
    "target": {
        "name": _STR,
        "description": _STR,
        "gpu": _STR,
        "compute_capability": _STR,
        "torch_cuda_arch_list": _STR,
        "min_driver": _STR,
    },
    "toolchain": {"cuda": _STR, "python": _STR, "torch": _STR, "base_image": _STR, "base_image_digest": _STR},
    "build": {"jobs": _INT, "nvcc_threads": _INT, "build_type": _STR, "engine": _STR},
    "package": {
        "name": _STR,
        "version": _STR,
        "kind": _STR,
        "source": _TABLE,
        "patches": _STR,
        "env": _TABLE,
        "profile": _STR,
        "inference": _TABLE,
        "serving": _TABLE,
        "dependency": "array of tables",
        "audit": _TABLE,
        "stand_in": _TABLE,
        "rust_frontend": _STR,
        "cargo_vendor": _STR,
    },
    "package.source": {
        "sdist": _STR,
        "index": _STR,
        "git": _STR,
        "commit": _STR,
        "url": _STR,
        "path": _STR,
        "sha256": _STR,
        "submodules": _BOOL,
    },
    "package.inference": {"head_dims": _LIST_INT, "disable": _LIST_STR},
    "package.serving": {"head_dims": _LIST_INT, "dtypes": _LIST_STR, "omit": _LIST_STR},
    "package.stand_in": {"wheel": _STR, "sha256": _STR, "index": _STR},
    "package.dependency": {
        "name": _STR,
        "git": _STR,
        "rev": _STR,
        "commit": _STR,
        "src_dir_env": _STR,
        "fetchcontent_name": _STR,
        "submodules": _BOOL_OR_LIST,
        "subdir": _STR,
        "exclude": _LIST_STR,
    },
    "package.audit": {"optional": _LIST_STR},
}
REQUIRED: dict[str, tuple[str, ...]] = {
    "target": ("name", "compute_capability", "torch_cuda_arch_list", "min_driver"),
    "toolchain": ("cuda", "python", "torch"),
    "package": ("name", "version", "source"),
    "package.dependency": ("name", "git", "rev"),
}
# full, then each kind's own (inference: flash-attn's, serving: vLLM's)
PROFILES = ("full", *(p for kind in registry.KINDS.values() for p in kind.profiles))
ENGINES = ("docker", "podman")  # container engines of the container backend
ENGINE_VARIABLE = "GPUWHEEL_ENGINE"  # the environment's choice of engine, before the recipe's


# ---- loading ------------------------------------------------------------------------------
def list_targets() -> list[str]:
    """Names of the targets along the search path (bases under _base/ are not targets)."""
    return sorted({p.stem for folder in recipe_paths() for p in folder.glob("*.toml")})


def target_file(name: str) -> Path | None:
    """The file a target name loads (the first along the search path), if any."""
    return next((path.resolve() for folder in recipe_paths() if (path := folder / f"{name}.toml").is_file()), None)


def load_recipe(name_or_path: str | os.PathLike) -> Recipe:
    """Load a recipe by target name or path, resolving `extends`; raises RecipeError."""
    path = _locate(str(name_or_path), relative_to=None)
    data, origins, files = _load_merged(path, chain=())
    return _build(path, data, origins, files)


def _locate(ref: str, relative_to: Path | None, extending: Path | None = None) -> Path:
    looks_like_path = (
        ref.endswith(".toml") or ref.startswith((".", "/")) or os.sep in ref and not ref.startswith("_base/")
    )
    if looks_like_path:
        path = Path(ref) if relative_to is None or Path(ref).is_absolute() else relative_to / ref
        if not path.is_file():
            raise RecipeError(f"recipe file {ref} does not exist", hint="check the path")
        return path.resolve()
    for folder in recipe_paths():
        path = (folder / f"{ref}.toml").resolve()
        if path.is_file() and path != extending:
            return path
    known = list_targets() + sorted(
        {f"_base/{p.stem}" for folder in recipe_paths() for p in (folder / "_base").glob("*.toml")}
    )
    where = f"{display_path(relative_to)}: " if relative_to else ""
    hint = typo_hint(ref, known, f"known targets: {', '.join(list_targets())}")
    raise RecipeError(f"{where}unknown target '{ref}'", hint=hint)


def _load_merged(path: Path, chain: tuple[Path, ...]) -> tuple[dict, dict[str, Origin], tuple[Path, ...]]:
    if path in chain:
        cycle = " → ".join(display_path(p) for p in (*chain, path))
        raise RecipeError(f"extends cycle: {cycle}", hint="remove one of the extends")
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise RecipeError(
            f"{display_path(path)}: not valid TOML: {error}", hint="fix the syntax at that line"
        ) from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise RecipeError(
            f"{display_path(path)}: arrays or inline tables nested too deeply to read",
            hint="no recipe key takes more than a list of strings or a table",
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"{display_path(path)}: cannot read: {error}") from None
    lines = _key_lines(text)
    _check_schema(data, path, lines)
    origins = {key: Origin(path, line) for key, line in _leaf_lines(data, lines).items()}
    base_ref = data.pop("extends", None)
    if base_ref is None:
        return data, origins, (path,)
    base_path = _locate(base_ref, relative_to=path.parent, extending=path)
    base, base_origins, base_files = _load_merged(base_path, (*chain, path))
    return _merge(base, data), {**base_origins, **origins}, (path, *base_files)


def _merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for key, value in over.items():
        if key == "package":
            merged[key] = _merge_packages(base.get(key, []), value)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _merge_packages(base: list[dict], over: list[dict]) -> list[dict]:
    merged = [dict(p) for p in base]
    for package in over:
        index = next((i for i, p in enumerate(merged) if p.get("name") == package.get("name")), None)
        if index is None:
            merged.append(package)
        else:
            # A package's source replaces the base's whole: mixing an sdist with a git commit
            # would describe no real source.
            combined = _merge(
                {k: v for k, v in merged[index].items() if k != "source" or "source" not in package}, package
            )
            merged[index] = combined
    return merged


# ---- schema checks --------------------------------------------------------------------------
_HEADER_RE = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\]?\s*(#.*)?$")
# A key, bare or quoted, dotted or not (`source.sha256 = `, `"name" = `), at the start of a line.
_KEY_RE = re.compile(
    r"""^\s*((?:[A-Za-z0-9_\-]+|"[^"\n]*"|'[^'\n]*')(?:\s*\.\s*(?:[A-Za-z0-9_\-]+|"[^"\n]*"|'[^'\n]*'))*)\s*="""
)
_INLINE_KEY_RE = re.compile(r"([A-Za-z0-9_\-]+)\s*=")


def _key_lines(text: str) -> dict[str, int]:
    """Map 'table.key' and 'package[N].key' paths to the line that sets them (for messages).

    tomllib gives no positions, so this reads the header/key lines; values are never parsed here,
    but the lines inside a multi-line string are skipped (they hold no keys), and a dotted key
    (`source.sha256 = ...`) is placed under its tables.
    """
    lines: dict[str, int] = {}
    table = ""
    array_counts: dict[str, int] = {}
    in_string: str | None = None  # the delimiter of the multi-line string being read
    for number, line in enumerate(text.splitlines(), start=1):
        if in_string:
            if _closes(line, in_string):
                in_string = None
            continue
        header = _HEADER_RE.match(line)
        if header:
            name = header[2].replace(" ", "").replace('"', "").replace("'", "")
            if header[1] == "[[":
                parent, _, leaf = name.rpartition(".")
                parent_path = _array_path(parent, array_counts) if parent else ""
                full = f"{parent_path}.{leaf}" if parent_path else leaf
                array_counts[full] = array_counts.get(full, -1) + 1
                table = f"{full}[{array_counts[full]}]"
            else:
                parent, _, leaf = name.rpartition(".")
                parent_path = _array_path(parent, array_counts) if parent else ""
                table = f"{parent_path}.{leaf}" if parent_path else leaf
            lines.setdefault(table, number)
            continue
        key = _KEY_RE.match(line)
        if key:
            path = table
            for part in re.findall(r"""[A-Za-z0-9_\-]+|"[^"\n]*"|'[^'\n]*'""", key[1]):
                path = f"{path}.{part.strip(chr(34) + chr(39))}" if path else part.strip(chr(34) + chr(39))
                lines.setdefault(path, number)
            inline = line[key.end() :]
            if "{" in inline:
                for sub in _INLINE_KEY_RE.findall(inline):
                    lines.setdefault(f"{path}.{sub}", number)
            in_string = _opens(inline)
    return lines


def _opens(value: str) -> str | None:
    """The delimiter of a multi-line string this value opens and does not close on its line."""
    stripped = value.lstrip()
    for delimiter in ('"""', "'''"):
        if stripped.startswith(delimiter) and not _closes(stripped[3:], delimiter):
            return delimiter
    return None


def _closes(line: str, delimiter: str) -> bool:
    # An escaped quote (\") does not end a basic string; literal strings have no escapes.
    text = line.replace("\\\\", "") if delimiter == '"""' else line
    if delimiter == '"""':
        text = text.replace('\\"', "")
    return delimiter in text


def _array_path(name: str, counts: dict[str, int]) -> str:
    parts, path = name.split("."), ""
    for part in parts:
        path = f"{path}.{part}" if path else part
        if path in counts:
            path = f"{path}[{counts[path]}]"
    return path


def _leaf_lines(data: dict, lines: dict[str, int], prefix: str = "") -> dict[str, int]:
    """Origins keyed by a path that survives merging: packages by name, not index."""
    out: dict[str, int] = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if key == "package" and not prefix and isinstance(value, list):
            for index, package in enumerate(value):
                if isinstance(package, dict):
                    named = f"package[{package.get('name', index)}]"
                    for sub, line in _leaf_lines(package, lines, f"package[{index}]").items():
                        out[sub.replace(f"package[{index}]", named, 1)] = line
            continue
        if isinstance(value, dict):
            out.update(_leaf_lines(value, lines, path))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for index, entry in enumerate(value):  # [[package.dependency]]: each entry's own lines
                out.update(_leaf_lines(entry, lines, f"{path}[{index}]"))
        else:
            out[path] = lines.get(path, lines.get(prefix, 1))
    return out


def _check_schema(data: dict, path: Path, lines: dict[str, int]) -> None:
    _check_table(data, "", "", path, lines)


def _check_table(table: dict, schema_name: str, line_path: str, path: Path, lines: dict[str, int]) -> None:
    allowed = SCHEMA[schema_name]
    for key, value in table.items():
        key_path = f"{line_path}.{key}" if line_path else key
        where = f"{display_path(path)}:{lines.get(key_path, lines.get(line_path, 1))}"
        label = f"[{schema_name}] " if schema_name else ""
        if key not in allowed:
            hint = typo_hint(key, allowed, f"valid keys: {', '.join(allowed)}")
            raise RecipeError(f"{where}: unknown key {label}'{key}'", hint=hint)
        expected = allowed[key]
        sub_schema = f"{schema_name}.{key}" if schema_name else key
        if expected == _TABLE:
            if not isinstance(value, dict):
                raise RecipeError(f"{where}: {label}'{key}' must be a table, got {_kind(value)}")
            if key == "env":
                _check_env(value, where)
            elif sub_schema in SCHEMA:
                _check_table(value, sub_schema, key_path, path, lines)
        elif expected == "array of tables":
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise RecipeError(f"{where}: '{key}' must be written as [[{sub_schema}]] tables")
            for index, entry in enumerate(value):
                _check_table(entry, sub_schema, f"{key_path}[{index}]", path, lines)
        elif not _is(value, expected):
            raise RecipeError(
                f"{where}: {label}'{key}' must be a {expected}, got {_kind(value)}",
                hint='quote versions, e.g. cuda = "12.8.1"' if expected == _STR else None,
            )


def _check_env(env: dict, where: str) -> None:
    for name, value in env.items():
        _check_name(name, "env name", where, _ENV_NAME)
        if not isinstance(value, str):
            raise RecipeError(
                f"{where}: env {name} must be a string, got {_kind(value)}", hint=f'write {name} = "{value}"'
            )


def _is(value: Any, expected: str) -> bool:
    if expected == _STR:
        return isinstance(value, str)
    if expected == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected == _BOOL:
        return isinstance(value, bool)
    if expected == _BOOL_OR_LIST:
        return isinstance(value, bool) or _is(value, _LIST_STR)
    if expected == _LIST_STR:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if expected == _LIST_INT:
        return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return False


def _kind(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)


# ---- building the Recipe value ----------------------------------------------------------------
def _build(path: Path, data: dict, origins: dict[str, Origin], files: tuple[Path, ...]) -> Recipe:
    def origin_of(key: str) -> Origin:
        return origins.get(key, Origin(path, 1))

    def where(key: str) -> str:
        return str(origin_of(key))

    def require(table: dict, table_name: str, origin_prefix: str) -> None:
        for key in REQUIRED[table_name]:
            if key not in table:
                raise RecipeError(
                    f"{where(origin_prefix) if origin_prefix in origins else display_path(path)}: "
                    f"missing [{table_name}] {key}",
                    hint=f"add {key} = ... to [{table_name}] or to a recipe it extends",
                )

    for table_name in ("target", "toolchain"):
        if table_name not in data:
            raise RecipeError(f"{display_path(path)}: missing [{table_name}] table")
        require(data[table_name], table_name, table_name)
    t, tc = data["target"], data["toolchain"]

    def version(value: str, key: str, example: str) -> str:
        try:
            Version(value)
        except InvalidVersion:
            raise RecipeError(
                f"{where(key)}: {key} '{value}' is not a version", hint=f'write it like "{example}"'
            ) from None
        return value

    for key, example in (("cuda", "12.8.1"), ("torch", "2.9.1"), ("python", "3.12")):
        version(tc[key], f"toolchain.{key}", example)
    try:
        facts.parse_arch(t["compute_capability"])
        facts.parse_arch_list(t["torch_cuda_arch_list"])
    except ValueError as error:
        bad = "compute_capability" if "compute_capability" in str(error) else "torch_cuda_arch_list"
        raise RecipeError(f"{where('target.' + bad)}: {error}") from None
    try:
        facts.driver_tuple(t["min_driver"])
    except ValueError as error:
        raise RecipeError(f"{where('target.min_driver')}: {error}") from None
    _check_name(t["name"], "target name", where("target.name"), _TARGET_NAME)
    target = Target(
        name=t["name"],
        description=t.get("description", ""),
        gpu=t.get("gpu", t.get("description", t["name"])),
        compute_capability=t["compute_capability"],
        torch_cuda_arch_list=t["torch_cuda_arch_list"],
        min_driver=t["min_driver"],
    )
    toolchain = Toolchain(**{k: tc.get(k) for k in SCHEMA["toolchain"]})
    b = data.get("build", {})
    for key in ("jobs", "nvcc_threads"):
        if key in b and not 1 <= b[key] <= MAX_JOBS:
            raise RecipeError(f"{where('build.' + key)}: build.{key} must be from 1 to {MAX_JOBS}, got {b[key]}")
    if "engine" in b and b["engine"] not in ENGINES:
        raise RecipeError(
            f"{where('build.engine')}: unknown engine '{b['engine']}'",
            hint=typo_hint(b["engine"], ENGINES, f"use one of {', '.join(ENGINES)}"),
        )
    if "base_image" in tc and (problem := image_reference_problem(tc["base_image"])):
        raise RecipeError(f"{where('toolchain.base_image')}: base_image '{tc['base_image']}' names no image: {problem}")
    build = BuildOptions(
        jobs=b.get("jobs"),
        nvcc_threads=b.get("nvcc_threads"),
        build_type=b.get("build_type", "Release"),
        engine=b.get("engine"),
    )
    packages = []
    for entry in data.get("package", []):
        prefix = f"package[{entry.get('name', '?')}]"
        require(entry, "package", prefix)
        _check_name(entry["name"], "package name", where(f"{prefix}.name"), _PACKAGE_NAME)
        version(entry["version"], f"{prefix}.version", "2.8.3")
        packages.append(_package(entry, prefix, where, origin_of, origins))
    if not packages:
        raise RecipeError(f"{display_path(path)}: the recipe builds no package", hint="add a [[package]] table")
    return Recipe(
        path=path,
        target=target,
        toolchain=toolchain,
        build=build,
        packages=tuple(packages),
        files=files,
        origins=origins,
    )


def _package(entry: dict, prefix: str, where, origin_of, origins: dict[str, Origin]) -> PackageRecipe:  # noqa: C901 - one check per key
    source = _source(entry["source"], f"{prefix}.source", where)
    kind_name = entry.get("kind", registry.default_kind(entry["name"]))
    if kind_name not in registry.KINDS:
        raise RecipeError(
            f"{where(prefix + '.kind')}: unknown package kind '{kind_name}'",
            hint=typo_hint(kind_name, registry.KINDS, f"use one of {', '.join(registry.KINDS)}"),
        )
    kind = registry.get(kind_name)
    profile = entry.get("profile", "full")
    if profile not in PROFILES:
        raise RecipeError(
            f"{where(prefix + '.profile')}: unknown profile '{profile}'",
            hint=typo_hint(profile, PROFILES, f"use one of {', '.join(PROFILES)}"),
        )
    if profile != "full" and profile not in kind.profiles:
        owner = next(k.name for k in registry.KINDS.values() if profile in k.profiles)
        raise RecipeError(
            f"{where(prefix + '.profile')}: profile '{profile}' is for {owner}, not {entry['name']}",
            hint='use profile = "full" or drop it',
        )
    inference = None
    if profile == "inference":
        inference = flash_attn_kind.inference_profile(entry.get("inference", {}), lambda key: where(f"{prefix}.{key}"))
    elif "inference" in entry and _set_beside_profile("inference", prefix, origins):
        raise RecipeError(f'{where(prefix + ".inference.head_dims")}: [package.inference] needs profile = "inference"')
    serving = _serving(entry, prefix, where, origins)
    dependencies = []
    for index, dep in enumerate(entry.get("dependency", [])):
        dep_prefix = f"{prefix}.dependency[{index}]"
        for key in REQUIRED["package.dependency"]:
            if key not in dep:
                raise RecipeError(
                    f"{where(prefix + '.name')}: dependency {dep.get('name', index)} of {entry['name']} lacks '{key}'"
                )
        if not dep.get("src_dir_env") and not dep.get("fetchcontent_name"):
            raise RecipeError(
                f"{where(dep_prefix + '.name')}: dependency {dep['name']} needs src_dir_env or fetchcontent_name",
                hint="say how vLLM is pointed at the pre-fetched tree",
            )
        _check_dependency(dep, dep_prefix, where)
        for key in ("subdir", "exclude", "submodules"):
            values = dep.get(key, ())
            for value in [values] if isinstance(values, str) else values if isinstance(values, list) else ():
                if not _relative_path(value):
                    raise RecipeError(
                        f"{where(dep_prefix + '.' + key)}: dependency {dep['name']}: {key} "
                        f"'{value}' must be a relative path inside the tree, without '..'"
                    )
        fields = {
            **dep,
            "exclude": tuple(dep.get("exclude", ())),
            "submodules": tuple(s) if isinstance(s := dep.get("submodules", True), list) else s,
        }
        dependencies.append(Dependency(**fields))
    stand_in = None
    if "stand_in" in entry:
        spec = entry["stand_in"]
        if "wheel" not in spec or "sha256" not in spec:
            raise RecipeError(
                f"{where(prefix + '.stand_in')}: [package.stand_in] needs wheel and sha256",
                hint="the file name of the package's published wheel and its sha256",
            )
        _check_name(spec["wheel"], "stand_in wheel", where(prefix + ".stand_in.wheel"), _FILE_NAME)
        try:
            parse_wheel_filename(spec["wheel"])
        except InvalidWheelFilename:
            raise RecipeError(
                f"{where(prefix + '.stand_in.wheel')}: '{spec['wheel']}' is not a wheel file name",
                hint="e.g. vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl",
            ) from None
        stand_in = _source(
            {"sdist": spec["wheel"], "sha256": spec["sha256"], **{k: v for k, v in spec.items() if k == "index"}},
            f"{prefix}.stand_in",
            where,
        )
    rust_frontend = entry.get("rust_frontend", "off")
    if rust_frontend not in RUST_MODES:
        raise RecipeError(
            f"{where(prefix + '.rust_frontend')}: unknown rust_frontend '{rust_frontend}'",
            hint=typo_hint(rust_frontend, RUST_MODES, f"use one of {', '.join(RUST_MODES)}"),
        )
    cargo_vendor = None
    if "cargo_vendor" in entry:
        origin = origin_of(prefix + ".cargo_vendor")
        cargo_vendor = (origin.file.parent / entry["cargo_vendor"]).resolve()
        if not cargo_vendor.is_dir():
            raise RecipeError(
                f"{origin}: cargo_vendor {entry['cargo_vendor']} is not a directory",
                hint="point it at the output of `cargo vendor` for vLLM's rust/ crates",
            )
    patches = None
    if "patches" in entry:
        patches = _patch_dir(entry["patches"], origin_of(prefix + ".patches"))
    return PackageRecipe(
        name=entry["name"],
        version=entry["version"],
        source=source,
        kind=kind_name,
        patches=patches,
        env=tuple(sorted(entry.get("env", {}).items())),
        profile=profile,
        inference=inference,
        serving=serving,
        dependencies=tuple(dependencies),
        # the kind's own (kernels that exist for some GPUs only, by design), then the recipe's
        audit_optional=tuple(dict.fromkeys((*kind.audit_optional, *entry.get("audit", {}).get("optional", ())))),
        stand_in=stand_in,
        rust_frontend=rust_frontend,
        cargo_vendor=cargo_vendor,
    )


def _set_beside_profile(table: str, prefix: str, origins: dict[str, Origin]) -> bool:
    """Whether the profile's table was written in the file that chose the profile; one inherited
    from a base is moot once a recipe picks another profile (profile = "full" turns it off)."""
    chooser = origins.get(prefix + ".profile")
    own = [origin for key, origin in origins.items() if key.startswith(f"{prefix}.{table}.")]
    return chooser is None or not own or any(origin.file == chooser.file for origin in own)


def _serving(entry: dict, prefix: str, where, origins: dict[str, Origin]) -> ServingProfile | None:
    if entry.get("profile") != "serving":
        if "serving" in entry and _set_beside_profile("serving", prefix, origins):
            raise RecipeError(f'{where(prefix + ".serving")}: [package.serving] needs profile = "serving"')
        return None
    return vllm_kind.serving_profile(entry.get("serving", {}), lambda key: where(f"{prefix}.{key}"))


# ---- names that become paths or command arguments -------------------------------------------------
# Recipes are shared and pulled from repositories (docs/security.md): each of these names ends up
# as a path segment under gpuwheel's roots or as an argument to git, so it is checked here, once.
_PACKAGE_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")  # PEP 508
_TARGET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # also dependency names
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+!-]{0,254}")  # a bare file name: no '/', no leading '.' or '-'
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_REV = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/+-]{0,199}")  # a tag or branch; git itself refuses '..' in refs
_COMMIT = re.compile(r"[0-9a-f]{40}")
_FIXES = {
    "sdist": 'write just the file name, e.g. flash_attn-2.8.3.tar.gz; set the index with index = "URL"',
    "stand_in wheel": "write just the wheel's file name, e.g. vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl",
    "url": "the last part of the URL's path names the downloaded file",
    "target name": "letters, digits, '.', '_' and '-', starting with a letter or digit",
    "dependency name": "letters, digits, '.', '_' and '-', starting with a letter or digit",
    "package name": "a PEP 508 name, e.g. flash-attn",
    "env name": "letters, digits and '_', not starting with a digit",
    "src_dir_env": "letters, digits and '_', not starting with a digit",
    "fetchcontent_name": "letters, digits and '_', not starting with a digit",
}
_WHAT = {
    _PACKAGE_NAME: "is not a valid package name",
    _TARGET_NAME: "must be a plain name",
    _FILE_NAME: "must be a bare file name",
    _ENV_NAME: "must be an environment variable name",
}


def _check_name(value: str, what: str, where: str, pattern: re.Pattern, shown: str | None = None) -> None:
    if not pattern.fullmatch(value):
        ending = " must end in a bare file name" if what == "url" else f" {_WHAT[pattern]}"
        raise RecipeError(f"{where}: {what} {_quoted(shown or value)}{ending}", hint=_FIXES.get(what))


def _quoted(value: str) -> str:
    """A recipe value in a message: control characters escaped, so a message stays one line."""
    return repr(value) if not value.isprintable() else f"'{value}'"


def _check_git_url(url: str, where: str) -> None:
    # '-' would make git read the URL as an option; '<transport>::' (ext::, fd::) runs commands.
    if url.startswith("-") or re.match(r"[A-Za-z][A-Za-z0-9+.-]*::", url) or not url.isprintable():
        raise RecipeError(
            f"{where}: git {_quoted(url)} must be a repository URL",
            hint="https://, ssh://, git://, file:// or a path; not an option or a transport::",
        )


def _check_index_url(url: str, where: str) -> None:
    if not re.match(r"(https?|file)://", url) or not url.isprintable():
        raise RecipeError(
            f"{where}: index {_quoted(url)} must be an http(s):// or file:// URL",
            hint="the simple index, e.g. https://pypi.org/simple/",
        )


def _check_dependency(dep: dict, prefix: str, where) -> None:
    _check_name(dep["name"], "dependency name", where(prefix + ".name"), _TARGET_NAME)
    _check_git_url(dep["git"], where(prefix + ".git"))
    if not _REV.fullmatch(dep["rev"]) or ".." in dep["rev"] or dep["rev"].endswith((".lock", "/")):
        raise RecipeError(
            f"{where(prefix + '.rev')}: rev {_quoted(dep['rev'])} must be a tag or a commit",
            hint="the GIT_TAG the release pins, e.g. v4.0.0 or a 40-hex commit",
        )
    if "commit" in dep and not _COMMIT.fullmatch(dep["commit"]):
        raise RecipeError(
            f"{where(prefix + '.commit')}: commit {_quoted(dep['commit'])} must be the full 40-hex commit",
            hint="git rev-parse TAG^{commit} gives it",
        )
    for key in ("src_dir_env", "fetchcontent_name"):
        if key in dep:
            _check_name(dep[key], key, where(f"{prefix}.{key}"), _ENV_NAME)


def _relative_path(value: str) -> bool:
    parts = Path(value).parts
    return bool(value) and not Path(value).is_absolute() and ".." not in parts and "\\" not in value


def _source(spec: dict, prefix: str, where) -> Source:
    kinds = [k for k in ("sdist", "git", "url", "path") if k in spec]
    if len(kinds) != 1:
        raise RecipeError(
            f"{where(prefix + '.' + (kinds[1] if len(kinds) > 1 else 'sha256'))}: source needs "
            f"exactly one of sdist, git, url, path (has {', '.join(kinds) or 'none'})"
        )
    kind = kinds[0]
    at = where(f"{prefix}.{kind}")
    if kind == "sdist":
        _check_name(spec[kind], "sdist", at, _FILE_NAME)
    elif kind == "url":
        _check_name(url_filename(spec[kind]), "url", at, _FILE_NAME, shown=spec[kind])
    elif kind == "git":
        _check_git_url(spec[kind], at)
    if spec.get("index") is not None:
        _check_index_url(spec["index"], where(f"{prefix}.index"))
    sha256 = spec.get("sha256")
    if sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise RecipeError(f"{where(prefix + '.sha256')}: sha256 must be 64 lowercase hex digits")
    if kind in ("sdist", "url") and not sha256:
        raise RecipeError(
            f"{where(prefix + '.' + kind)}: a {kind} source needs its sha256",
            hint='add sha256 = "..." (sha256sum of the file)',
        )
    commit = spec.get("commit")
    if kind == "git" and not (commit and re.fullmatch(r"[0-9a-f]{40}", commit)):
        raise RecipeError(
            f"{where(prefix + '.git')}: a git source needs commit = the full 40-hex commit",
            hint="branches and tags move; pin the commit",
        )
    return Source(
        kind=kind,
        location=spec[kind],
        sha256=sha256,
        commit=commit,
        index=spec.get("index"),
        submodules=spec.get("submodules", True),
    )


def _patch_dir(value: str, origin: Origin) -> Path:
    """A patch set is looked up beside the recipe file that names it, then beside each recipes folder
    of the search path (patches/ next to recipes/, as shipped)."""
    candidates = [origin.file.parent / value, *(folder.parent / value for folder in recipe_paths())]
    for candidate in candidates:
        if (candidate / "series").is_file():
            return candidate.resolve()
    raise RecipeError(
        f"{origin}: patch set {value} has no series file",
        hint=f"create {value}/series listing its patches, or remove 'patches'",
    )

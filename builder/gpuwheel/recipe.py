"""TOML recipe → Recipe: `extends` inheritance, schema, and "did you mean" on typos.

A recipe is named by target (`rtx6000pro` → recipes/rtx6000pro.toml) or given as a path.
`extends` names a shipped recipe (`_base/cuda-12.8`, `h100`) or a path relative to the file.
Tables merge key by key; `[[package]]` entries merge with the base's entry of the same name.
Every leaf value remembers the file and line it came from (`gpuwheel show`).
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from gpuwheel import facts
from gpuwheel.errors import RecipeError
from gpuwheel.imageref import image_reference_problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def recipes_dir() -> Path:
    """Where named targets live: $GPUWHEEL_RECIPES, else the checkout's recipes/."""
    return Path(os.environ.get("GPUWHEEL_RECIPES", PROJECT_ROOT / "recipes"))


# ---- schema: table → key → (type, description); used for checks and docs ------------------
_STR, _INT, _LIST_STR, _LIST_INT, _TABLE, _BOOL = "string", "integer", "list of strings", \
    "list of integers", "table", "boolean"

SCHEMA: dict[str, dict[str, str]] = {
    "": {"extends": _STR, "target": _TABLE, "toolchain": _TABLE, "build": _TABLE,
         "package": "array of tables"},
    "target": {"name": _STR, "description": _STR, "gpu": _STR, "compute_capability": _STR,
               "torch_cuda_arch_list": _STR, "min_driver": _STR},
    "toolchain": {"cuda": _STR, "python": _STR, "torch": _STR, "base_image": _STR,
                  "base_image_digest": _STR},
    "build": {"jobs": _INT, "nvcc_threads": _INT, "build_type": _STR, "engine": _STR},
    "package": {"name": _STR, "version": _STR, "source": _TABLE, "patches": _STR,
                "env": _TABLE, "profile": _STR, "inference": _TABLE, "dependency": "array of tables",
                "audit": _TABLE},
    "package.source": {"sdist": _STR, "index": _STR, "git": _STR, "commit": _STR,
                       "url": _STR, "path": _STR, "sha256": _STR, "submodules": _BOOL},
    "package.inference": {"head_dims": _LIST_INT, "disable": _LIST_STR},
    "package.dependency": {"name": _STR, "git": _STR, "rev": _STR, "commit": _STR,
                           "src_dir_env": _STR, "fetchcontent_name": _STR, "submodules": _BOOL},
    "package.audit": {"optional": _LIST_STR},
}
REQUIRED: dict[str, tuple[str, ...]] = {
    "target": ("name", "compute_capability", "torch_cuda_arch_list", "min_driver"),
    "toolchain": ("cuda", "python", "torch"),
    "package": ("name", "version", "source"),
    "package.dependency": ("name", "git", "rev"),
}
PROFILES = ("full", "inference")
ENGINES = ("docker", "podman")  # container engines of the container backend
# Features the flash-attn inference profile may switch off (FLASHATTENTION_DISABLE_<NAME>).
FLASH_ATTN_FEATURES = ("dropout", "alibi", "softcap", "local", "uneven_k")
FLASH_ATTN_HEAD_DIMS = (32, 64, 96, 128, 192, 256)


# ---- the Recipe value ---------------------------------------------------------------------
@dataclass(frozen=True)
class Origin:
    file: Path
    line: int

    def __str__(self) -> str:
        return f"{_display(self.file)}:{self.line}"


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    gpu: str
    compute_capability: str
    torch_cuda_arch_list: str
    min_driver: str


@dataclass(frozen=True)
class Toolchain:
    cuda: str
    python: str
    torch: str
    base_image: str | None = None
    base_image_digest: str | None = None


@dataclass(frozen=True)
class BuildOptions:
    jobs: int | None = None  # None: chosen from cores and available memory
    nvcc_threads: int | None = None
    build_type: str = "Release"
    engine: str | None = None  # the container backend's engine; --engine and $GPUWHEEL_ENGINE win over it


@dataclass(frozen=True)
class Source:
    kind: str  # "sdist" | "git" | "url" | "path"
    location: str  # sdist file name, git URL, URL or path
    sha256: str | None = None
    commit: str | None = None
    index: str | None = None  # sdist only; None = pip's configured index
    submodules: bool = True


@dataclass(frozen=True)
class Dependency:
    """A source vLLM's CMake would FetchContent from GitHub, pinned as the release pins it."""

    name: str
    git: str
    rev: str  # the GIT_TAG of the vLLM release: a tag or a commit
    src_dir_env: str | None = None  # the variable that points vLLM at a local tree
    fetchcontent_name: str | None = None  # for FETCHCONTENT_SOURCE_DIR_<NAME> when no variable
    commit: str | None = None  # full commit the rev resolves to, when known
    submodules: bool = True


@dataclass(frozen=True)
class InferenceProfile:
    head_dims: tuple[int, ...] = FLASH_ATTN_HEAD_DIMS
    disable: tuple[str, ...] = ()  # features of FLASH_ATTN_FEATURES switched off


@dataclass(frozen=True)
class PackageRecipe:
    name: str
    version: str
    source: Source
    patches: Path | None = None
    env: tuple[tuple[str, str], ...] = ()
    profile: str = "full"
    inference: InferenceProfile | None = None
    dependencies: tuple[Dependency, ...] = ()
    audit_optional: tuple[str, ...] = ()


@dataclass(frozen=True)
class Recipe:
    path: Path
    target: Target
    toolchain: Toolchain
    build: BuildOptions
    packages: tuple[PackageRecipe, ...]
    files: tuple[Path, ...]  # this recipe and every file it extends, base last
    origins: dict[str, Origin] = field(default_factory=dict, compare=False, hash=False)

    @property
    def name(self) -> str:
        return self.target.name

    def package(self, name: str) -> PackageRecipe | None:
        return next((p for p in self.packages if p.name == name), None)


def closest(word: str, choices) -> str | None:
    """The valid name a typo most likely meant ('cuda_version' → 'cuda'), if any is close."""
    choices = list(choices)
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    if match:
        return match[0]
    containing = [c for c in choices if c and (c in word or word in c)]
    return max(containing, key=len) if containing else None


# ---- loading ------------------------------------------------------------------------------
def list_targets() -> list[str]:
    """Names of the shipped targets (bases under _base/ are not targets)."""
    return sorted(p.stem for p in recipes_dir().glob("*.toml"))


def load_recipe(name_or_path: str | os.PathLike) -> Recipe:
    """Load a recipe by target name or path, resolving `extends`; raises RecipeError."""
    path = _locate(str(name_or_path), relative_to=None)
    data, origins, files = _load_merged(path, chain=())
    return _build(path, data, origins, files)


def _locate(ref: str, relative_to: Path | None) -> Path:
    looks_like_path = ref.endswith(".toml") or ref.startswith((".", "/")) or os.sep in ref \
        and not ref.startswith("_base/")
    if looks_like_path:
        path = Path(ref) if relative_to is None or Path(ref).is_absolute() else relative_to / ref
        if not path.is_file():
            raise RecipeError(f"recipe file {ref} does not exist", hint="check the path")
        return path.resolve()
    path = recipes_dir() / f"{ref}.toml"
    if path.is_file():
        return path.resolve()
    known = list_targets() + sorted(f"_base/{p.stem}" for p in (recipes_dir() / "_base").glob("*.toml"))
    close = closest(ref, known)
    where = f"{_display(relative_to)}: " if relative_to else ""
    hint = f"did you mean '{close}'?" if close else f"known targets: {', '.join(list_targets())}"
    raise RecipeError(f"{where}unknown target '{ref}'", hint=hint)


def _load_merged(path: Path, chain: tuple[Path, ...]) -> tuple[dict, dict[str, Origin], tuple[Path, ...]]:
    if path in chain:
        cycle = " → ".join(_display(p) for p in (*chain, path))
        raise RecipeError(f"extends cycle: {cycle}", hint="remove one of the extends")
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise RecipeError(f"{_display(path)}: not valid TOML: {error}",
                          hint="fix the syntax at that line") from None
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"{_display(path)}: cannot read: {error}") from None
    lines = _key_lines(text)
    _check_schema(data, path, lines)
    origins = {key: Origin(path, line) for key, line in _leaf_lines(data, lines).items()}
    base_ref = data.pop("extends", None)
    if base_ref is None:
        return data, origins, (path,)
    base_path = _locate(base_ref, relative_to=path.parent)
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
            combined = _merge({k: v for k, v in merged[index].items() if k != "source" or
                               "source" not in package}, package)
            merged[index] = combined
    return merged


# ---- schema checks --------------------------------------------------------------------------
_HEADER_RE = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\]?\s*(#.*)?$")
_KEY_RE = re.compile(r"^\s*([A-Za-z0-9_\-]+)\s*=")
_INLINE_KEY_RE = re.compile(r"([A-Za-z0-9_\-]+)\s*=")


def _key_lines(text: str) -> dict[str, int]:
    """Map 'table.key' and 'package[N].key' paths to the line that sets them (for messages).

    tomllib gives no positions, so this reads the header/key lines; values are never parsed here.
    """
    lines: dict[str, int] = {}
    table = ""
    array_counts: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
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
            path = f"{table}.{key[1]}" if table else key[1]
            lines.setdefault(path, number)
            inline = line[key.end():]
            if "{" in inline:
                for sub in _INLINE_KEY_RE.findall(inline):
                    lines.setdefault(f"{path}.{sub}", number)
    return lines


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
        else:
            out[path] = lines.get(path, lines.get(prefix, 1))
    return out


def _check_schema(data: dict, path: Path, lines: dict[str, int]) -> None:
    _check_table(data, "", "", path, lines)


def _check_table(table: dict, schema_name: str, line_path: str, path: Path, lines: dict[str, int]) -> None:
    allowed = SCHEMA[schema_name]
    for key, value in table.items():
        key_path = f"{line_path}.{key}" if line_path else key
        where = f"{_display(path)}:{lines.get(key_path, lines.get(line_path, 1))}"
        label = f"[{schema_name}] " if schema_name else ""
        if key not in allowed:
            close = closest(key, allowed)
            hint = f"did you mean '{close}'?" if close else f"valid keys: {', '.join(allowed)}"
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
            raise RecipeError(f"{where}: {label}'{key}' must be a {expected}, got {_kind(value)}",
                              hint='quote versions, e.g. cuda = "12.8.1"' if expected == _STR else None)


def _check_env(env: dict, where: str) -> None:
    for name, value in env.items():
        if not isinstance(value, str):
            raise RecipeError(f"{where}: env {name} must be a string, got {_kind(value)}",
                              hint=f'write {name} = "{value}"')


def _is(value: Any, expected: str) -> bool:
    if expected == _STR:
        return isinstance(value, str)
    if expected == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected == _BOOL:
        return isinstance(value, bool)
    if expected == _LIST_STR:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if expected == _LIST_INT:
        return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return False


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)


# ---- building the Recipe value ----------------------------------------------------------------
def _build(path: Path, data: dict, origins: dict[str, Origin], files: tuple[Path, ...]) -> Recipe:
    def origin_of(key: str) -> Origin:
        return origins.get(key, Origin(path, 1))

    def where(key: str) -> str:
        return str(origin_of(key))

    def require(table: dict, table_name: str, origin_prefix: str) -> None:
        for key in REQUIRED[table_name]:
            if key not in table:
                raise RecipeError(f"{where(origin_prefix) if origin_prefix in origins else _display(path)}: "
                                  f"missing [{table_name}] {key}",
                                  hint=f"add {key} = ... to [{table_name}] or to a recipe it extends")

    for table_name in ("target", "toolchain"):
        if table_name not in data:
            raise RecipeError(f"{_display(path)}: missing [{table_name}] table")
        require(data[table_name], table_name, table_name)
    t, tc = data["target"], data["toolchain"]

    def version(value: str, key: str, example: str) -> str:
        try:
            Version(value)
        except InvalidVersion:
            raise RecipeError(f"{where(key)}: {key} '{value}' is not a version",
                              hint=f'write it like "{example}"') from None
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
    target = Target(name=t["name"], description=t.get("description", ""),
                    gpu=t.get("gpu", t.get("description", t["name"])),
                    compute_capability=t["compute_capability"],
                    torch_cuda_arch_list=t["torch_cuda_arch_list"], min_driver=t["min_driver"])
    toolchain = Toolchain(**{k: tc.get(k) for k in SCHEMA["toolchain"]})
    b = data.get("build", {})
    for key in ("jobs", "nvcc_threads"):
        if key in b and b[key] < 1:
            raise RecipeError(f"{where('build.' + key)}: build.{key} must be ≥ 1, got {b[key]}")
    if "engine" in b and b["engine"] not in ENGINES:
        close = closest(b["engine"], ENGINES) if b["engine"] else None
        raise RecipeError(f"{where('build.engine')}: unknown engine '{b['engine']}'",
                          hint=f"did you mean '{close}'?" if close else f"use one of {', '.join(ENGINES)}")
    if "base_image" in tc and (problem := image_reference_problem(tc["base_image"])):
        raise RecipeError(f"{where('toolchain.base_image')}: base_image '{tc['base_image']}' names no image: {problem}")
    build = BuildOptions(jobs=b.get("jobs"), nvcc_threads=b.get("nvcc_threads"),
                         build_type=b.get("build_type", "Release"), engine=b.get("engine"))
    packages = []
    for entry in data.get("package", []):
        prefix = f"package[{entry.get('name', '?')}]"
        require(entry, "package", prefix)
        version(entry["version"], f"{prefix}.version", "2.8.3")
        packages.append(_package(entry, prefix, where, origin_of))
    if not packages:
        raise RecipeError(f"{_display(path)}: the recipe builds no package", hint="add a [[package]] table")
    return Recipe(path=path, target=target, toolchain=toolchain, build=build,
                  packages=tuple(packages), files=files, origins=origins)


def _package(entry: dict, prefix: str, where, origin_of) -> PackageRecipe:
    source = _source(entry["source"], f"{prefix}.source", where)
    profile = entry.get("profile", "full")
    if profile not in PROFILES:
        close = closest(profile, PROFILES)
        raise RecipeError(f"{where(prefix + '.profile')}: unknown profile '{profile}'",
                          hint=f"did you mean '{close}'?" if close else f"use one of {', '.join(PROFILES)}")
    inference = None
    if profile == "inference":
        spec = entry.get("inference", {})
        head_dims = tuple(spec.get("head_dims", FLASH_ATTN_HEAD_DIMS))
        disable = tuple(spec.get("disable", ()))
        for dim in head_dims:
            if dim not in FLASH_ATTN_HEAD_DIMS:
                raise RecipeError(f"{where(prefix + '.inference.head_dims')}: head dim {dim} is not built by "
                                  f"flash-attn", hint=f"choose from {', '.join(map(str, FLASH_ATTN_HEAD_DIMS))}")
        for feature in disable:
            if feature not in FLASH_ATTN_FEATURES:
                close = closest(feature, FLASH_ATTN_FEATURES)
                raise RecipeError(f"{where(prefix + '.inference.disable')}: unknown feature '{feature}'",
                                  hint=f"did you mean '{close}'?" if close else
                                  f"choose from {', '.join(FLASH_ATTN_FEATURES)}")
        inference = InferenceProfile(head_dims=tuple(sorted(set(head_dims))), disable=tuple(sorted(set(disable))))
    elif "inference" in entry:
        raise RecipeError(f"{where(prefix + '.inference.head_dims')}: [package.inference] needs profile = \"inference\"")
    dependencies = []
    for index, dep in enumerate(entry.get("dependency", [])):
        dep_prefix = f"{prefix}.dependency[{index}]"
        for key in REQUIRED["package.dependency"]:
            if key not in dep:
                raise RecipeError(f"{where(prefix + '.name')}: dependency {dep.get('name', index)} of "
                                  f"{entry['name']} lacks '{key}'")
        if not dep.get("src_dir_env") and not dep.get("fetchcontent_name"):
            raise RecipeError(f"{where(dep_prefix + '.name')}: dependency {dep['name']} needs src_dir_env or "
                              f"fetchcontent_name", hint="say how vLLM is pointed at the pre-fetched tree")
        dependencies.append(Dependency(**dep))
    patches = None
    if "patches" in entry:
        patches = _patch_dir(entry["patches"], origin_of(prefix + ".patches"))
    return PackageRecipe(
        name=entry["name"], version=entry["version"], source=source, patches=patches,
        env=tuple(sorted(entry.get("env", {}).items())), profile=profile, inference=inference,
        dependencies=tuple(dependencies), audit_optional=tuple(entry.get("audit", {}).get("optional", ())))


def _source(spec: dict, prefix: str, where) -> Source:
    kinds = [k for k in ("sdist", "git", "url", "path") if k in spec]
    if len(kinds) != 1:
        raise RecipeError(f"{where(prefix + '.' + (kinds[1] if len(kinds) > 1 else 'sha256'))}: source needs "
                          f"exactly one of sdist, git, url, path (has {', '.join(kinds) or 'none'})")
    kind = kinds[0]
    sha256 = spec.get("sha256")
    if sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise RecipeError(f"{where(prefix + '.sha256')}: sha256 must be 64 lowercase hex digits")
    if kind in ("sdist", "url") and not sha256:
        raise RecipeError(f"{where(prefix + '.' + kind)}: a {kind} source needs its sha256",
                          hint="add sha256 = \"...\" (sha256sum of the file)")
    commit = spec.get("commit")
    if kind == "git" and not (commit and re.fullmatch(r"[0-9a-f]{40}", commit)):
        raise RecipeError(f"{where(prefix + '.git')}: a git source needs commit = the full 40-hex commit",
                          hint="branches and tags move; pin the commit")
    return Source(kind=kind, location=spec[kind], sha256=sha256, commit=commit, index=spec.get("index"),
                  submodules=spec.get("submodules", True))


def _patch_dir(value: str, origin: Origin) -> Path:
    """A patch set is looked up beside the recipe file that names it, then beside the recipes."""
    candidates = [origin.file.parent / value, recipes_dir().parent / value]
    for candidate in candidates:
        if (candidate / "series").is_file():
            return candidate.resolve()
    raise RecipeError(f"{origin}: patch set {value} has no series file",
                      hint=f"create {value}/series listing its patches, or remove 'patches'")


def _display(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        try:
            return str(Path(path).resolve().relative_to(PROJECT_ROOT))
        except ValueError:
            return str(path)

"""Plan + Sources + the resolved toolchain environment → Lock: every input of a build, pinned with
hashes, written next to the recipe as `<target>.lock` (TOML) for users to commit; and the drift
between a lock and what the recipe, the sources and the machine give now.

A lock holds:
- `inputs`: exactly what the plan hash covers (pins, source hashes, patch hashes, env, command),
  flattened to one key per value, so that drift is named (`toolchain.torch`), not just detected;
- `source`: each package source and dependency as fetched and verified (sdist sha256, git commit);
- `toolchain`: the requirements the backend installs, and the environment pip resolved for them
  against the index pip is configured with (name, version, wheel file, sha256); the CUDA toolkit
  seen (nvcc) and the base image and digest for container builds where the recipe pins them.

`gpuwheel lock --check` compares what the recipe gives now (no network: inputs and requirements);
`gpuwheel build --locked` adds the fetched sources and the observed toolchain, and installs the
toolchain venv from the lock's hashes (`pip install --require-hashes`). docs/lock.md has the format.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
from packaging.utils import canonicalize_name

from gpuwheel.errors import LockError
from gpuwheel.plan import Plan, make_plan, plan_inputs
from gpuwheel.recipe import Recipe
from gpuwheel.run import last_line, run

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

LOCK_SCHEMA = 1
LOCK_SUFFIX = ".lock"
_HEADER = (
    "# Written by `gpuwheel lock {target}`: every input of its build, pinned. Commit it; CI runs\n"
    "# `gpuwheel lock {target} --check`, and `gpuwheel build {target} --locked` builds only from it.\n"
)


@dataclass(frozen=True)
class LockedSource:
    """A package source or one of its dependencies, as the fetch verified it."""

    package: str  # the plan package it belongs to
    name: str
    role: str  # package | dependency
    kind: str  # sdist | git | url | path; stand-in: a dependency whose files come from a published wheel
    location: str
    sha256: str | None = None
    commit: str | None = None


@dataclass(frozen=True)
class LockedWheel:
    """One distribution of the toolchain environment, as pip resolved it."""

    name: str  # canonical
    version: str
    file: str  # the file pip chose (a name, never the index's host)
    sha256: str

    @property
    def requirement(self) -> str:
        """A line of a hash-checking requirements file."""
        return f"{self.name}=={self.version} --hash=sha256:{self.sha256}"


@dataclass(frozen=True)
class Lock:
    path: Path
    target: str
    plan_hash: str
    packages: tuple[str, ...]  # the plan packages locked (a `--only` selection, or all)
    inputs: Mapping[str, Any]
    python: str  # x.y.z of the interpreter pip resolved for
    requirements: tuple[str, ...]  # what the backend installs, as it asks pip
    environment: tuple[LockedWheel, ...]
    cuda_toolkit: str | None  # nvcc's version where a host toolkit was found; None: the PyPI wheels in environment
    base_image: str | None
    base_image_digest: str | None
    sources: tuple[LockedSource, ...]

    @property
    def requirements_text(self) -> str:
        """The hash-checking requirements file the locked toolchain is installed from."""
        return "".join(f"{wheel.requirement}\n" for wheel in self.environment)

    @property
    def environment_key(self) -> str:
        return hashlib.sha256(self.requirements_text.encode()).hexdigest()[:16]

    def version_of(self, name: str) -> str | None:
        return next((w.version for w in self.environment if w.name == canonicalize_name(name)), None)

    # ---- drift: each check raises LockError naming the first difference ---------------------------
    def check_plan(self, plan: Plan) -> None:
        """The recipe still gives the locked plan (no network: pins, patches, env, command)."""
        changed = _differences(self.inputs, locked_inputs(plan))
        if changed:
            self._stale(changed)
        if plan.hash != self.plan_hash:  # the inputs cover the hash: only a hand-edited lock gets here
            self._stale([f"plan_hash is {plan.hash[:16]} now, {self.plan_hash[:16]} in the lock"])

    def check_covers(self, recipe: Recipe, plan: Plan, *, jobs: int | None = None) -> None:
        """The lock holds the plan's packages, and the recipe still gives the plan it locked: a lock of
        more packages than a build's --only is checked as the plan of all it locks."""
        unlocked = [p.name for p in plan.packages if p.name not in self.packages]
        if unlocked:
            raise LockError(
                f"{self.path} locks {', '.join(self.packages)}, not {', '.join(unlocked)}",
                hint=f"lock them: `gpuwheel lock {plan.target.name}` (with the same --only as the build)",
            )
        selection = tuple(p.name for p in plan.packages)
        self.check_plan(plan if selection == self.packages else make_plan(recipe, jobs=jobs, only=self.packages))

    def check_requirements(self, requirements: Iterable[str]) -> None:
        """The backend asks for what was resolved (BUILD_REQUIREMENTS, torch's variant, PyPI CUDA wheels)."""
        now = tuple(requirements)
        if now != self.requirements:
            added = [r for r in now if r not in self.requirements]
            removed = [r for r in self.requirements if r not in now]
            self._stale(
                [
                    "toolchain requirements changed "
                    f"({', '.join([*(f'+{r}' for r in added), *(f'-{r}' for r in removed)])})"
                ]
            )

    def check_sources(self, sources: Any) -> None:
        """What the fetch verified (a FetchedPackage per package) is what was locked."""
        locked = {(s.package, s.name): s for s in self.sources}
        changed = []
        for package in sources.packages:
            fetched = [
                (package.name, package.sha256, package.commit),
                *((dep.name, None, dep.commit) for dep in package.dependencies),
            ]
            for name, sha256, commit in fetched:
                was = locked.get((package.name, name))
                if was is None:
                    changed.append(f"source {package.name}/{name} is not in the lock")
                elif (sha256 or None) != was.sha256 or (commit or None) != was.commit:
                    changed.append(
                        f"source {package.name}/{name} is {_pin(sha256, commit)} now, "
                        f"{_pin(was.sha256, was.commit)} in the lock"
                    )
        if changed:
            self._stale(changed)

    def check_toolchain(self, observed: Any) -> None:
        """The toolchain the backend observed (ToolchainInfo) is the locked one."""
        changed = []
        if self.cuda_toolkit and observed.nvcc != self.cuda_toolkit:
            changed.append(f"the CUDA toolkit is nvcc {observed.nvcc} now, {self.cuda_toolkit} in the lock")
        torch = self.version_of("torch")
        if torch and observed.torch and observed.torch.split("+")[0] != torch.split("+")[0]:
            changed.append(f"torch is {observed.torch} now, {torch} in the lock")
        if (
            self.base_image_digest
            and observed.base_image_digest
            and observed.base_image_digest != self.base_image_digest
        ):
            changed.append(f"the base image is {observed.base_image_digest} now, {self.base_image_digest} in the lock")
        if changed:
            self._stale(changed)

    def check_hash_failure(self, pip_output: Iterable[str], log: Path) -> None:
        """pip refused a file of the locked environment: the index serves other bytes than were locked."""
        lines = [line.strip() for line in pip_output]
        refused = [
            (lines[i].split(" from ", 1)[0], lines[i + 1].split()[-1], lines[i + 2].split()[-1])
            for i in range(len(lines) - 2)
            if lines[i + 1].startswith("Expected sha256") and lines[i + 2].startswith("Got")
        ]
        if refused:
            changed = [
                f"{name}: the index serves a file of sha256 {got}, the lock has {expected}"
                for name, expected, got in refused
            ]
            more = f" (+{len(changed) - 1} more)" if len(changed) > 1 else ""
            raise LockError(
                f"{self.path}: {changed[0]}{more}",
                hint=f"the file changed on the index, or the lock was edited: compare before you run "
                f"`gpuwheel lock {self.target}` again; pip's output in {log}",
            )

    def _stale(self, changed: list[str]) -> None:
        more = f" (+{len(changed) - 1} more)" if len(changed) > 1 else ""
        raise LockError(
            f"{self.path}: the lock is stale: {changed[0]}{more}",
            hint=f"if the change is meant, run `gpuwheel lock {self.target}` and commit {self.path.name}",
        )

    # ---- the file ------------------------------------------------------------------------------
    def to_toml(self) -> str:
        data = {
            "schema": LOCK_SCHEMA,
            "target": self.target,
            "plan_hash": self.plan_hash,
            "packages": list(self.packages),
            "toolchain": _without_none(
                {
                    "python": self.python,
                    "requirements": list(self.requirements),
                    "cuda_toolkit": self.cuda_toolkit,
                    "base_image": self.base_image,
                    "base_image_digest": self.base_image_digest,
                    "environment": [_without_none(vars(w)) for w in self.environment],
                }
            ),
            "source": [_without_none(vars(s)) for s in self.sources],
            "inputs": dict(self.inputs),
        }
        return _HEADER.format(target=self.target) + tomli_w.dumps(data, multiline_strings=False)

    def to_json(self) -> dict:
        return {
            "path": str(self.path),
            "target": self.target,
            "plan_hash": self.plan_hash,
            "packages": list(self.packages),
            "python": self.python,
            "requirements": list(self.requirements),
            "environment": [vars(w) for w in self.environment],
            "cuda_toolkit": self.cuda_toolkit,
            "base_image": self.base_image,
            "base_image_digest": self.base_image_digest,
            "sources": [vars(s) for s in self.sources],
        }


def lock_path(plan: Plan) -> Path:
    """`<recipe dir>/<target>.lock`, beside the recipe the user commits."""
    return plan.recipe.parent / f"{plan.target.name}{LOCK_SUFFIX}"


def make_lock(
    plan: Plan,
    sources: Any,
    *,
    python: str,
    requirements: tuple[str, ...],
    environment: tuple[LockedWheel, ...],
    cuda_toolkit: str | None,
    path: Path | None = None,
) -> Lock:
    """The lock of a plan, its fetched Sources and the environment resolved for its toolchain."""
    locked = []
    for package in sources.packages:
        package_plan = plan.package(package.name)
        assert package_plan is not None  # the sources were fetched for this plan's packages
        locked.append(
            LockedSource(
                package.name,
                package.name,
                "package",
                package.kind,
                package_plan.source.location,
                package.sha256,
                package.commit,
            )
        )
        planned = {d.name: d for d in package_plan.dependencies}
        for dep in package.dependencies:
            kind = "stand-in" if dep.name in package_plan.stand_ins else "git"
            locked.append(
                LockedSource(package.name, dep.name, "dependency", kind, planned[dep.name].git, None, dep.commit)
            )
    return Lock(
        path=path or lock_path(plan),
        target=plan.target.name,
        plan_hash=plan.hash,
        packages=tuple(p.name for p in plan.packages),
        inputs=locked_inputs(plan),
        python=python,
        requirements=requirements,
        environment=environment,
        cuda_toolkit=cuda_toolkit,
        base_image=plan.toolchain.base_image,
        base_image_digest=plan.toolchain.base_image_digest,
        sources=tuple(locked),
    )


def write_lock(lock: Lock) -> None:
    """Write the lock whole or not at all (a temp file renamed over the old one)."""
    lock.path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=lock.path.parent, prefix=f".{lock.path.name}.", delete=False
    ) as temp:
        temp.write(lock.to_toml())
    os.replace(temp.name, lock.path)


def read_lock(path: Path) -> Lock:
    """A lock file read and checked; LockError naming the file and field for anything else."""
    if not path.is_file():
        raise LockError(f"no lock {path}", hint=f"run `gpuwheel lock {path.stem}` and commit {path.name}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise LockError(
            f"{path}: not a readable lock ({error})", hint=f"run `gpuwheel lock {path.stem}` again"
        ) from None
    if data.get("schema") != LOCK_SCHEMA:
        raise LockError(
            f"{path}: schema {data.get('schema')!r}, this gpuwheel reads lock schema {LOCK_SCHEMA}",
            hint=f"run `gpuwheel lock {path.stem}` with this gpuwheel",
        )
    try:
        toolchain = data["toolchain"]
        return Lock(
            path=path,
            target=str(data["target"]),
            plan_hash=str(data["plan_hash"]),
            packages=tuple(data["packages"]),
            inputs=dict(data["inputs"]),
            python=str(toolchain["python"]),
            requirements=tuple(toolchain["requirements"]),
            environment=tuple(LockedWheel(**w) for w in toolchain["environment"]),
            cuda_toolkit=toolchain.get("cuda_toolkit"),
            base_image=toolchain.get("base_image"),
            base_image_digest=toolchain.get("base_image_digest"),
            sources=tuple(LockedSource(**s) for s in data.get("source", [])),
        )
    except KeyError as error:
        raise LockError(f"{path}: no {error.args[0]!r}", hint=f"run `gpuwheel lock {path.stem}` again") from None
    except TypeError as error:  # an entry with a field too many or too few
        raise LockError(f"{path}: a malformed entry ({error})", hint=f"run `gpuwheel lock {path.stem}` again") from None


# ---- resolving the toolchain environment ---------------------------------------------------------
def resolve_environment(python: Path, requirements: tuple[str, ...], *, log_path: Path) -> tuple[LockedWheel, ...]:
    """What `pip install REQUIREMENTS` would install into a fresh venv of `python`, with hashes.

    pip, not uv: pip reads the configuration the toolchain venv is then installed with (pip.conf,
    PIP_INDEX_URL, PIP_EXTRA_INDEX_URL for torch's variant index, constraints); uv reads its own and
    would resolve against another index. `--dry-run --report` resolves without installing; pip
    records each file's sha256 from the index (or hashes a local file itself).
    """
    with tempfile.TemporaryDirectory(prefix="gpuwheel-lock-") as scratch:
        report_path = Path(scratch) / "report.json"
        argv = (
            str(python),
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--no-input",
            "--disable-pip-version-check",
            "--report",
            str(report_path),
            *requirements,
        )
        done = run(argv, log_path=log_path)
        if not done.ok or not report_path.is_file():
            last = last_line(done.tail, f"exit status {done.returncode}")
            raise LockError(
                f"resolving the toolchain environment failed: {last.strip()}",
                hint=f"pip needs a version with --report (≥ 22.2) and the index it is configured with; "
                f"full output in {log_path}",
            )
        report = json.loads(report_path.read_text(encoding="utf-8"))
    return tuple(sorted((_locked_wheel(item) for item in report.get("install", [])), key=lambda w: w.name))


def _locked_wheel(item: Mapping[str, Any]) -> LockedWheel:
    name = canonicalize_name(item["metadata"]["name"])
    info = item.get("download_info", {})
    sha256 = info.get("archive_info", {}).get("hashes", {}).get("sha256")
    if not sha256:
        raise LockError(
            f"cannot lock {name}: pip resolved it to {info.get('url', 'a source')} without a file hash",
            hint="lock only requirements that resolve to index files (no VCS or directory requirements)",
        )
    return LockedWheel(name, item["metadata"]["version"], info["url"].rsplit("/", 1)[-1], sha256)


# ---- flattening the plan's inputs ---------------------------------------------------------------
def locked_inputs(plan: Plan) -> dict[str, Any]:
    """The plan's hashed inputs as the hash sees them (JSON: tuples are lists), one key per value."""
    return flatten(json.loads(json.dumps(plan_inputs(plan))))


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{'toolchain': {'torch': '2.14.1'}} → {'toolchain.torch': '2.14.1'}; lists of named tables are keyed
    by name (`packages.flash-attn.env.MAX_JOBS`), other lists of tables by position, lists of scalars
    kept; None left out (TOML has no null)."""
    if isinstance(value, Mapping):
        items = [(str(key), item) for key, item in value.items()]
    elif isinstance(value, list) and value and all(isinstance(item, Mapping) for item in value):
        names = [item.get("name") for item in value]
        keyed = all(isinstance(n, str) for n in names) and len(set(names)) == len(names)
        items = [(names[i] if keyed else str(i), item) for i, item in enumerate(value)]
    else:
        return {} if value is None else {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in items:
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else key))
    return flat


def _differences(locked: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    changed = []
    for key in [*now, *(key for key in locked if key not in now)]:  # the plan's order: target, toolchain, packages
        if key not in now:
            changed.append(f"{key} is gone (was {locked[key]!r} in the lock)")
        elif key not in locked:
            changed.append(f"{key} = {now[key]!r} is new (not in the lock)")
        elif locked[key] != now[key]:
            changed.append(f"{key} is {now[key]!r} now, {locked[key]!r} in the lock")
    return changed


def _pin(sha256: str | None, commit: str | None) -> str:
    return f"sha256 {sha256}" if sha256 else f"commit {commit}" if commit else "unpinned"


def _without_none(table: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in table.items() if value is not None}

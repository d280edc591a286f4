"""Wheels + their provenance + the lock → Verification: rebuild the finished wheels of one build from
what they record (target, package, plan hash) and the lock their target was built from, once, in a
scratch folder of the cache (never wheels/<target>/), and compare each with its rebuild
(`wheeldiff.compare_wheels`).

Refused, in one line each, before anything is built: a wheel without gpuwheel.json (WheelError), one
whose target is no plain name or is not on the recipe path (RecipeError), a lock that is missing or
does not hold the plan the wheel records (LockError). docs/lock.md, "verify".
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpuwheel.cache import cache_root, remove_inside
from gpuwheel.errors import LockError, RecipeError, WheelError
from gpuwheel.lock import Lock, lock_path, read_lock
from gpuwheel.log import logger
from gpuwheel.pipeline import build_plan
from gpuwheel.plan import Plan, make_plan
from gpuwheel.recipe import Recipe, load_recipe
from gpuwheel.run import run
from gpuwheel.wheeldiff import WheelDiff, compare_wheels
from gpuwheel.wheelfile import PROVENANCE_FILE, read_wheel

# A target or package name from a wheel becomes a recipe lookup and a cache path: the recipe's own
# rule for target names (recipe.py), checked here because the wheel may come from anywhere.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_PLAN_HASH = re.compile(r"[0-9a-f]{64}")
DIFFOSCOPE_REPORT = "diffoscope.txt"  # <package>.diffoscope.txt beside the rebuild


@dataclass(frozen=True)
class Recorded:
    """What a finished wheel's gpuwheel.json says it was built from."""

    path: Path
    filename: str
    target: str
    package: str
    plan_hash: str
    backend: str | None  # the backend that built it, where recorded (local, container)


@dataclass(frozen=True)
class WheelCheck:
    """One wheel against its rebuild."""

    wheel: Recorded
    rebuilt: Path  # the rebuilt wheel, in the scratch folder
    diff: WheelDiff
    diffoscope: Path | None  # its report where it ran (a difference, and diffoscope installed)
    diffoscope_note: str | None  # why it did not run, where it did not

    @property
    def same(self) -> bool:
        return self.diff.same

    def to_json(self) -> dict[str, Any]:
        return {
            "wheel": str(self.wheel.path),
            "package": self.wheel.package,
            "rebuilt": str(self.rebuilt),
            "same": self.same,
            "diff": self.diff.to_json(),
            "diffoscope": str(self.diffoscope) if self.diffoscope else None,
            "diffoscope_note": self.diffoscope_note,
        }


@dataclass(frozen=True)
class Verification:
    """The wheels of one build, rebuilt once from their plan and lock, each compared with its rebuild."""

    target: str
    plan_hash: str
    lock: Path
    backend: str
    rebuilt_dir: Path
    wheels: tuple[WheelCheck, ...]

    @property
    def same(self) -> bool:
        return all(check.same for check in self.wheels)

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "plan_hash": self.plan_hash,
            "lock": str(self.lock),
            "backend": self.backend,
            "rebuilt_dir": str(self.rebuilt_dir),
            "same": self.same,
            "wheels": [check.to_json() for check in self.wheels],
        }


def recorded_in(path: Path) -> Recorded:
    """The target, package and plan a finished wheel records; WheelError when it records none."""
    wheel = read_wheel(Path(path))
    provenance = wheel.provenance
    if provenance is None:
        raise WheelError(
            f"{wheel.filename}: no {wheel.dist_info}/{PROVENANCE_FILE}; gpuwheel did not finish this "
            "wheel, so nothing says how to rebuild it",
            hint="verify wheels that `gpuwheel build` made",
        )
    fields = {
        "target": provenance.target,
        "package.name": provenance.package.name if provenance.package else None,
        "plan_hash": provenance.plan_hash,
    }
    checked: dict[str, str] = {}
    for field, value in fields.items():
        pattern = _PLAN_HASH if field == "plan_hash" else _PLAIN_NAME
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise WheelError(
                f"{wheel.filename}: its {PROVENANCE_FILE} has no usable {field} ({value!r})",
                hint="the file was edited or is not gpuwheel's; rebuild the wheel with `gpuwheel build`",
            )
        checked[field] = value
    observed = (provenance.toolchain or {}).get("observed") or {}
    backend = observed.get("backend") if isinstance(observed, Mapping) else None
    return Recorded(
        Path(path),
        wheel.filename,
        checked["target"],
        checked["package.name"],
        checked["plan_hash"],
        backend if backend in ("local", "container") else None,
    )


def one_build(wheels: Sequence[Recorded]) -> Recorded:
    """The first of wheels that must all record one target and plan (one rebuild verifies them all)."""
    plans = sorted({(w.target, w.plan_hash) for w in wheels})
    if len(plans) > 1:
        named = ", ".join(f"{target} plan {plan[:16]}" for target, plan in plans)
        raise WheelError(
            f"the wheels record {len(plans)} builds ({named})", hint="verify the wheels of one build at a time"
        )
    packages = [w.package for w in wheels]
    if len(set(packages)) != len(packages):
        raise WheelError(
            f"two wheels of package {next(p for p in packages if packages.count(p) > 1)} given",
            hint="give each wheel of the build once",
        )
    return wheels[0]


def plan_of(
    recorded: Recorded, *, target: str | None = None, lock: Path | None = None, jobs: int | None = None
) -> tuple[Recipe, Plan, Lock]:
    """The wheel's recipe (`target`: a recipe name or path, else the target it records, on the recipe
    path), the plan it records made again from that recipe, and the lock it is built from; refuses a
    recipe of another target, and a lock that does not hold that plan."""
    try:
        recipe = load_recipe(target or recorded.target)
    except RecipeError as error:
        raise RecipeError(
            f"{recorded.filename} was built for target {recorded.target!r}: {error.message}",
            hint="put its recipe on the recipe path (gpuwheel --recipes DIR verify …, or "
            "GPUWHEEL_RECIPES), or name it: --target RECIPE",
        ) from None
    if recipe.target.name != recorded.target:
        raise RecipeError(
            f"{target} is the recipe of target {recipe.target.name!r}, {recorded.filename} was built "
            f"for target {recorded.target!r}",
            hint="name the recipe the wheel was built from",
        )
    if recorded.package not in {p.name for p in recipe.packages}:
        raise RecipeError(
            f"{recipe.path}: no package {recorded.package!r}, which {recorded.filename} is",
            hint="name the recipe the wheel was built from (--target RECIPE)",
        )
    whole = make_plan(recipe, jobs=jobs)
    locked = read_lock(Path(lock) if lock is not None else lock_path(whole))
    # The wheel's plan: the lock's selection of packages, or the wheel's package alone (build --only).
    for only in (locked.packages, (recorded.package,), ()):
        plan = whole if not only else make_plan(recipe, jobs=jobs, only=only)
        if plan.hash == recorded.plan_hash:
            locked.check_covers(recipe, plan, jobs=jobs)
            return recipe, plan, locked
    if locked.plan_hash == recorded.plan_hash:  # the lock is the wheel's, the recipe has changed since
        locked.check_plan(make_plan(recipe, jobs=jobs, only=locked.packages))
    raise LockError(
        f"{locked.path} locks plan {locked.plan_hash[:16]}, {recorded.filename} was built from plan "
        f"{recorded.plan_hash[:16]}; the recipe gives neither now",
        hint="verify with the lock and recipes of the commit that built the wheel (--lock LOCK, --recipes DIR)",
    )


def verify_wheels(
    wheels: Sequence[Recorded],
    *,
    target: str | None = None,
    lock: Path | None = None,
    backend: str | None = None,
    engine: str | None = None,
    jobs: int | None = None,
    offline: bool = False,
    quiet: bool = False,
) -> Verification:
    """Rebuild the wheels of one build (each `recorded_in(path)`) from their provenance and lock into the
    cache's verify/ folder, once, and compare each with its rebuild.

    backend: None is the one that built them (recorded), else auto. Raises what `gpuwheel build
    --locked` raises for the rebuild (LockError for drift, BuildError, ...).
    """

    first = one_build(wheels)
    recipe, plan, locked = plan_of(first, target=target, lock=lock, jobs=jobs)
    scratch = scratch_dir(plan)
    logger.info("rebuilding plan %s from %s into %s", plan.hash[:16], locked.path, scratch)
    built = build_plan(
        plan,
        locked,
        None,
        backend=backend or first.backend or "auto",
        engine=engine,
        recipe_engine=recipe.build.engine,
        offline=offline,
        python=None,
        base_image=None,
        allow_audit_failure=True,
        out_dir=scratch,
        quiet=quiet,
    )
    rebuilt = {w.package: w.path for w in built.finished.wheels}
    checks = []
    for wheel in wheels:
        diff = compare_wheels(wheel.path, rebuilt[wheel.package])
        report, note = (
            (None, None)
            if diff.same
            else diffoscope(wheel.path, rebuilt[wheel.package], scratch / f"{wheel.package}.{DIFFOSCOPE_REPORT}")
        )
        checks.append(WheelCheck(wheel, rebuilt[wheel.package], diff, report, note))
    return Verification(plan.target.name, plan.hash, locked.path, built.backend, scratch, tuple(checks))


def scratch_dir(plan: Plan) -> Path:
    """`<cache>/verify/<plan hash>`, emptied: where a rebuild lands, never a target's wheels folder."""
    root = cache_root() / "verify"
    scratch = root / plan.hash[:16]
    if scratch.exists() or scratch.is_symlink():
        remove_inside(root, scratch)
    scratch.mkdir(parents=True)
    return scratch


def diffoscope(first: Path, second: Path, report: Path) -> tuple[Path | None, str | None]:
    """diffoscope's text report of two wheels, where it is installed: (report, None), or (None, why not)."""
    program = shutil.which("diffoscope")
    if program is None:
        return (
            None,
            "diffoscope is not installed (pip install diffoscope, or apt-get install diffoscope): "
            "gpuwheel's own comparison is shown",
        )
    done = run(
        [program, "--text", str(report), "--no-progress", str(first), str(second)],
        log_path=report.with_suffix(".log"),
        timeout=1800,
    )
    # diffoscope exits 1 when the files differ, which they do here; 2 and above are its own failures.
    if done.returncode not in (0, 1) or not report.exists():
        return None, f"diffoscope failed (exit {done.returncode}; its output: {report.with_suffix('.log')})"
    return report, None

"""Wheel + its provenance + the lock → Verification: rebuild a finished wheel from what it records (its
target, package and plan hash) and the lock its target was built from, in a scratch folder of the
cache (never wheels/<target>/), and compare the two files (`wheeldiff.compare_wheels`).

Refused, in one line each, before anything is built: a wheel without gpuwheel.json (WheelError), one
whose target is no plain name or is not on the recipe path (RecipeError), a lock that is missing or
does not hold the plan the wheel records (LockError). docs/lock.md, "verify".
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from gpuwheel.cache import cache_root, remove_inside
from gpuwheel.errors import LockError, RecipeError, WheelError
from gpuwheel.lock import Lock, lock_path, read_lock
from gpuwheel.log import logger
from gpuwheel.plan import Plan, make_plan
from gpuwheel.recipe import Recipe, load_recipe
from gpuwheel.run import run
from gpuwheel.wheeldiff import WheelDiff, compare_wheels

# A target or package name from a wheel becomes a recipe lookup and a cache path: the recipe's own
# rule for target names (recipe.py), checked here because the wheel may come from anywhere.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_PLAN_HASH = re.compile(r"[0-9a-f]{64}")
DIFFOSCOPE_REPORT = "diffoscope.txt"


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
class Verification:
    wheel: Recorded
    lock: Path
    rebuilt: Path  # the rebuilt wheel, in the scratch folder
    backend: str
    diff: WheelDiff
    diffoscope: Path | None  # its report where it ran (a difference, and diffoscope installed)
    diffoscope_note: str | None  # why it did not run, where it did not

    @property
    def same(self) -> bool:
        return self.diff.same

    def to_json(self) -> dict[str, Any]:
        return {"wheel": str(self.wheel.path), "target": self.wheel.target, "package": self.wheel.package,
                "plan_hash": self.wheel.plan_hash, "lock": str(self.lock), "rebuilt": str(self.rebuilt),
                "backend": self.backend, "same": self.same, "diff": self.diff.to_json(),
                "diffoscope": str(self.diffoscope) if self.diffoscope else None,
                "diffoscope_note": self.diffoscope_note}


def recorded_in(path: Path) -> Recorded:
    """The target, package and plan a finished wheel records; WheelError when it records none."""
    from gpuwheel.index import PROVENANCE_FILE, read_wheel  # the wheel format's reader, used here only

    wheel = read_wheel(Path(path))
    provenance = wheel.provenance
    if provenance is None:
        raise WheelError(f"{wheel.filename}: no {wheel.dist_info}/{PROVENANCE_FILE}; gpuwheel did not finish this "
                         "wheel, so nothing says how to rebuild it", hint="verify wheels that `gpuwheel build` made")
    package = provenance.get("package") if isinstance(provenance.get("package"), Mapping) else {}
    fields = {"target": provenance.get("target"), "package.name": package.get("name"),
              "plan_hash": provenance.get("plan_hash")}
    for field, value in fields.items():
        pattern = _PLAN_HASH if field == "plan_hash" else _PLAIN_NAME
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise WheelError(f"{wheel.filename}: its {PROVENANCE_FILE} has no usable {field} ({value!r})",
                             hint="the file was edited or is not gpuwheel's; rebuild the wheel with `gpuwheel build`")
    observed = (provenance.get("toolchain") or {}).get("observed") or {}
    backend = observed.get("backend") if isinstance(observed, Mapping) else None
    return Recorded(Path(path), wheel.filename, fields["target"], fields["package.name"], fields["plan_hash"],
                    backend if backend in ("local", "container") else None)


def plan_of(recorded: Recorded, *, lock: Path | None = None, jobs: int | None = None) -> tuple[Recipe, Plan, Lock]:
    """The wheel's recipe, the plan it records made again from that recipe, and the lock it is built
    from; refuses a target not on the recipe path, and a lock that does not hold that plan."""
    try:
        recipe = load_recipe(recorded.target)
    except RecipeError as error:
        raise RecipeError(f"{recorded.filename} was built for target {recorded.target!r}: {error.message}",
                          hint="put its recipe on the recipe path: gpuwheel --recipes DIR verify …, or "
                               "GPUWHEEL_RECIPES") from None
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
    raise LockError(f"{locked.path} locks plan {locked.plan_hash[:16]}, {recorded.filename} was built from plan "
                    f"{recorded.plan_hash[:16]}; the recipe gives neither now",
                    hint="verify with the lock and recipes of the commit that built the wheel (--lock LOCK, "
                         "--recipes DIR)")


def verify_wheel(recorded: Recorded, *, lock: Path | None = None, backend: str | None = None, engine: str | None = None,
                 jobs: int | None = None, offline: bool = False, quiet: bool = False) -> Verification:
    """Rebuild the wheel (`recorded_in(path)`) from its provenance and lock into the cache's verify/ folder and compare.

    backend: None is the one that built the wheel (recorded), else auto. Raises what `gpuwheel build
    --locked` raises for the rebuild (LockError for drift, BuildError, ...).
    """
    from gpuwheel.pipeline import build_plan

    recipe, plan, locked = plan_of(recorded, lock=lock, jobs=jobs)
    scratch = scratch_dir(plan)
    chosen = backend or recorded.backend or "auto"
    logger.info("rebuilding %s from plan %s and %s into %s", recorded.filename, plan.hash[:16], locked.path, scratch)
    built = build_plan(plan, locked, None, backend=chosen, engine=engine, recipe_engine=recipe.build.engine,
                       offline=offline, python=None, base_image=None, allow_audit_failure=True, out_dir=scratch,
                       quiet=quiet)
    [rebuilt] = [w for w in built.finished.wheels if w.package == recorded.package]
    diff = compare_wheels(recorded.path, rebuilt.path)
    report, note = (None, None) if diff.same else diffoscope(recorded.path, rebuilt.path, scratch / DIFFOSCOPE_REPORT)
    return Verification(recorded, locked.path, rebuilt.path, built.backend, diff, report, note)


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
        return None, "diffoscope is not installed (pip install diffoscope, or apt-get install diffoscope): " \
                     "gpuwheel's own comparison is shown"
    done = run([program, "--text", str(report), "--no-progress", str(first), str(second)],
               log_path=report.with_suffix(".log"), timeout=1800)
    # diffoscope exits 1 when the files differ, which they do here; 2 and above are its own failures.
    if done.returncode not in (0, 1) or not report.exists():
        return None, f"diffoscope failed (exit {done.returncode}; its output: {report.with_suffix('.log')})"
    return report, None

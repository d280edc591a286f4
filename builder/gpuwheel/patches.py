"""Sources → Trees: the plan's patch series (patch_series.py reads them) applied to fetched trees.

`prepare_trees` copies the fetched trees into a work directory and applies the series there;
`check_patches` does the same in throw-away trees and reports every patch.
Patches are applied with GNU patch, exactly: no fuzz (every context line must match; a shifted
hunk is fine), `--forward` (never silently reverse), and a dry run first so that a patch that
fails leaves its tree untouched. GNU patch rather than `git apply` because it needs no git
repository, takes -pN, and names the failing hunk ("Hunk #2 FAILED at 120") for the error.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gpuwheel.cache import copy_tree
from gpuwheel.errors import PatchError
from gpuwheel.kinds import registry
from gpuwheel.patch_series import PatchRef
from gpuwheel.plan import PackagePlan, Plan
from gpuwheel.run import capture, last_line
from gpuwheel.sources import FetchedPackage, Sources

APPLIED, UPSTREAM, FAILED, SKIPPED = "applied", "already upstream", "failed", "skipped: dependency not fetched"
_PATCH_OPTIONS = (
    "--batch",
    "--forward",
    "--fuzz=0",
    "--no-backup-if-mismatch",
    "--reject-file=-",
    "--quoting-style=literal",
)
_FILE_LINE = re.compile(r"^(?:checking|patching) file (?P<file>.+)$")
_NOT_REGULAR = re.compile(r"^File (?P<file>.+) is not a regular file -- refusing to patch$")
_HUNK_FAILED = re.compile(r"^Hunk #(?P<hunk>\d+) FAILED at (?P<line>\d+)")
_HEADER_FILE = re.compile(r"^\|(?:---|\+\+\+) (?P<file>\S+)")


@dataclass(frozen=True)
class PatchOutcome:
    package: str
    patch: str
    tree: str  # "" = the package's own tree, else the dependency it targets
    status: str  # applied | already upstream | failed | skipped: dependency not fetched
    detail: str  # failed: file and hunk; applied: hunks that landed at an offset; else ""

    @property
    def where(self) -> str:
        return self.tree or "(package)"


@dataclass(frozen=True)
class PreparedTree:
    name: str
    version: str
    tree: Path  # the package's patched copy: what the build compiles
    deps_dir: Path  # one sub-directory per fetched dependency, patched (the plan's $GPUWHEEL_DEPS)
    applied: tuple[PatchOutcome, ...]


@dataclass(frozen=True)
class Trees:
    packages: tuple[PreparedTree, ...]

    def package(self, name: str) -> PreparedTree | None:
        return next((p for p in self.packages if p.name == name), None)


@dataclass(frozen=True)
class PatchReport:
    outcomes: tuple[PatchOutcome, ...]

    @property
    def failed(self) -> tuple[PatchOutcome, ...]:
        return tuple(o for o in self.outcomes if o.status == FAILED)

    def to_json(self) -> dict:
        return {
            "ok": not self.failed,
            "patches": [
                {"package": o.package, "patch": o.patch, "tree": o.tree or None, "status": o.status, "detail": o.detail}
                for o in self.outcomes
            ],
        }


def prepare_trees(plan: Plan, sources: Sources, workdir: Path) -> Trees:
    """Fresh copies of each fetched tree under workdir/<package>/, the series applied in order.

    A patch that does not apply raises PatchError (package, patch, file, hunk) before any build.
    """
    prepared = []
    for package, fetched in _pairs(plan, sources):
        root = workdir / package.name
        if root.exists():
            shutil.rmtree(root)
        outcomes = _patch_package(package, fetched, root, stop_on_failure=True)
        for relative, text in registry.get(package.kind).tree_files(package.version, package.env_dict).items():
            (root / "src" / relative).parent.mkdir(parents=True, exist_ok=True)
            (root / "src" / relative).write_text(text, encoding="utf-8")
        prepared.append(PreparedTree(package.name, package.version, root / "src", root / "deps", outcomes))
    return Trees(tuple(prepared))


def check_patches(plan: Plan, sources: Sources) -> PatchReport:
    """Apply every patch of the plan to throw-away trees: applied / already upstream / failed."""
    outcomes: list[PatchOutcome] = []
    for package, fetched in _pairs(plan, sources):
        if not package.patches:
            continue
        with tempfile.TemporaryDirectory(prefix="gpuwheel-patches-") as scratch:
            outcomes.extend(_patch_package(package, fetched, Path(scratch), stop_on_failure=False, touched_only=True))
    return PatchReport(tuple(outcomes))


def _pairs(plan: Plan, sources: Sources):
    for fetched in sources.packages:
        package = plan.package(fetched.name)
        if package is not None:
            yield package, fetched


def _patch_package(
    package: PackagePlan, fetched: FetchedPackage, root: Path, *, stop_on_failure: bool, touched_only: bool = False
) -> tuple[PatchOutcome, ...]:
    """Copy the package (and its fetched dependencies) to root/src and root/deps/<name>, then patch.

    For checks (touched_only), only the files the series names are copied: GNU patch reads
    nothing else, and a whole vLLM tree would cost seconds per check.
    """
    sources = {"": fetched.tree, **{d.name: d.tree for d in fetched.dependencies if d.tree is not None}}
    (root / "deps").mkdir(parents=True, exist_ok=True)
    for tree, source in sources.items():
        dest = root / "deps" / tree if tree else root / "src"
        if not touched_only:
            _copy_tree(source, dest)
            continue
        dest.mkdir(parents=True, exist_ok=True)
        for ref in (r for r in package.patches if r.tree == tree):
            for name in _named_files(ref):
                found = source / name
                if (found.is_file() or found.is_symlink()) and not (dest / name).exists():
                    (dest / name).parent.mkdir(parents=True, exist_ok=True)
                    # A link stays a link, as in the build's copy: GNU patch refuses to patch through
                    # one there, and the check must say so too, not patch the file it points at.
                    shutil.copy2(found, dest / name, follow_symlinks=False)
    outcomes = []
    for ref in package.patches:
        directory = root / "deps" / ref.tree if ref.tree else root / "src"
        if ref.tree and not directory.is_dir():
            outcomes.append(PatchOutcome(package.name, ref.name, ref.tree, SKIPPED, ""))
            continue
        outcome = _apply(package, ref, directory)
        if outcome.status == FAILED and stop_on_failure:
            target = f" to {ref.tree}" if ref.tree else ""
            raise PatchError(
                f"{package.name} {package.version}: {ref.name} does not apply{target}: {outcome.detail}; nothing built",
                hint=f"refresh the patch against {package.name} {package.version} or drop it from its series",
            )
        outcomes.append(outcome)
    return tuple(outcomes)


_DIFF_HEADER = re.compile(r"^(?:---|\+\+\+) (?P<file>[^\t\n]+)")


def _named_files(ref: PatchRef) -> set[str]:
    """The tree-relative paths a patch's ---/+++ headers name (after -pN)."""
    names = set()
    for line in ref.path.read_text(encoding="utf-8", errors="replace").splitlines():
        if (match := _DIFF_HEADER.match(line)) and match["file"].strip() != "/dev/null":
            parts = match["file"].strip().split("/")[ref.strip :]
            if parts and ".." not in parts:
                names.add("/".join(parts))
    return names


def _copy_tree(source: Path, dest: Path) -> None:
    # .git stays behind: builds get SETUPTOOLS_SCM_PRETEND_VERSION, and histories are large.
    dest.parent.mkdir(parents=True, exist_ok=True)
    copy_tree(source, dest, ignore=shutil.ignore_patterns(".git"))


def _patch(ref: PatchRef, directory: Path, *extra: str):
    if shutil.which("patch") is None:
        raise PatchError("GNU patch is not installed", hint="apt-get install patch")
    return capture(
        ["patch", *_PATCH_OPTIONS, f"-p{ref.strip}", "-d", directory, "-i", ref.path, *extra],
        env={**os.environ, "LC_ALL": "C"},
    )


def _apply(package: PackagePlan, ref: PatchRef, directory: Path) -> PatchOutcome:
    def outcome(status: str, detail: str = "") -> PatchOutcome:
        return PatchOutcome(package.name, ref.name, ref.tree, status, detail)

    trial = _patch(ref, directory, "--dry-run")
    if trial.returncode == 0:
        done = _patch(ref, directory)
        if done.returncode != 0:
            return outcome(FAILED, _failure(done.stdout + done.stderr, ref.strip))
        return outcome(APPLIED, "; ".join(_offsets(done.stdout)))
    if _patch(ref, directory, "--dry-run", "--reverse").returncode == 0:
        return outcome(UPSTREAM)
    return outcome(FAILED, _failure(trial.stdout + trial.stderr, ref.strip))


def _failure(output: str, strip: int) -> str:
    """The first failing file and hunk, from GNU patch's own words."""
    lines, current = output.splitlines(), "?"
    for number, line in enumerate(lines):
        if match := _FILE_LINE.match(line):
            current = match["file"]
        elif match := _HUNK_FAILED.match(line):
            return f"{current} hunk #{match['hunk']} FAILED at line {match['line']} (exact context, no fuzz)"
        elif line.startswith("can't find file to patch"):
            # GNU patch prints the diff header it could not place after this line.
            names = [
                m["file"] for later in lines[number:] if (m := _HEADER_FILE.match(later)) and m["file"] != "/dev/null"
            ]
            missing = "/".join(names[0].split("/")[strip:]) if names else "?"
            return f"{missing} does not exist in the tree"
        elif match := _NOT_REGULAR.match(line):
            return (
                f"{match['file']} is not a regular file (a symlink in the tree?): GNU patch refuses to patch "
                "through it; patch the file it points to"
            )
        elif line.startswith("Reversed (or previously applied) patch detected"):
            return f"{current} already holds part of this patch"
        elif "malformed patch" in line or "Only garbage" in line:
            return line.removeprefix("patch: ").strip("* ")
    return f"{current}: {last_line(lines, 'no output')}"


def _offsets(output: str) -> list[str]:
    notes, current = [], "?"
    for line in output.splitlines():
        if match := _FILE_LINE.match(line):
            current = match["file"]
        elif "succeeded at" in line and "offset" in line:
            notes.append(f"{current}: {line.strip().rstrip('.')}")
    return notes

"""Plan → Sources: fetch, verify, extract and cache every source a build needs; offline mode.

Cache layout under cache_root()/sources/ (docs/sources.md):
  archives/<sha256>/<file name>   verified downloads (sdists, URL archives)
  trees/<sha256>/                 their extracted contents
  git/<commit>/                   checkouts at that commit, submodules included
  git-refs/<key>.json             which commit a dependency's tag resolved to when it was fetched
  locks/<key>.lock                so that two fetches of one source never race
Everything is written under a `.tmp-*` name inside the cache and renamed into place only once
verified and extracted, so an interrupted or refused fetch leaves nothing behind.
"""

from __future__ import annotations

import ast
import dataclasses
import glob
import hashlib
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any
from urllib.parse import urlparse

import requests
import urllib3
from filelock import FileLock
from packaging.utils import InvalidSdistFilename, parse_sdist_filename
from pypi_simple import PYPI_SIMPLE_ENDPOINT, NoSuchProjectError, PyPISimple
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from gpuwheel.cache import cache_root, copy_tree, remove_inside, sha256_file
from gpuwheel.errors import REFUSED_WRITE, OfflineError, SourceError
from gpuwheel.kinds import registry
from gpuwheel.kinds.base import StandIn
from gpuwheel.limits import ExtractLimits, extract_limits
from gpuwheel.log import console, logger
from gpuwheel.plan import PackagePlan, Plan
from gpuwheel.recipe import Dependency, Source, target_file
from gpuwheel.redact import safe_text, safe_tree
from gpuwheel.run import capture

if sys.version_info >= (3, 12):
    import tarfile
else:  # extraction filters (data_filter, FilterError) came in 3.11.4 / 3.12; Debian 12's 3.11.2 lacks them
    from backports import tarfile

# Statuses of a fetched dependency tree.
CACHED, FETCHED, IMPORTED, NEEDS_NETWORK = "cached", "fetched", "imported", "needs network"
STAND_IN = "stand-in"  # Python files from the package's published wheel, for a dependency nothing compiles
_HEX40 = re.compile(r"[0-9a-f]{40}")
# git's words for "the remote cannot be reached" (as opposed to "it has no such commit").
_UNREACHABLE = (
    "could not resolve host",
    "unable to access",
    "failed to connect",
    "connection refused",
    "connection timed out",
    "network is unreachable",
    "could not resolve hostname",
    "operation timed out",
)
_TIMEOUT = (15, 60)  # seconds: connect, and between bytes


@dataclass(frozen=True)
class FetchedDependency:
    name: str
    git: str
    rev: str
    tree: Path | None  # None while it needs network
    commit: str | None
    status: str  # cached | fetched | imported | needs network
    fetch_command: str  # what fetches it on a connected machine, into DIR/<name> for --dependency-dir


@dataclass(frozen=True)
class FetchedPackage:
    name: str
    version: str
    kind: str  # sdist | git | url | path
    tree: Path  # the extracted tree in the cache (or the local path): never modified
    archive: Path | None
    sha256: str | None
    commit: str | None
    status: str  # cached | fetched | local
    dependencies: tuple[FetchedDependency, ...]

    def dependency(self, name: str) -> FetchedDependency | None:
        return next((d for d in self.dependencies if d.name == name), None)


@dataclass(frozen=True)
class Sources:
    target: str  # how commands name the recipe (`gpuwheel fetch <target>`)
    cache: Path
    packages: tuple[FetchedPackage, ...]

    def package(self, name: str) -> FetchedPackage | None:
        return next((p for p in self.packages if p.name == name), None)

    @property
    def needs_network(self) -> tuple[tuple[str, FetchedDependency], ...]:
        return tuple((p.name, d) for p in self.packages for d in p.dependencies if d.status == NEEDS_NETWORK)

    def require_complete(self) -> None:
        """Raise when a dependency tree is still missing (`fetch --strict`, and before a build)."""
        missing = self.needs_network
        if missing:
            names = ", ".join(f"{package}/{dep.name}" for package, dep in missing)
            raise SourceError(
                f"{len(missing)} dependencies need network: {names}",
                hint=f"clone them on a connected machine as `gpuwheel fetch {self.target}` "
                f"lists, then `gpuwheel fetch {self.target} --dependency-dir DIR`",
            )

    def to_json(self) -> dict:
        def dep(d: FetchedDependency) -> dict:
            return {
                "name": d.name,
                "git": d.git,
                "rev": d.rev,
                "commit": d.commit,
                "status": d.status,
                "tree": str(d.tree) if d.tree else None,
                "fetch_command": d.fetch_command,
            }

        return safe_tree(
            {
                "target": self.target,
                "cache": str(self.cache),
                "packages": [
                    {
                        "name": p.name,
                        "version": p.version,
                        "kind": p.kind,
                        "status": p.status,
                        "tree": str(p.tree),
                        "archive": str(p.archive) if p.archive else None,
                        "sha256": p.sha256,
                        "commit": p.commit,
                        "dependencies": [dep(d) for d in p.dependencies],
                    }
                    for p in self.packages
                ],
            }
        )


def fetch_sources(
    plan: Plan,
    *,
    offline: bool = False,
    cache: Path | None = None,
    progress: bool = True,
    dependency_dir: Path | None = None,
) -> Sources:
    """Fetch (or find in the cache) every source of the plan, verified, and its dependency trees.

    offline (or GPUWHEEL_OFFLINE=1): touch no network; a missing package source is an OfflineError.
    dependency_dir: DIR/<name>/ for each dependency, brought from a connected machine: a git checkout
    at the pinned commit, or a git mirror (bare repository) the pinned commit is checked out of —
    its submodules then from the mirrors DIR/<repository name> (see docs/sources.md). Verified
    against the pins and copied into the cache.
    Dependencies the plan lets stand in (PackagePlan.stand_ins) are made from the package's
    published wheel instead.
    A dependency that cannot be reached is reported as "needs network", not raised.
    """
    offline = offline or os.environ.get("GPUWHEEL_OFFLINE", "").lower() in ("1", "true", "yes")
    store = _Store((cache or cache_root()) / "sources", _target_ref(plan), offline, progress)
    packages = []
    for package in plan.packages:  # `--only` is the plan's: make_plan(..., only=...)
        fetched = store.package(package, plan.recipe.parent)
        dependencies = tuple(
            store.stand_in(package, dep)
            if dep.name in package.stand_ins
            else store.dependency(package, dep, dependency_dir)
            for dep in package.dependencies
        )
        packages.append(FetchedPackage(**{**fetched, "dependencies": dependencies}))
    return Sources(target=store.target, cache=store.root, packages=tuple(packages))


def _target_ref(plan: Plan) -> str:
    # The name when the name loads this very recipe (`gpuwheel fetch h100`), else its path.
    return plan.recipe.stem if target_file(plan.recipe.stem) == plan.recipe.resolve() else str(plan.recipe)


class _Store:
    """The sources cache: lookups, verified writes and fetches (one per source key, locked)."""

    def __init__(self, root: Path, target: str, offline: bool, progress: bool):
        self.root, self.target, self.offline, self.progress = root, target, offline, progress
        self._held: list[str] = []  # the lock keys this store holds, innermost last
        for sub in ("archives", "trees", "git", "git-refs", "locks", "stand-ins"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    @contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        """Hold the source's lock; what a killed run left under its temp names goes first.

        Temp names carry the key (_temp_prefix), and only the lock's holder writes under them: any
        found while holding it are leftovers of a run that died (SIGKILL, power loss), never a live
        run's work.
        """
        with FileLock(str(self.root / "locks" / f"{key}.lock")):
            prefix = _temp_prefix(key)
            # mkdtemp's random tail holds no '-': a longer key sharing this prefix is another lock's.
            leftovers = [
                *(p for p in self.root.glob(f"*/{glob.escape(prefix)}*") if "-" not in p.name[len(prefix) :]),
                *(self.root / "archives" / key).glob(".tmp-*"),
            ]  # downloads: a folder per sha256
            for leftover in leftovers:
                logger.info("removing %s, left by an interrupted run", leftover)
                remove_inside(self.root, leftover)
            self._held.append(key)
            try:
                yield
            finally:
                self._held.pop()

    def _temp_dir(self, sub: str) -> Path:
        """A temp dir in sub/ named after the innermost lock held (see _locked)."""
        return Path(tempfile.mkdtemp(prefix=_temp_prefix(self._held[-1]), dir=self.root / sub))

    # ---- packages ----------------------------------------------------------------------
    def package(self, package: PackagePlan, recipe_dir: Path) -> dict:
        source, label = package.source, f"{package.name} {package.version}"
        common = {
            "name": package.name,
            "version": package.version,
            "kind": source.kind,
            "sha256": source.sha256,
            "commit": source.commit,
        }
        if source.kind == "path":
            return {
                **common,
                **self._local(
                    Path(source.location) if Path(source.location).is_absolute() else recipe_dir / source.location,
                    source.sha256,
                    label,
                ),
            }
        if source.kind == "git":
            commit = source.commit
            assert commit is not None  # the recipe check pins every git source to a commit
            with self._locked(commit):
                tree, status = self._git_tree(source.location, commit, commit, source.submodules, label)
            return {**common, "tree": tree, "archive": None, "status": status}
        filename = source.filename
        sha256 = source.sha256
        assert sha256 is not None  # the recipe check pins every sdist and url source by sha256
        with self._locked(sha256):
            archive = self.root / "archives" / sha256 / filename
            tree_root = self.root / "trees" / sha256
            status = CACHED
            if archive.is_file():
                _verify_cached(self.root, archive, tree_root, sha256, label)
            if not (archive.is_file() and tree_root.is_dir()):
                if not archive.is_file() and self.offline:
                    raise OfflineError(
                        f"{label}: {filename} (sha256 {sha256[:12]}…) is not in the cache {self.root}",
                        hint=f"run `gpuwheel fetch {self.target}` on a connected machine and copy its {self.root} here",
                    )
                # A cached archive only needs extracting: no index query, so this works offline too.
                url = (
                    None
                    if archive.is_file()
                    else (self._sdist_url(package) if source.kind == "sdist" else source.location)
                )
                self._store_archive(url, archive, tree_root, sha256, label)
                status = CACHED if url is None else FETCHED
        return {**common, "tree": _single_top(tree_root), "archive": archive, "status": status}

    def _local(self, path: Path, sha256: str | None, label: str) -> dict:
        if path.is_dir():
            return {"tree": path.resolve(), "archive": None, "status": "local"}
        if not path.is_file():
            raise SourceError(f"{label}: local source {path} does not exist", hint="fix [package.source] path")
        if not sha256:
            raise SourceError(
                f"{label}: local archive {path} has no sha256 in the recipe",
                hint=f'add sha256 = "{sha256_file(path)}" to [package.source]',
            )
        _verify_file(path, sha256, label)
        tree_root = self.root / "trees" / sha256
        with self._locked(sha256):
            if not tree_root.is_dir():
                _extract(path, tree_root, label)
        return {"tree": _single_top(tree_root), "archive": path.resolve(), "status": "local"}

    def _sdist_url(self, package: PackagePlan) -> str:
        return self._index_url(package.source, package.name, f"{package.name} {package.version}")

    def _index_url(self, source: Source, package_name: str, label: str) -> str:
        """The URL of the file source.location on the index (the recipe's, else pip's own)."""
        index = (source.index or pip_index_url()).rstrip("/") + "/"
        try:
            project: str = parse_sdist_filename(source.location)[0]
        except InvalidSdistFilename:
            project = package_name
        try:
            with PyPISimple(index) as client:
                page = client.get_project_page(project, timeout=_TIMEOUT)
        except NoSuchProjectError:
            raise SourceError(
                f"{label}: index {index} has no project '{project}'",
                hint="set [package.source] index, or PIP_INDEX_URL / pip's index-url",
            ) from None
        except requests.RequestException as error:
            raise SourceError(
                f"{label}: cannot read index {index}: {_reason(error)}",
                hint=f"check the index, or fetch on a connected machine: gpuwheel fetch {self.target}",
            ) from None
        for dist in page.packages:
            if dist.filename == source.location:
                listed = dist.digests.get("sha256")
                if listed and listed != source.sha256:
                    raise SourceError(
                        f"{label}: index {index} lists {dist.filename} with sha256 {listed}, the "
                        f"recipe pins {source.sha256}; refused",
                        hint="check which one is right",
                    )
                return dist.url
        versions = sorted({d.version for d in page.packages if d.package_type == "sdist" and d.version})
        raise SourceError(
            f"{label}: index {index} has no file {source.location}",
            hint=f"sdists there: {', '.join(versions[-8:]) or 'none'}",
        )

    def _store_archive(self, url: str | None, archive: Path, tree_root: Path, sha256: str, label: str) -> None:
        """Download (unless cached), verify, extract; nothing lands in the cache unless all succeed."""
        archive.parent.mkdir(parents=True, exist_ok=True)
        downloaded = None
        try:
            if not archive.is_file():
                assert url is not None  # None only when the archive was cached
                downloaded = _download(url, archive.parent, sha256, label, archive.name, self.progress)
            if not tree_root.is_dir():
                _extract(downloaded or archive, tree_root, label, archive.name)
            if downloaded:
                os.replace(downloaded, archive)
        finally:
            if downloaded and downloaded.exists():
                downloaded.unlink()
            if not archive.is_file() and not any(archive.parent.iterdir()):
                archive.parent.rmdir()

    # ---- git ---------------------------------------------------------------------------
    def _git_tree(
        self, url: str, rev: str, commit: str | None, submodules: bool | tuple[str, ...], label: str
    ) -> tuple[Path, str]:
        """The cached checkout of url at rev (pinned to commit when known), cloning it if needed."""
        if commit and (self.root / "git" / commit).is_dir():
            return self.root / "git" / commit, CACHED
        if self.offline:
            raise OfflineError(
                f"{label}: git {url} @ {rev} is not in the cache {self.root}",
                hint=f"run `gpuwheel fetch {self.target}` on a connected machine and copy its {self.root} here",
            )
        work = self._temp_dir("git")
        try:
            head = _checkout(work, url, rev, submodules, label)
            if commit and head != commit:
                raise SourceError(
                    f"{label}: {url} @ {rev} checked out {head}, the recipe pins {commit}; refused",
                    hint="pin the commit the tag points to, or fix the URL",
                )
            final = self.root / "git" / head
            if final.is_dir():
                return final, CACHED
            os.replace(work, final)
            return final, FETCHED
        finally:
            if work.exists():
                shutil.rmtree(work)

    # ---- dependencies ------------------------------------------------------------------
    def dependency(self, package: PackagePlan, dep: Dependency, dependency_dir: Path | None) -> FetchedDependency:
        label = f"{package.name} {package.version} dependency {dep.name}"
        refs = self.root / "git-refs" / f"{hashlib.sha256(f'{dep.git}@{dep.rev}'.encode()).hexdigest()[:24]}.json"
        known = dep.pinned_commit or _read_ref(refs)
        command = _clone_command(dep)
        found = {"name": dep.name, "git": dep.git, "rev": dep.rev, "fetch_command": command}
        with self._locked(f"{dep.name}-{hashlib.sha256(dep.git.encode()).hexdigest()[:12]}"):
            if known and (self.root / "git" / known).is_dir():
                return FetchedDependency(**found, tree=self.root / "git" / known, commit=known, status=CACHED)
            if dependency_dir is not None and (dependency_dir / dep.name).is_dir():
                tree = self._import(dependency_dir / dep.name, dep, label, dependency_dir)
                _write_ref(refs, dep, tree.name, self._held[-1])
                return FetchedDependency(**found, tree=tree, commit=tree.name, status=IMPORTED)
            if self.offline:
                return FetchedDependency(**found, tree=None, commit=known, status=NEEDS_NETWORK)
            try:
                tree, status = self._git_tree(dep.git, dep.rev, dep.commit, dep.submodules, label)
            except _Unreachable as error:
                logger.info("%s: %s", label, error)
                return FetchedDependency(**found, tree=None, commit=known, status=NEEDS_NETWORK)
            _write_ref(refs, dep, tree.name, self._held[-1])
        return FetchedDependency(**found, tree=tree, commit=tree.name, status=status)

    def _import(self, source: Path, dep: Dependency, label: str, mirrors: Path) -> Path:
        """Copy a checkout brought from a connected machine into the cache, once verified; or check
        the pinned commit out of a mirror."""
        if _is_bare_repository(source):
            return self._import_mirror(source, dep, label, mirrors)
        if not (source / ".git").exists():
            raise SourceError(
                f"{label}: {source} is not a git checkout, so its commit cannot be verified",
                hint=f"bring it as: {_clone_command(dep)}",
            )
        head = _git(["rev-parse", "HEAD"], source, label).stdout.strip()
        pinned = _git(
            ["rev-parse", "--verify", "--quiet", "--end-of-options", f"{dep.commit or dep.rev}^{{commit}}"],
            source,
            label,
            check=False,
        ).stdout.strip()
        if not pinned:
            raise SourceError(
                f"{label}: {source} has no {dep.commit or dep.rev}; refused", hint=f"bring it as: {_clone_command(dep)}"
            )
        if head != pinned:
            raise SourceError(
                f"{label}: {source} is at {head[:12]}, {dep.rev} is {pinned[:12]}; refused",
                hint=f"git -C {shlex.quote(str(source))} checkout {shlex.quote(dep.rev)}",
            )
        changes = _git(["status", "--porcelain", "--ignore-submodules=none"], source, label).stdout.strip()
        if changes:
            first = changes.splitlines()[0].strip()
            raise SourceError(
                f"{label}: {source} has local changes ({first}); refused",
                hint="import a clean checkout: patches are gpuwheel's to apply",
            )
        if dep.submodules and (source / ".gitmodules").is_file():
            paths = list(dep.submodules) if isinstance(dep.submodules, tuple) else []
            stale = [
                line
                for line in _git(
                    ["submodule", "status", "--recursive", "--", *paths], source, label
                ).stdout.splitlines()
                if line[:1] in ("-", "+", "U")
            ]
            if stale:
                raise SourceError(
                    f"{label}: {source} submodule {stale[0].split()[1]} is not at its pinned commit",
                    hint=f"git -C {shlex.quote(str(source))} submodule update --init --recursive",
                )
        final = self.root / "git" / head
        if not final.is_dir():
            work = self._temp_dir("git")
            try:
                copy_tree(source, work / "tree")
                os.replace(work / "tree", final)
            finally:
                shutil.rmtree(work)
        return final

    def _import_mirror(self, mirror: Path, dep: Dependency, label: str, mirrors: Path) -> Path:
        """Check the pinned commit (and the submodules the recipe names) out of git mirrors."""
        work = self._temp_dir("git")
        try:
            tree = work / "tree"
            head = _checkout_mirror(mirror, tree, dep.commit or dep.rev, dep.exclude, label)
            if dep.commit and head != dep.commit:
                raise SourceError(
                    f"{label}: {mirror} resolves {dep.rev} to {head[:12]}, the recipe pins {dep.commit[:12]}; refused",
                    hint="check the mirror against the pin",
                )
            for path, url, commit in _submodules(tree, dep.submodules, label):
                found = _find_mirror(mirrors, url)
                if found is None:
                    raise SourceError(
                        f"{label}: submodule {path} needs {url} at {commit[:12]}, and {mirrors} holds no mirror of it",
                        hint=f"add a mirror of it as {mirrors}/"
                        f"{_repository_name(url)}, or leave {path} out of the dependency's "
                        f"submodules if no build reads it",
                    )
                _checkout_mirror(found, tree / path, commit, dep.exclude, f"{label} submodule {path}")
            final = self.root / "git" / head
            if not final.is_dir():
                os.replace(tree, final)
            return final
        finally:
            shutil.rmtree(work, ignore_errors=True)

    # ---- stand-ins ---------------------------------------------------------------------
    def stand_in(self, package: PackagePlan, dep: Dependency) -> FetchedDependency:
        """A tree of the files the package's build installs from `dep`, taken from its published wheel
        (sha256-pinned): for a dependency the recipe's archs never compile (the kind's layout)."""
        layout = registry.get(package.kind).stand_in_layout(package.version, dep.name)
        wheel = package.stand_in
        # The kind names a dependency a stand-in only where it has a layout and the recipe a stand_in wheel.
        assert layout is not None and wheel is not None and wheel.sha256 is not None
        label = f"{package.name} {package.version} dependency {dep.name}"
        key = hashlib.sha256(json.dumps([wheel.sha256, dep.name, dataclasses.astuple(layout)]).encode()).hexdigest()
        final = self.root / "stand-ins" / key[:24]
        found: dict[str, Any] = {"name": dep.name, "git": dep.git, "rev": dep.rev, "commit": None, "fetch_command": ""}
        with self._locked(f"stand-in-{key[:24]}"):
            if final.is_dir():
                return FetchedDependency(**found, tree=final, status=STAND_IN)
            archive = self._wheel(wheel, package.name, label)
            work = self._temp_dir("stand-ins")
            try:
                _write_stand_in(archive, layout, work / "tree", label)
                os.replace(work / "tree", final)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        return FetchedDependency(**found, tree=final, status=STAND_IN)

    def _wheel(self, source: Source, package_name: str, label: str) -> Path:
        """The published wheel, verified, in archives/ (downloaded once, under its sha256's lock)."""
        assert source.sha256 is not None  # the recipe check requires a stand_in's sha256
        with self._locked(source.sha256):
            return self._wheel_locked(source, source.sha256, package_name, label)

    def _wheel_locked(self, source: Source, sha256: str, package_name: str, label: str) -> Path:
        """The published wheel, verified, in archives/ (downloaded once)."""
        archive = self.root / "archives" / sha256 / source.location
        if archive.is_file():
            _verify_file(archive, sha256, label)
            return archive
        if self.offline:
            raise OfflineError(
                f"{label}: its stand-in needs {source.location} (sha256 {sha256[:12]}…), "
                f"which is not in the cache {self.root}",
                hint=f"run `gpuwheel fetch {self.target}` on a connected machine and copy its {self.root} here",
            )
        archive.parent.mkdir(parents=True, exist_ok=True)
        url = self._index_url(source, package_name, label)
        downloaded = _download(url, archive.parent, sha256, label, archive.name, self.progress)
        os.replace(downloaded, archive)
        return archive


# ---- index configuration --------------------------------------------------------------------
def pip_index_url() -> str:
    """The index pip itself would use: PIP_INDEX_URL, else pip.conf's index-url, else pip's default."""
    result = capture([sys.executable, "-m", "pip", "config", "list"])
    values = {}
    for line in result.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            try:
                values[key.strip()] = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError):
                values[key.strip()] = value.strip()
    # The environment beats the [install] section, which beats [global] (pip's own order).
    for key in (":env:.index-url", "install.index-url", "download.index-url", "global.index-url"):
        if values.get(key):
            return str(values[key]).split()[0]
    return PYPI_SIMPLE_ENDPOINT  # pip's own default when nothing is configured


# ---- downloads ------------------------------------------------------------------------------
def _download(url: str, directory: Path, sha256: str, label: str, name: str, progress: bool) -> Path:
    """Stream url into a temp file in directory, hashing as it goes; returned only if it matches."""
    fd, temp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=directory)
    temp = Path(temp_name)
    digest, received = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out, requests.get(url, stream=True, timeout=_TIMEOUT) as response:
            if response.status_code != 200:
                raise SourceError(f"{label}: {url} answered HTTP {response.status_code} {response.reason}")
            total = int(response.headers.get("Content-Length") or 0) or None
            with _meter(name, total, progress) as advance:
                # Raw bytes: a server's Content-Encoding must not change what is hashed.
                for chunk in response.raw.stream(1 << 20, decode_content=False):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    advance(len(chunk))
            if total is not None and received != total:
                raise SourceError(
                    f"{label}: download of {url} stopped after {received} of {total} bytes; kept nothing",
                    hint="run the fetch again",
                )
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as error:
        temp.unlink(missing_ok=True)
        raise SourceError(
            f"{label}: download of {url} failed after {received} bytes ({_reason(error)}); kept nothing",
            hint="run the fetch again",
        ) from None
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    if digest.hexdigest() != sha256:
        temp.unlink()
        raise SourceError(
            f"{label}: {name} from {url} has sha256 {digest.hexdigest()}, the recipe pins "
            f"{sha256}; refused and kept nothing",
            hint="the file changed upstream or the pin is wrong: check before updating sha256",
        )
    return temp


@contextmanager
def _meter(name: str, total: int | None, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A rich bar (bytes, rate) on a terminal; one plain line with size and rate elsewhere."""
    start = time.monotonic()
    count = [0]
    if enabled and console.is_terminal:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console) as bar:
            task = bar.add_task(name, total=total)
            yield lambda n: bar.advance(task, n)
        return

    def advance(n: int) -> None:
        count[0] += n

    yield advance
    if enabled:
        seconds = max(time.monotonic() - start, 1e-6)
        console.print(
            f"downloaded {name}: {count[0] / 1e6:.1f} MB in {seconds:.1f} s ({count[0] / 1e6 / seconds:.1f} MB/s)",
            markup=False,
            highlight=False,
        )


def _verify_file(path: Path, sha256: str, label: str) -> None:
    actual = sha256_file(path)
    if actual != sha256:
        raise SourceError(
            f"{label}: {path} has sha256 {actual}, the recipe pins {sha256}; refused",
            hint="check which one is right before changing the pin",
        )


def _verify_cached(root: Path, archive: Path, tree_root: Path, sha256: str, label: str) -> None:
    """A cached archive is hashed again on each use: one altered in the cache is removed, tree and all."""
    actual = sha256_file(archive)
    if actual != sha256:
        remove_inside(root / "archives", archive.parent)
        remove_inside(root / "trees", tree_root)
        raise SourceError(
            f"{label}: cached {archive.name} was altered (sha256 {actual[:12]}…, pinned "
            f"{sha256[:12]}…); removed it and its tree",
            hint="run the fetch again",
        )


def _temp_prefix(key: str) -> str:
    """The name of a temp file or dir written under the lock `key`: the next holder of that lock
    knows it as a leftover (see _Store._locked)."""
    return f".tmp-{key}-"


def _reason(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"[:200] if text else type(error).__name__


# ---- safe extraction --------------------------------------------------------------------------
def _extract(archive: Path, dest: Path, label: str, name: str | None = None) -> None:
    """Extract into a temp dir beside dest, refusing any unsafe member (and an archive over the
    extraction limits) before writing anything."""
    name = name or archive.name
    try:
        limits = extract_limits()
    except ValueError as error:
        raise SourceError(f"{label}: {error}", hint="unset it to use the default") from None
    work = Path(tempfile.mkdtemp(prefix=_temp_prefix(dest.name), dir=dest.parent))
    try:
        try:
            is_tar = tarfile.is_tarfile(archive)  # reads the first block: a gzip cut short raises EOFError
        except (tarfile.TarError, EOFError, OSError) as error:
            raise _extraction_failed(error, name, work, label) from None
        if is_tar:
            _extract_tar(archive, name, work, label, limits)
        elif zipfile.is_zipfile(archive):
            _extract_zip(archive, name, work, label, limits)
        else:
            raise SourceError(f"{label}: {name} is neither a tar nor a zip archive")
        os.replace(work, dest)
    finally:
        if work.exists():
            shutil.rmtree(work)


def _extraction_failed(error: BaseException, name: str, dest: Path, label: str) -> SourceError:
    if isinstance(error, OSError) and error.errno in REFUSED_WRITE:
        return SourceError(
            f"{label}: extracting {name} into {dest.parent} failed: {error.strerror}; kept nothing",
            hint="free space there, or set GPUWHEEL_CACHE to a writable disk with room",
        )
    return SourceError(f"{label}: {name} is a damaged archive ({_reason(error)})")


def _check_size(members: int, total: int, name: str, label: str, limits: ExtractLimits) -> None:
    """Refuse what would expand past the limits (a sparse or bomb archive), before writing a byte."""
    if members > limits.members:
        raise SourceError(
            f"{label}: {name} holds more than {limits.members:,} members; refused, nothing extracted",
            hint=f"if the archive is trusted, raise {limits.members_variable}",
        )
    if total > limits.bytes:
        raise SourceError(
            f"{label}: {name} expands to {total:,} bytes, over the limit of {limits.bytes:,}; "
            f"refused, nothing extracted",
            hint=f"if the archive is trusted, raise {limits.bytes_variable}",
        )


def _extract_tar(archive: Path, name: str, dest: Path, label: str, limits: ExtractLimits) -> None:
    try:
        with tarfile.open(archive) as tar:
            members, total = [], 0
            for member in tar:  # read one at a time: a bomb of headers is refused before all are listed
                members.append(member)
                total += member.size if member.isreg() else 0
                _check_size(len(members), total, name, label, limits)
                # The `data` filter would strip a leading "/" and extract anyway: refuse instead.
                for path in (member.name, member.linkname if member.islnk() else ""):
                    if path.startswith(("/", "\\")) or PureWindowsPath(path).drive:
                        raise SourceError(
                            f"{label}: {name} holds an unsafe member: {member.name!r} names the "
                            f"absolute path {path!r}; refused, nothing extracted"
                        )
                try:
                    # The `data` filter refuses `..`, links leaving the tree and device files.
                    tarfile.data_filter(member, str(dest))
                except tarfile.FilterError as error:
                    raise SourceError(
                        f"{label}: {name} holds an unsafe member: {error}; refused, nothing extracted"
                    ) from None
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError) as error:
        raise _extraction_failed(error, name, dest, label) from None


def _extract_zip(archive: Path, archive_name: str, dest: Path, label: str, limits: ExtractLimits) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            # zipfile never writes more than a member's recorded size (and checks its CRC).
            _check_size(len(infos), sum(info.file_size for info in infos), archive_name, label, limits)
            for info in infos:
                name, mode = info.filename, info.external_attr >> 16
                parts = PurePosixPath(name).parts
                why = (
                    "is an absolute path"
                    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive
                    else "leaves the tree (..)"
                    if ".." in parts or ".." in PureWindowsPath(name).parts
                    else "is a symlink"
                    if stat.S_ISLNK(mode)
                    else "is a special file"
                    if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))
                    else None
                )
                if why:
                    raise SourceError(
                        f"{label}: {archive_name} holds an unsafe member: {name!r} {why}; refused, nothing extracted"
                    )
            zf.extractall(dest)
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        raise _extraction_failed(error, archive_name, dest, label) from None


def _single_top(root: Path) -> Path:
    """An sdist holds one top directory (name-version/): that is the tree."""
    entries = list(root.iterdir())
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else root


# ---- git -----------------------------------------------------------------------------------------
class _Unreachable(SourceError):
    """The git remote cannot be reached from here (no network, or no route to that host)."""


def _git(
    args: list[str], cwd: Path, label: str, *, check: bool = True, allow_file: bool = False, timeout: float = 3600
):
    # file:// submodules are refused by default since git 2.38.1 (CVE-2022-39253); allowed only
    # when the superproject itself is local, where the same files are trusted anyway.
    argv = [
        "git",
        "-c",
        "advice.detachedHead=false",
        *(["-c", "protocol.file.allow=always"] if allow_file else []),
        *args,
    ]
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}
    try:
        result = capture(argv, cwd=cwd, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SourceError(
            f"{label}: git {args[0]} gave no result in {timeout:.0f} s; kept nothing",
            hint="check the network, or bring the tree with --dependency-dir",
        ) from None
    if check and result.returncode != 0:
        message = next(
            (line for line in result.stderr.splitlines() if line.startswith(("fatal:", "error:"))),
            result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "no output",
        )
        kind = _Unreachable if any(word in result.stderr.lower() for word in _UNREACHABLE) else SourceError
        raise kind(f"{label}: git {args[0]} failed: {message}")
    return result


def _checkout(work: Path, url: str, rev: str, submodules: bool | tuple[str, ...], label: str) -> str:
    """Check url at rev out into work (with submodules at their recorded commits); returns HEAD."""
    local = urlparse(url).scheme in ("", "file")
    _git(["init", "-q"], work, label)
    # The recipe refuses revs and URLs that look like options; `--`/--end-of-options make sure of it
    # (a rev of `--upload-pack=CMD` would otherwise run CMD).
    _git(["remote", "add", "--", "origin", url], work, label)
    # A shallow fetch of just the pinned rev; servers that refuse a bare commit get a full fetch.
    shallow = _git(
        ["fetch", "-q", "--depth", "1", "--end-of-options", "origin", rev], work, label, check=False, allow_file=local
    )
    if shallow.returncode == 0:
        _git(["checkout", "-q", "--detach", "FETCH_HEAD"], work, label)
    else:
        if any(word in shallow.stderr.lower() for word in _UNREACHABLE):
            raise _Unreachable(f"{label}: {url} cannot be reached: {shallow.stderr.strip().splitlines()[-1]}")
        _git(["fetch", "-q", "--tags", "origin", "+refs/heads/*:refs/remotes/origin/*"], work, label, allow_file=local)
        found = _git(
            ["rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}"], work, label, check=False
        )
        if found.returncode != 0:
            raise SourceError(f"{label}: {url} has no commit or tag {rev}", hint="check the pin against the repository")
        _git(["checkout", "-q", "--detach", found.stdout.strip()], work, label)
    head = _git(["rev-parse", "HEAD"], work, label).stdout.strip()
    if _HEX40.fullmatch(rev) and head != rev:
        raise SourceError(f"{label}: {url} checked out {head}, not the pinned {rev}; refused")
    if submodules and (work / ".gitmodules").is_file():
        _git(["submodule", "update", "--init", "--recursive", "-q"], work, label, allow_file=local)
    return head


def _clone_command(dep: Dependency) -> str:
    """What to run on a connected machine; every recipe value quoted, as it is pasted into a shell.
    Credentials in the URL are masked: that machine brings its own."""
    where = shlex.quote(f"deps/{dep.name}")
    steps = [
        f"git clone {shlex.quote(safe_text(dep.git))} {where}",
        f"git -C {where} checkout {shlex.quote(dep.commit or dep.rev)}",
    ]
    if dep.submodules:
        steps.append(f"git -C {where} submodule update --init --recursive")
    return " && ".join(steps)


def _read_ref(path: Path) -> str | None:
    try:
        return json.loads(path.read_text())["commit"]
    except (OSError, ValueError, KeyError):
        return None


def _write_ref(path: Path, dep: Dependency, commit: str, key: str) -> None:
    fd, temp = tempfile.mkstemp(prefix=_temp_prefix(key), dir=path.parent)
    with os.fdopen(fd, "w") as out:
        json.dump({"git": dep.git, "rev": dep.rev, "commit": commit}, out)
    os.replace(temp, path)


# ---- mirrors ---------------------------------------------------------------------------------------
def _is_bare_repository(path: Path) -> bool:
    return (path / "HEAD").is_file() and (path / "objects").is_dir() and not (path / ".git").exists()


def _repository_name(url: str) -> str:
    """'https://github.com/NVIDIA/cutlass.git' → 'cutlass': how a mirror directory is named."""
    return PurePosixPath(urlparse(url).path.rstrip("/")).name.removesuffix(".git").lower()


def _find_mirror(mirrors: Path, url: str) -> Path | None:
    wanted = _repository_name(url)
    for entry in sorted(mirrors.iterdir()):
        if entry.name.lower().removesuffix(".git") == wanted and entry.is_dir():
            return entry
    return None


def _checkout_mirror(mirror: Path, dest: Path, rev: str, exclude: tuple[str, ...], label: str) -> str:
    """A local clone of `mirror` at `rev` in dest, without the paths `exclude` names; returns HEAD.

    A partial mirror may lack the content of files no build reads (images, papers): a sparse
    checkout leaves them out, so only what the build reads must be there. Git checks every object
    it writes out against its id, so the tree is the pinned one byte for byte.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        dest.rmdir()  # a submodule's empty placeholder directory
    _git(["clone", "-q", "--no-checkout", "--", str(mirror), str(dest)], dest.parent, label)
    if exclude:
        _git(["config", "core.sparseCheckout", "true"], dest, label)
        (dest / ".git" / "info").mkdir(exist_ok=True)
        (dest / ".git" / "info" / "sparse-checkout").write_text(
            "/*\n" + "".join(f"!{path}\n" for path in exclude), encoding="utf-8"
        )
    commit = _git(
        ["rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}"], dest, label, check=False
    ).stdout.strip()
    if not commit:
        raise SourceError(
            f"{label}: the mirror {mirror} has no {rev}; refused",
            hint="update the mirror (git fetch) on a connected machine",
        )
    done = _git(["checkout", "-q", "--detach", commit], dest, label, check=False)
    # git exits 0 even when it could not write a file whose object the mirror lacks: it says so
    # ("unable to read sha1 file of PATH"), and the file then shows as deleted.
    missing = re.search(r"^error: unable to read sha1 file of (\S+)", done.stderr, re.MULTILINE)
    changed = _git(["status", "--porcelain"], dest, label, check=False).stdout.splitlines()
    if done.returncode != 0 or missing or changed:
        what = missing[1] if missing else changed[0][3:] if changed else None
        raise SourceError(
            f"{label}: the mirror {mirror} lacks "
            + (f"the content of {what}" if what else "objects")
            + f" at {rev}: it is incomplete; refused",
            hint="bring a complete mirror, or add the path to the dependency's exclude if no build reads it",
        )
    return commit


def _submodules(tree: Path, wanted: bool | tuple[str, ...], label: str) -> list[tuple[str, str, str]]:
    """(path, url, pinned commit) of each submodule to check out: all, none, or the listed paths."""
    if not wanted or not (tree / ".gitmodules").is_file():
        if isinstance(wanted, tuple) and wanted:
            raise SourceError(f"{label}: the recipe names submodules {', '.join(wanted)}, but the tree has none")
        return []
    # git config exits 1 when nothing matches: a .gitmodules without entries.
    listed = _git(
        ["config", "-f", ".gitmodules", "--get-regexp", r"^submodule\..*\.(path|url)$"], tree, label, check=False
    ).stdout.splitlines()
    entries: dict[str, dict[str, str]] = {}
    for line in listed:
        key, _, value = line.partition(" ")
        name, _, field = key.removeprefix("submodule.").rpartition(".")
        entries.setdefault(name, {})[field] = value
    by_path = {e["path"]: e.get("url", "") for e in entries.values() if "path" in e}
    paths = list(wanted) if isinstance(wanted, tuple) else sorted(by_path)
    out = []
    for path in paths:
        if path not in by_path:
            raise SourceError(
                f"{label}: the recipe names submodule {path}, which .gitmodules does not list",
                hint=f"submodules there: {', '.join(sorted(by_path)) or 'none'}",
            )
        pinned = _git(["ls-tree", "HEAD", "--", path], tree, label).stdout.split()
        if len(pinned) < 3 or pinned[1] != "commit":
            raise SourceError(f"{label}: {path} is not a submodule at the pinned commit")
        out.append((path, by_path[path], pinned[2]))
    return out


def _write_stand_in(wheel: Path, layout: StandIn, dest: Path, label: str) -> None:
    """Write the wheel's files under layout.wheel_dir to dest/layout.tree_dir, undoing the text
    rewrite vLLM's CMake applies on install (and checking that redoing it gives the wheel's bytes)."""
    written = 0
    single = not layout.wheel_dir.endswith("/")  # one file, not a directory of them
    try:
        with zipfile.ZipFile(wheel) as archive:
            for info in archive.infolist():
                name = info.filename
                if info.is_dir() or not (name == layout.wheel_dir if single else name.startswith(layout.wheel_dir)):
                    continue
                if layout.suffixes and not name.endswith(layout.suffixes):
                    continue
                relative = layout.tree_dir if single else layout.tree_dir + name[len(layout.wheel_dir) :]
                if ".." in PurePosixPath(relative).parts or relative.startswith("/"):
                    raise SourceError(f"{label}: {wheel.name} holds an unsafe member {name!r}; refused")
                data = archive.read(info)
                if layout.rewrite:
                    original, installed = layout.rewrite
                    text = data.decode("utf-8")
                    restored = text.replace(installed, original)
                    if restored.replace(original, installed) != text:
                        raise SourceError(
                            f"{label}: {name} in {wheel.name} cannot be restored exactly (the "
                            f"text {original!r} occurs in it unrewritten); refused"
                        )
                    data = restored.encode("utf-8")
                target = dest / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                written += 1
    except (zipfile.BadZipFile, OSError) as error:
        raise SourceError(f"{label}: {wheel.name} is a damaged wheel ({_reason(error)})") from None
    if not written:
        raise SourceError(
            f"{label}: {wheel.name} holds no {layout.wheel_dir}: it cannot stand in for the dependency",
            hint="check [package.stand_in] wheel: vLLM's own wheel of the same release",
        )

"""Publish wheels: to a local static index that pip reads from file:// or any static web server,
or to a remote index (pypiserver, devpi, Artifactory, Nexus) through twine.

Static index layout (one per target, like PyTorch's /whl/cu128), see docs/publish.md:
    <index>/files/<wheel>              wheels, never overwritten once in place
    <index>/files/<wheel>.metadata     PEP 658 core metadata
    <index>/simple -> .simple-<digest> symlink to the current generation of pages:
        index.html, index.json         project list (PEP 503 / PEP 691)
        <project>/index.html           PEP 503 links with #sha256=, data-core-metadata (PEP 714)
        <project>/index.json           PEP 691 JSON with core-metadata
    <index>/.lock                      held by every writer

A publish holds the lock while it copies wheels (temp name, fsync, rename) and writes the next
generation of pages aside, then swaps the `simple` symlink with one rename: readers see the old
index or the new one, never a mix, and a process killed at any point leaves the old one intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import io
import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Mapping, Sequence
from urllib.parse import quote, urljoin, urlsplit

import requests
from filelock import FileLock, Timeout
from packaging.metadata import parse_email
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from gpuwheel.audit.report import escapes_root
from gpuwheel.cache import sha256_file
from gpuwheel.errors import PublishError, WheelError
from gpuwheel.gate import PublishGate, check_gate
from gpuwheel.limits import irregular_file
from gpuwheel.log import logger
from gpuwheel.redact import has_password, safe_text

# PEP 629/700: 1.1 adds versions and size to the JSON pages.
API_VERSION = "1.1"
JSON_TYPE = "application/vnd.pypi.simple.v1+json"
PROVENANCE_FILE = "gpuwheel.json"

_CHUNK = 1 << 20


@dataclass(frozen=True)
class TargetPaths:
    """Where a target's wheels live: built wheels in staging/, the published index beside them."""

    index_dir: Path  # wheels/<target>/: files/, simple/
    staging_dir: Path  # wheels/<target>/staging/: what the build stage wrote

    @property
    def smoke_report(self) -> Path:
        return self.staging_dir / "smoke.json"

    @property
    def simple_dir(self) -> Path:
        return self.index_dir / "simple"

    @property
    def index_url(self) -> str:
        return _file_uri(self.simple_dir)


def target_paths(target: str, root: Path = Path("wheels")) -> TargetPaths:
    """The one definition of where a target's staging wheels, smoke report and index live."""
    return TargetPaths(index_dir=root / target, staging_dir=root / target / "staging")


def _file_uri(path: Path) -> str:
    # absolute but not resolved: the `simple` symlink must stay in the URL so pip follows swaps
    return Path(os.path.abspath(path)).as_uri()


@dataclass(frozen=True)
class WheelFile:
    """A wheel read and checked once: its identity, hash, core metadata and gpuwheel record."""

    path: Path
    filename: str
    project: str  # canonical (PEP 503 normalized) name
    display_name: str  # the Name field of its metadata
    version: str
    sha256: str
    size: int
    metadata: bytes = field(repr=False)  # the .dist-info/METADATA bytes, served as PEP 658 .metadata
    requires_python: str | None
    dist_info: str  # "<name>-<version>.dist-info"
    provenance: Mapping[str, Any] | None = field(repr=False)  # gpuwheel.json, None when absent


def read_wheel(path: Path) -> WheelFile:
    """Open a wheel, check that its name and metadata agree, and hash it."""
    path = Path(path)
    try:
        name, version, _, _ = parse_wheel_filename(path.name)
    except InvalidWheelFilename as error:
        raise WheelError(f"{path}: not a wheel file name ({error})") from None
    _require_regular(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            # pip refuses such a wheel on install; an index must not serve it, --force or not.
            if unsafe := sorted(n for n in names if escapes_root(n)):
                raise WheelError(f"{path}: member {unsafe[0]!r} would land outside the install root (path "
                                 "traversal); refused", hint="rebuild the wheel; no wheel may hold such a member")
            dist_infos = sorted({n.split("/", 1)[0] for n in names
                                 if n.split("/", 1)[0].endswith(".dist-info") and n.endswith("/METADATA")
                                 and n.count("/") == 1})
            if len(dist_infos) != 1:
                raise WheelError(f"{path}: expected one .dist-info/METADATA, found {len(dist_infos)}")
            dist_info = dist_infos[0]
            metadata = archive.read(f"{dist_info}/METADATA")
            record = f"{dist_info}/{PROVENANCE_FILE}"
            provenance_bytes = archive.read(record) if record in names else None
    except (zipfile.BadZipFile, OSError) as error:
        raise WheelError(f"{path}: cannot read the wheel ({error})") from None
    raw, _ = parse_email(metadata)
    if canonicalize_name(raw.get("name", "")) != name or version_or_none(raw.get("version")) != version:
        raise WheelError(f"{path}: METADATA says {raw.get('name')} {raw.get('version')}, "
                         f"the file name says {name} {version}")
    provenance = None
    if provenance_bytes is not None:
        try:
            provenance = json.loads(provenance_bytes)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise WheelError(f"{path}: {record} is not valid JSON ({error})") from None
        if not isinstance(provenance, dict):
            raise WheelError(f"{path}: {record} is not a JSON object")
    sha256 = sha256_file(path)
    return WheelFile(path=path, filename=path.name, project=name, display_name=raw["name"],
                     version=str(version), sha256=sha256, size=path.stat().st_size,
                     metadata=metadata, requires_python=raw.get("requires_python"),
                     dist_info=dist_info, provenance=provenance)


def version_or_none(text: str | None) -> Version | None:
    """A METADATA Version field parsed, or None when it is missing or no PEP 440 version."""
    try:
        return Version(text or "")
    except InvalidVersion:
        return None


@dataclass(frozen=True)
class PublishedWheel:
    """What happened to one wheel."""

    filename: str
    sha256: str
    action: str  # "published" | "skipped" (already there with the same sha256)
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class PublishReport:
    destination: str  # the index directory, or the repository URL (never with credentials)
    index_url: str  # what pip's --index-url takes to install from it
    wheels: tuple[PublishedWheel, ...]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def wheels_in(directory: Path) -> list[Path]:
    """The wheels of a directory, sorted; an empty directory is an error, not a silent no-op."""
    found = sorted(p for p in Path(directory).glob("*.whl") if not p.name.startswith("."))
    if not found:
        raise PublishError(f"no wheels in {directory}", hint="build the target first, or pass --wheels DIR")
    for path in found:
        _require_regular(path)
    return found


def _require_regular(path: Path) -> None:
    if why := irregular_file(path):
        raise WheelError(f"{path}: {why}; refused", hint="remove it from the wheels folder")


def _read_all(paths: Iterable[Path]) -> list[WheelFile]:
    """Read each wheel once; the same file given twice counts once, two files of one name is an error."""
    by_name: dict[str, WheelFile] = {}
    for path in paths:
        wheel = read_wheel(path)
        seen = by_name.get(wheel.filename)
        if seen and seen.sha256 != wheel.sha256:
            raise PublishError(f"two different files named {wheel.filename}: {seen.path} and {wheel.path}")
        by_name.setdefault(wheel.filename, wheel)
    return list(by_name.values())


def _gate(wheels: list[WheelFile], gate: PublishGate | None,
          scratch: Path) -> tuple[list[WheelFile], dict[str, tuple[str, ...]]]:
    """The wheels to publish and the warnings per filename. A wheel --force lets through is published
    as a copy (written in scratch) whose gpuwheel.json says what was skipped and whether it was tested on
    the target GPU; the index pages repeat that mark."""
    waivers = check_gate(wheels, gate) if gate is not None else {}
    if not waivers:
        return wheels, {}
    from gpuwheel.wheels import mark_forced

    published = []
    for wheel in wheels:
        waiver = waivers[wheel.filename]
        published.append(read_wheel(mark_forced(wheel.path, wheel.dist_info, wheel.provenance, waiver.record(),
                                                scratch)) if waiver.waived else wheel)
    return published, {name: (waiver.warning(name),) for name, waiver in waivers.items()}


def publish_target(target: str | None, *, wheels_dir: Path | None = None, repository: str | None = None,
                   index_dir: Path | None = None, smoke_report: Path | None = None, force: bool = False,
                   simple_url: str | None = None, config_file: Path | None = None,
                   wheels_root: Path = Path("wheels")) -> PublishReport:
    """The `gpuwheel publish` stage: a target's wheels (staging/ or wheels_dir), gated by their audit
    and smoke report, to the target's static index or to `repository`.

    target is a recipe name or path; without it the wheels' gpuwheel.json must name one target.
    """
    from gpuwheel.recipe import load_recipe

    if repository and has_password(repository):
        # A password on the command line is visible in ps and kept in shell history.
        raise PublishError(f"--repository {safe_text(repository)} carries a password; refused",
                           hint="give the URL without it and set TWINE_USERNAME / TWINE_PASSWORD, or store "
                                "the credentials in .pypirc or keyring")
    if target is None and wheels_dir is None:
        raise PublishError("nothing to publish: name a TARGET or pass --wheels DIR")
    if target is None:
        target = _target_named_by(wheels_in(wheels_dir))
    recipe = load_recipe(target)
    paths = target_paths(recipe.target.name, wheels_root)
    wheels_dir = Path(wheels_dir) if wheels_dir is not None else paths.staging_dir
    wheels = wheels_in(wheels_dir)
    gate = PublishGate(target=recipe.target.name, compute_capability=recipe.target.compute_capability,
                       smoke_report=Path(smoke_report) if smoke_report else wheels_dir / "smoke.json",
                       force=force)
    if repository:
        return publish_remote(wheels, repository, gate=gate, simple_url=simple_url, config_file=config_file)
    return publish_local(wheels, Path(index_dir) if index_dir else paths.index_dir, gate=gate)


def _provenance_of(path: Path) -> dict[str, Any] | None:
    """A wheel's gpuwheel.json, read without hashing the wheel; None when it has none readable."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = [n for n in archive.namelist()
                       if n.count("/") == 1 and n.endswith(f".dist-info/{PROVENANCE_FILE}")]
            provenance = json.loads(archive.read(records[0])) if records else None
    except (zipfile.BadZipFile, OSError, ValueError):
        return None
    return provenance if isinstance(provenance, dict) else None


def _target_named_by(wheels: Sequence[Path]) -> str:
    """The one target the wheels' gpuwheel.json records name (read without hashing the wheels)."""
    named: dict[str, list[str]] = {}
    for path in wheels:
        target = (_provenance_of(path) or {}).get("target")
        named.setdefault(str(target) if target else "", []).append(path.name)
    if "" in named:
        raise PublishError(f"{named[''][0]} names no target (no readable gpuwheel.json)",
                           hint="name the TARGET: gpuwheel publish TARGET --wheels DIR")
    if len(named) > 1:
        raise PublishError(f"the wheels name {len(named)} targets ({', '.join(sorted(named))})",
                           hint="publish one target at a time: gpuwheel publish TARGET --wheels DIR")
    return next(iter(named))


# ---------------------------------------------------------------------------------------------
# Local static index


def publish_local(wheels: Sequence[Path], index_dir: Path, *, gate: PublishGate | None = None) -> PublishReport:
    """Add wheels to the static index in index_dir and regenerate its pages atomically.

    A wheel already there with the same sha256 is left alone; one with the same file name and a
    different sha256 refuses the whole publish before anything is copied.
    """
    found = _read_all(wheels)
    # Outside the index: a scratch folder inside it would be another publish's leftover to remove.
    with tempfile.TemporaryDirectory(prefix="gpuwheel-forced-") as scratch:
        found, warnings = _gate(found, gate, Path(scratch))
        return _publish_local(found, warnings, Path(index_dir))


def _publish_local(found: list[WheelFile], warnings: Mapping[str, tuple[str, ...]], index_dir: Path) -> PublishReport:
    files_dir = index_dir / "files"
    files_dir.mkdir(parents=True, exist_ok=True)
    results = []
    with _index_lock(index_dir):
        _remove_leftovers(index_dir)
        known = _indexed_hashes(index_dir)
        to_copy = []
        for wheel in found:
            target = files_dir / wheel.filename
            if not target.exists():
                to_copy.append(wheel)
                continue
            there = _hash_of(target, known)
            if there != wheel.sha256:
                raise PublishError(
                    f"{wheel.filename} is already in {index_dir} with sha256 {there[:16]}…, "
                    f"this file has {wheel.sha256[:16]}…; a published file is never replaced",
                    hint="bump the version or the local version label and rebuild")
            logger.info("%s is already in %s with the same sha256: skipped", wheel.filename, index_dir)
            results.append(PublishedWheel(wheel.filename, wheel.sha256, "skipped",
                                          warnings.get(wheel.filename, ())))
        for wheel in to_copy:
            # metadata first: a wheel visible under its final name always has its .metadata
            _write_atomic(files_dir / f"{wheel.filename}.metadata", wheel.metadata)
            _copy_verified(wheel, files_dir)
            results.append(PublishedWheel(wheel.filename, wheel.sha256, "published",
                                          warnings.get(wheel.filename, ())))
        _regenerate(index_dir, known)
    order = {w.filename: i for i, w in enumerate(found)}
    results.sort(key=lambda r: order[r.filename])
    return PublishReport(str(index_dir), _file_uri(index_dir / "simple"), tuple(results))


def write_static_index(index_dir: Path) -> str:
    """Regenerate the pages of index_dir from the wheels in its files/; return its file:// URL.

    For building a throwaway index (the smoke stage) use publish_local(wheels, tmpdir) instead.
    """
    index_dir = Path(index_dir)
    (index_dir / "files").mkdir(parents=True, exist_ok=True)
    with _index_lock(index_dir):
        _remove_leftovers(index_dir)
        _regenerate(index_dir, _indexed_hashes(index_dir))
    return _file_uri(index_dir / "simple")


@contextlib.contextmanager
def _index_lock(index_dir: Path):
    lock = FileLock(index_dir / ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.warning("waiting for another publish to %s to finish (lock %s)", index_dir, lock.lock_file)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _remove_leftovers(index_dir: Path) -> None:
    """Under the lock every temp file and unlinked generation is from a process that died."""
    simple = index_dir / "simple"
    if simple.exists() and not simple.is_symlink():
        raise PublishError(f"{simple} is a directory gpuwheel did not make (it keeps `simple` as a symlink)",
                           hint=f"move {simple} away and publish again")
    files_dir = index_dir / "files"
    for path in files_dir.glob(".*.part"):
        logger.info("removing %s left by an interrupted publish", path)
        path.unlink(missing_ok=True)
    for path in files_dir.glob("*.metadata"):
        if not (files_dir / path.name[: -len(".metadata")]).exists():
            path.unlink(missing_ok=True)
    for path in index_dir.glob(".simple-link-*"):
        path.unlink(missing_ok=True)
    for path in index_dir.glob(".simple-tmp-*"):
        shutil.rmtree(path, ignore_errors=True)


def _indexed_hashes(index_dir: Path) -> dict[str, tuple[str, int]]:
    """filename → (sha256, size) as the current pages state them, so unchanged wheels are not re-hashed."""
    known: dict[str, tuple[str, int]] = {}
    for page in (index_dir / "simple").glob("*/index.json"):
        try:
            for entry in json.loads(page.read_text(encoding="utf-8"))["files"]:
                known[entry["filename"]] = (entry["hashes"]["sha256"], entry["size"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # an unreadable page only costs re-hashing
    return known


def _hash_of(path: Path, known: Mapping[str, tuple[str, int]]) -> str:
    # Wheels in files/ are only ever created by rename after hashing and never rewritten.
    cached = known.get(path.name)
    if cached and cached[1] == path.stat().st_size:
        return cached[0]
    return sha256_file(path)


def _part_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.part")


@contextlib.contextmanager
def _part_file(path: Path) -> Iterator[BinaryIO]:
    """A temp file beside path (the caller renames it into place), synced to disk when the block
    ends; removed if writing fails (a full disk, a signal), so no partial file stays behind."""
    tmp = _part_name(path)
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_atomic(path: Path, data: bytes) -> None:
    with _part_file(path) as handle:
        handle.write(data)
    os.replace(_part_name(path), path)


def _copy_verified(wheel: WheelFile, files_dir: Path) -> None:
    """Copy under a temp name, hashing what is written, then rename: no partial wheel is ever visible."""
    final = files_dir / wheel.filename
    digest = hashlib.sha256()
    with open(wheel.path, "rb") as source, _part_file(final) as handle:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
            handle.write(chunk)
    if digest.hexdigest() != wheel.sha256:
        _part_name(final).unlink()
        raise PublishError(f"{wheel.path} changed while it was being published; nothing was published from it")
    os.replace(_part_name(final), final)
    _fsync_dir(files_dir)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class _IndexedFile:
    filename: str
    project: str
    display_name: str
    version: str
    sha256: str
    size: int
    metadata_sha256: str
    requires_python: str | None
    forced: Mapping[str, Any] | None = None  # gpuwheel.json's `publish` record of a force-published wheel


def _indexed_file(path: Path, known: Mapping[str, tuple[str, int]]) -> _IndexedFile:
    metadata_path = path.with_name(path.name + ".metadata")
    if not metadata_path.exists():  # a wheel placed by hand, or an index from before PEP 658 files
        _write_atomic(metadata_path, read_wheel(path).metadata)
    metadata = metadata_path.read_bytes()
    raw, _ = parse_email(metadata)
    name, version, _, _ = parse_wheel_filename(path.name)
    return _IndexedFile(filename=path.name, project=name, display_name=raw.get("name", name),
                        version=str(version), sha256=_hash_of(path, known), size=path.stat().st_size,
                        metadata_sha256=hashlib.sha256(metadata).hexdigest(),
                        requires_python=raw.get("requires_python"),
                        forced=_forced_record(path))


def _forced_record(path: Path) -> Mapping[str, Any] | None:
    publish = (_provenance_of(path) or {}).get("publish")
    return publish if isinstance(publish, dict) and publish.get("forced") else None


def _regenerate(index_dir: Path, known: Mapping[str, tuple[str, int]]) -> None:
    """Write the pages for every wheel in files/ as a new generation and swap the symlink to it."""
    files_dir = index_dir / "files"
    indexed = []
    for path in sorted(files_dir.glob("*.whl")):
        if path.name.startswith("."):
            continue
        try:
            indexed.append(_indexed_file(path, known))
        except (InvalidWheelFilename, WheelError) as error:
            logger.warning("leaving %s out of the index: %s", path, error)
    pages = _render_pages(indexed)
    digest = hashlib.sha256()
    for relpath in sorted(pages):
        digest.update(relpath.encode() + b"\0" + pages[relpath] + b"\0")
    generation = f".simple-{digest.hexdigest()[:16]}"
    simple = index_dir / "simple"
    previous = os.readlink(simple) if simple.is_symlink() else None
    if previous == generation and (index_dir / generation).is_dir():
        return
    tmp = index_dir / f".simple-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for relpath, data in pages.items():
        (tmp / relpath).parent.mkdir(parents=True, exist_ok=True)
        with open(tmp / relpath, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    shutil.rmtree(index_dir / generation, ignore_errors=True)
    os.rename(tmp, index_dir / generation)
    link = index_dir / f".simple-link-{os.getpid()}"
    link.unlink(missing_ok=True)
    os.symlink(generation, link)
    os.replace(link, simple)  # the one atomic step that makes the new pages visible
    _fsync_dir(index_dir)
    # keep the generation just replaced: a reader that resolved the old link may still be reading it
    for old in index_dir.glob(".simple-*"):
        if old.name not in (generation, previous) and old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)


def _render_pages(indexed: Sequence[_IndexedFile]) -> dict[str, bytes]:
    projects: dict[str, list[_IndexedFile]] = {}
    for item in indexed:
        projects.setdefault(item.project, []).append(item)
    pages: dict[str, bytes] = {}
    for project, items in sorted(projects.items()):
        pages[f"{project}/index.html"] = _project_html(items[-1].display_name, items).encode()
        pages[f"{project}/index.json"] = _project_json(items[-1].display_name, items).encode()
    names = sorted(projects)
    links = "\n".join(f'    <a href="{quote(n)}/">{html.escape(n)}</a><br>' for n in names)
    pages["index.html"] = _html_document("Simple index", links).encode()
    pages["index.json"] = _dumps({"meta": {"api-version": API_VERSION},
                                  "projects": [{"name": n} for n in names]}).encode()
    return pages


def _html_document(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html>\n  <head>\n    <meta name="pypi:repository-version" '
            f'content="{API_VERSION}">\n    <title>{html.escape(title)}</title>\n  </head>\n'
            f"  <body>\n    <h1>{html.escape(title)}</h1>\n{body}\n  </body>\n</html>\n")


def _file_url(item: _IndexedFile) -> str:
    # relative to simple/<project>/, so the index works wherever it is copied or served
    return f"../../files/{quote(item.filename)}"


def _project_html(display_name: str, items: Sequence[_IndexedFile]) -> str:
    lines = []
    for item in items:
        attributes = f'href="{_file_url(item)}#sha256={item.sha256}"'
        if item.requires_python:
            attributes += f' data-requires-python="{html.escape(item.requires_python)}"'
        # PEP 714 names the attribute data-core-metadata; older pips read data-dist-info-metadata
        metadata = f"sha256={item.metadata_sha256}"
        attributes += f' data-core-metadata="{metadata}" data-dist-info-metadata="{metadata}"'
        if item.forced:  # installers ignore unknown data- attributes; people and scripts can read it
            attributes += f' data-gpuwheel-forced="true" data-gpuwheel-gpu-tested="{_flag(item.forced)}"'
        lines.append(f"    <a {attributes}>{html.escape(item.filename)}</a><br>")
    return _html_document(f"Links for {display_name}", "\n".join(lines))


def _project_json(display_name: str, items: Sequence[_IndexedFile]) -> str:
    files = []
    for item in items:
        entry: dict[str, Any] = {"filename": item.filename, "url": _file_url(item),
                                 "hashes": {"sha256": item.sha256}}
        if item.requires_python:
            entry["requires-python"] = item.requires_python
        metadata = {"sha256": item.metadata_sha256}
        entry.update({"core-metadata": metadata, "dist-info-metadata": metadata, "size": item.size})
        if item.forced:  # PEP 691 keeps keys with a leading underscore for the index's own use
            entry["_gpuwheel"] = {"publish": dict(item.forced)}
        files.append(entry)
    versions = sorted({i.version for i in items}, key=Version)
    return _dumps({"meta": {"api-version": API_VERSION}, "name": canonicalize_name(display_name),
                   "versions": versions, "files": files})


def _flag(forced: Mapping[str, Any]) -> str:
    return "true" if forced.get("gpu_tested") is True else "false"


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=1, sort_keys=False) + "\n"


# ---------------------------------------------------------------------------------------------
# Remote index (twine)


def publish_remote(wheels: Sequence[Path], repository: str, *, gate: PublishGate | None = None,
                   simple_url: str | None = None, config_file: Path | None = None) -> PublishReport:
    """Upload wheels with twine to `repository` (an upload URL or a .pypirc section name).

    Credentials: TWINE_USERNAME / TWINE_PASSWORD, else the .pypirc section, else keyring; never
    prompted for, never printed. Each wheel is first looked up on the index's simple page
    (simple_url, or found next to the upload URL): same sha256 → skipped, different → refused.
    """
    with tempfile.TemporaryDirectory(prefix="gpuwheel-forced-") as scratch:
        return _publish_remote(_read_all(wheels), repository, gate, simple_url, config_file, Path(scratch))


def _publish_remote(found: list[WheelFile], repository: str, gate: PublishGate | None, simple_url: str | None,
                    config_file: Path | None, scratch: Path) -> PublishReport:
    from twine.exceptions import TwineException
    from twine.package import PackageFile
    from twine.settings import Settings
    from twine.utils import DEFAULT_CONFIG_FILE

    found, warnings = _gate(found, gate, scratch)
    is_url = "://" in repository
    try:
        settings = Settings(
            repository_url=repository if is_url else None,
            repository_name=repository if not is_url else "pypi",
            config_file=str(config_file) if config_file else DEFAULT_CONFIG_FILE,
            username=os.environ.get("TWINE_USERNAME"),
            password=os.environ.get("TWINE_PASSWORD"),
            non_interactive=True,
            disable_progress_bar=True,
        )
        # twine logs keyring lookups with tracebacks; our error says what is missing in one line
        logging.getLogger("twine").setLevel(logging.ERROR)
        upload_url = settings.repository_config["repository"]  # userinfo already stripped by twine
        _ = settings.username  # resolved first, so a missing username is named as such
        secret = settings.password
        remote = settings.create_repository()
    except TwineException as error:
        raise PublishError(f"cannot use repository {_safe_url(repository)}: {_one_line(str(error))}",
                           hint="set TWINE_USERNAME and TWINE_PASSWORD, or give the repository "
                                "username and password in .pypirc, or store them in keyring") from None
    scrub = _Scrubber(secret)
    try:
        lookup = _SimpleLookup(remote.session, upload_url, simple_url, scrub)
        results: list[PublishedWheel] = []
        to_upload = []
        for wheel in found:
            there = lookup.sha256_of(wheel)
            if there is None:
                to_upload.append(wheel)
            elif there == wheel.sha256:
                logger.info("%s is already on %s with the same sha256: skipped", wheel.filename, upload_url)
                results.append(PublishedWheel(wheel.filename, wheel.sha256, "skipped",
                                              warnings.get(wheel.filename, ())))
            else:
                raise PublishError(scrub(
                    f"{wheel.filename} is already on {upload_url} with sha256 {there[:16]}…, this file "
                    f"has {wheel.sha256[:16]}…; a published file is never replaced"),
                    hint="bump the version or the local version label and rebuild")
        for done, wheel in enumerate(to_upload):
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # twine prints progress to stdout
                    response = remote.upload(PackageFile.from_filename(str(wheel.path), None))
            except (requests.RequestException, TwineException) as error:
                raise PublishError(scrub(f"uploading {wheel.filename} to {upload_url} failed: "
                                         f"{_request_failure(error)}{_so_far(done, to_upload)}")) from None
            if not 200 <= response.status_code < 300:
                raise PublishError(scrub(
                    f"{upload_url} refused {wheel.filename}: {response.status_code} {response.reason}"
                    f"{_server_reason(response)}{_so_far(done, to_upload)}"),
                    hint=_refusal_hint(response.status_code))
            results.append(PublishedWheel(wheel.filename, wheel.sha256, "published",
                                          warnings.get(wheel.filename, ())))
    finally:
        remote.close()
    order = {w.filename: i for i, w in enumerate(found)}
    results.sort(key=lambda r: order[r.filename])
    return PublishReport(upload_url, lookup.base or upload_url, tuple(results))


class _Scrubber:
    """Removes the password from any text that may reach the user (server echoes, URLs)."""

    def __init__(self, secret: str | None):
        self.secret = secret

    def __call__(self, text: str) -> str:
        # a 1-3 character "password" would mangle every message and protects nothing
        return text.replace(self.secret, "********") if self.secret and len(self.secret) >= 4 else text


def _safe_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.username or parts.password:
        return parts._replace(netloc=f"********@{parts.hostname}" + (f":{parts.port}" if parts.port else "")).geturl()
    return url


def _request_failure(error: Exception) -> str:
    """requests' messages nest urllib3's; the OS reason ("Connection refused") is what helps."""
    reason = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(error))
    if isinstance(error, requests.ConnectionError) and reason:
        return reason.group(1).strip()
    return _one_line(str(error))


def _one_line(text: str, limit: int = 240) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _so_far(done: int, to_upload: Sequence[WheelFile]) -> str:
    if not done:
        return ""
    return f" (after uploading {', '.join(w.filename for w in to_upload[:done])})"


def _refusal_hint(status: int) -> str | None:
    if status in (401, 403):
        return "check the username and password (TWINE_USERNAME / TWINE_PASSWORD, .pypirc or keyring)"
    if status in (400, 409):
        return "the index may already hold this file under another sha256, or refuse its metadata"
    return None


class _TextOf(HTMLParser):
    """The text of an error page: its <pre> (pypiserver), else its title/h1."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: dict[str, list[str]] = {}
        self.stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in self.stack:
            del self.stack[self.stack.index(tag):]

    def handle_data(self, data):
        if self.stack:
            self.parts.setdefault(self.stack[-1], []).append(data)


def _server_reason(response: requests.Response) -> str:
    text = response.text or ""
    if "html" in response.headers.get("Content-Type", "") or text.lstrip().startswith("<"):
        parser = _TextOf()
        parser.feed(text)
        for tag in ("pre", "p", "h1", "title"):
            candidate = _one_line(" ".join(parser.parts.get(tag, [])))
            if candidate and candidate not in ("None", response.reason):
                return f": {candidate}"
        return ""
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f": {_one_line(first)}" if first and first != response.reason else ""


class _Anchors(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []  # (href, text)
        self._href: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self._href = dict(attrs).get("href") or ""
            self._text = []

    def handle_data(self, data):
        if self._href is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "a" and self._href is not None:
            self.links.append((self._href, "".join(self._text).strip()))
            self._href = None


class _SimpleLookup:
    """Finds a file on a remote index's simple API: PEP 691 JSON if offered, else PEP 503 HTML."""

    def __init__(self, session: requests.Session, upload_url: str, simple_url: str | None, scrub: _Scrubber):
        self.session = session
        self.upload_url = upload_url
        self.scrub = scrub
        self.base = simple_url.rstrip("/") + "/" if simple_url else None
        self.anonymous = requests.Session()

    def _session_for(self, url: str) -> requests.Session:
        # the credentials go to the upload host only
        return self.session if urlsplit(url)[:2] == urlsplit(self.upload_url)[:2] else self.anonymous

    def _get(self, url: str) -> requests.Response:
        """GET without leaving the index: pypiserver redirects unknown projects to pypi.org."""
        origin = urlsplit(url)[:2]
        headers = {"Accept": f"{JSON_TYPE}, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.1"}
        for _ in range(5):
            try:
                response = self._session_for(url).get(url, headers=headers, allow_redirects=False, timeout=60)
            except requests.RequestException as error:
                raise PublishError(self.scrub(f"cannot read {url}: {_request_failure(error)}")) from None
            if not response.is_redirect:
                return response
            url = urljoin(url, response.headers["Location"])
            if urlsplit(url)[:2] != origin:
                response.status_code = 404  # a redirect elsewhere means: not on this index
                return response
        return response

    def _find_base(self, project: str) -> tuple[str, requests.Response]:
        """The simple root next to the upload URL: <url>/simple/ (pypiserver, Nexus, Artifactory)
        or <url>/+simple/ (devpi); the project page's response comes along."""
        root = self.upload_url.rstrip("/") + "/"
        for base in (root + "simple/", root + "+simple/"):
            page = self._get(f"{base}{project}/")
            listing = self._get(base) if page.status_code == 404 else page  # a new project: is the index there?
            if listing.status_code == 200:
                return base, page
            if listing.status_code in (401, 403):  # an index is there, and refuses us: say so, not "no index"
                raise PublishError(self.scrub(f"cannot read {listing.url}: {listing.status_code} {listing.reason}"),
                                   hint=_refusal_hint(listing.status_code))
        raise PublishError(f"found no simple index at {root}simple/ or {root}+simple/ to check for "
                           "files already there", hint="pass --simple-url with the index's simple URL")

    def sha256_of(self, wheel: WheelFile) -> str | None:
        """The sha256 of the file of that name on the index, None when it is not there."""
        if self.base is None:
            self.base, page = self._find_base(wheel.project)
        else:
            page = self._get(f"{self.base}{wheel.project}/")
        if page.status_code == 404:
            return None
        if page.status_code != 200:
            raise PublishError(self.scrub(f"cannot read {page.url}: {page.status_code} {page.reason}"),
                               hint=_refusal_hint(page.status_code))
        for filename, url, hashes in self._files(page):
            if filename == wheel.filename:
                return hashes.get("sha256") or self._download_sha256(url)
        return None

    def _files(self, page: requests.Response) -> list[tuple[str, str, dict[str, str]]]:
        if page.headers.get("Content-Type", "").startswith(JSON_TYPE):
            return [(f["filename"], urljoin(page.url, f["url"]), f.get("hashes", {}))
                    for f in page.json().get("files", [])]
        parser = _Anchors()
        parser.feed(page.text)
        files = []
        for href, text in parser.links:
            url, _, fragment = href.partition("#")
            name, _, value = fragment.partition("=")
            filename = text or url.rsplit("/", 1)[-1]
            files.append((filename, urljoin(page.url, url), {name: value} if value else {}))
        return files

    def _download_sha256(self, url: str) -> str:
        """An index that lists no sha256 (md5 only): hash the file itself."""
        digest = hashlib.sha256()
        try:
            with self._session_for(url).get(url, stream=True, timeout=60) as response:
                response.raise_for_status()
                for chunk in response.iter_content(_CHUNK):
                    digest.update(chunk)
        except requests.RequestException as error:
            raise PublishError(self.scrub(f"cannot download {url} to compare it: {_request_failure(error)}")) from None
        return digest.hexdigest()

"""A static index folder (PEP 503 HTML and PEP 691 JSON pages, PEP 658 .metadata files), written so
that a reader never sees half of a change. The publish stage adds the wheels the gate let through;
the smoke stage makes a throwaway one to install from, the way users install.

Layout (one per target, like PyTorch's /whl/cu128), see docs/publish.md:
    <index>/files/<wheel>              wheels, never overwritten once in place
    <index>/files/<wheel>.metadata     PEP 658 core metadata
    <index>/simple -> .simple-<digest> symlink to the current generation of pages:
        index.html, index.json         project list (PEP 503 / PEP 691)
        <project>/index.html           PEP 503 links with #sha256=, data-core-metadata (PEP 714)
        <project>/index.json           PEP 691 JSON with core-metadata
    <index>/.lock                      held by every writer

A writer holds the lock while it copies wheels (temp name, fsync, rename) and writes the next
generation of pages aside, then swaps the `simple` symlink with one rename: readers see the old
index or the new one, never a mix, and a process killed at any point leaves the old one intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

from filelock import FileLock, Timeout
from packaging.metadata import parse_email
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import Version

from gpuwheel.cache import sha256_file
from gpuwheel.errors import PublishError, WheelError
from gpuwheel.layout import simple_url
from gpuwheel.log import logger
from gpuwheel.provenance import PublishMark
from gpuwheel.wheelfile import WheelFile, read_provenance, read_wheel

# PEP 629/700: 1.1 adds versions and size to the JSON pages.
API_VERSION = "1.1"

_CHUNK = 1 << 20


def add_wheels(wheels: Sequence[WheelFile], index_dir: Path) -> dict[str, bool]:
    """Add wheels to the static index in index_dir and regenerate its pages atomically; return
    filename → whether it was added (False: it was there already, with the same sha256).

    A wheel already there with another sha256 refuses the whole change before anything is copied.
    """
    files_dir = index_dir / "files"
    files_dir.mkdir(parents=True, exist_ok=True)
    added: dict[str, bool] = {}
    with _index_lock(index_dir):
        _remove_leftovers(index_dir)
        known = _indexed_hashes(index_dir)
        to_copy = []
        for wheel in wheels:
            target = files_dir / wheel.filename
            if not target.exists():
                to_copy.append(wheel)
                continue
            there = _hash_of(target, known)
            if there != wheel.sha256:
                raise PublishError(
                    f"{wheel.filename} is already in {index_dir} with sha256 {there[:16]}…, "
                    f"this file has {wheel.sha256[:16]}…; a published file is never replaced",
                    hint="bump the version or the local version label and rebuild",
                )
            logger.info("%s is already in %s with the same sha256: skipped", wheel.filename, index_dir)
            added[wheel.filename] = False
        for wheel in to_copy:
            # metadata first: a wheel visible under its final name always has its .metadata
            _write_atomic(files_dir / f"{wheel.filename}.metadata", wheel.metadata)
            _copy_verified(wheel, files_dir)
            added[wheel.filename] = True
        _regenerate(index_dir, known)
    return added


def write_static_index(index_dir: Path) -> str:
    """Regenerate the pages of index_dir from the wheels in its files/; return its file:// URL."""
    index_dir = Path(index_dir)
    (index_dir / "files").mkdir(parents=True, exist_ok=True)
    with _index_lock(index_dir):
        _remove_leftovers(index_dir)
        _regenerate(index_dir, _indexed_hashes(index_dir))
    return simple_url(index_dir)


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
        raise PublishError(
            f"{simple} is a directory gpuwheel did not make (it keeps `simple` as a symlink)",
            hint=f"move {simple} away and publish again",
        )
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
    forced: PublishMark | None = None  # gpuwheel.json's `publish` mark of a force-published wheel


def _indexed_file(path: Path, known: Mapping[str, tuple[str, int]]) -> _IndexedFile:
    metadata_path = path.with_name(path.name + ".metadata")
    if not metadata_path.exists():  # a wheel placed by hand, or an index from before PEP 658 files
        _write_atomic(metadata_path, read_wheel(path).metadata)
    metadata = metadata_path.read_bytes()
    raw, _ = parse_email(metadata)
    name, version, _, _ = parse_wheel_filename(path.name)
    return _IndexedFile(
        filename=path.name,
        project=name,
        display_name=raw.get("name", name),
        version=str(version),
        sha256=_hash_of(path, known),
        size=path.stat().st_size,
        metadata_sha256=hashlib.sha256(metadata).hexdigest(),
        requires_python=raw.get("requires_python"),
        forced=_forced_record(path),
    )


def _forced_record(path: Path) -> PublishMark | None:
    provenance = read_provenance(path)
    mark = provenance.publish if provenance else None
    return mark if mark is not None and mark.forced else None


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
    pages["index.json"] = _dumps(
        {"meta": {"api-version": API_VERSION}, "projects": [{"name": n} for n in names]}
    ).encode()
    return pages


def _html_document(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html>\n<html>\n  <head>\n    <meta name="pypi:repository-version" '
        f'content="{API_VERSION}">\n    <title>{html.escape(title)}</title>\n  </head>\n'
        f"  <body>\n    <h1>{html.escape(title)}</h1>\n{body}\n  </body>\n</html>\n"
    )


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
            tested = "true" if item.forced.gpu_tested else "false"
            attributes += f' data-gpuwheel-forced="true" data-gpuwheel-gpu-tested="{tested}"'
        lines.append(f"    <a {attributes}>{html.escape(item.filename)}</a><br>")
    return _html_document(f"Links for {display_name}", "\n".join(lines))


def _project_json(display_name: str, items: Sequence[_IndexedFile]) -> str:
    files = []
    for item in items:
        entry: dict[str, Any] = {"filename": item.filename, "url": _file_url(item), "hashes": {"sha256": item.sha256}}
        if item.requires_python:
            entry["requires-python"] = item.requires_python
        metadata = {"sha256": item.metadata_sha256}
        entry.update({"core-metadata": metadata, "dist-info-metadata": metadata, "size": item.size})
        if item.forced:  # PEP 691 keeps keys with a leading underscore for the index's own use
            entry["_gpuwheel"] = {"publish": item.forced.to_json()}
        files.append(entry)
    versions = sorted({i.version for i in items}, key=Version)
    return _dumps(
        {
            "meta": {"api-version": API_VERSION},
            "name": canonicalize_name(display_name),
            "versions": versions,
            "files": files,
        }
    )


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=1, sort_keys=False) + "\n"

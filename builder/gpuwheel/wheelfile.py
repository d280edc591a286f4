"""The wheel format, as gpuwheel reads and writes it: one module below every stage.

- read_wheel: a wheel's identity (name, version, sha256), core metadata and gpuwheel.json, checked once;
- check_wheel: everything pip would refuse (one .dist-info with METADATA, WHEEL and RECORD, a METADATA
  that agrees with the file name, every RECORD hash and size) and any member that could land outside
  the install root;
- repack: a deterministic rewrite (sorted entries, one timestamp, fixed modes and compression) with
  renamed .dist-info/.data, a labelled METADATA, gpuwheel.json and a recomputed RECORD;
- add_publish_mark: a copy whose gpuwheel.json also carries what `publish --force` let through.
Formats: docs/wheels.md.
"""

from __future__ import annotations

import base64
import calendar
import csv
import hashlib
import io
import json
import re
import stat
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from packaging.metadata import parse_email
from packaging.tags import Tag, parse_tag
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from gpuwheel.cache import sha256_file
from gpuwheel.errors import WheelError, raise_if_refused
from gpuwheel.limits import irregular_file
from gpuwheel.provenance import Provenance, ProvenanceFormatError, PublishMark

PROVENANCE_FILE = "gpuwheel.json"
# 1980-01-01 00:00:00 UTC, the earliest time a zip entry can hold: the timestamp of every entry of a
# finished wheel unless SOURCE_DATE_EPOCH says otherwise (and what builds set it to by default).
DEFAULT_SOURCE_DATE_EPOCH = 315532800

_COMPRESS_LEVEL = 6  # zlib's Z_DEFAULT_COMPRESSION, which zipfile uses for an entry given as a ZipInfo
_CHUNK = 1 << 20
_HASHES = ("sha256", "sha384", "sha512")  # what a RECORD may use (PEP 376/427 forbid md5 and sha1)
_UNHASHED = ("RECORD", "RECORD.jws", "RECORD.p7s")  # the .dist-info files RECORD lists without a hash


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
    provenance: Provenance | None = field(repr=False)  # gpuwheel.json, None when absent


def read_wheel(path: Path) -> WheelFile:
    """Open a wheel, check that its name and metadata agree, read its gpuwheel.json, and hash it."""
    path = Path(path)
    name, version = _name_and_version(path)
    require_regular(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            for member in sorted(names):
                refuse_unsafe_member(path, member)
            dist_infos = sorted(
                {
                    n.split("/", 1)[0]
                    for n in names
                    if n.split("/", 1)[0].endswith(".dist-info") and n.endswith("/METADATA") and n.count("/") == 1
                }
            )
            if len(dist_infos) != 1:
                raise WheelError(f"{path}: expected one .dist-info/METADATA, found {len(dist_infos)}")
            dist_info = dist_infos[0]
            metadata = archive.read(f"{dist_info}/METADATA")
            record = f"{dist_info}/{PROVENANCE_FILE}"
            provenance_bytes = archive.read(record) if record in names else None
    except (zipfile.BadZipFile, OSError) as error:
        raise WheelError(f"{path}: cannot read the wheel ({error})") from None
    raw = _check_metadata(path, "METADATA", metadata, name, version)
    provenance = None
    if provenance_bytes is not None:
        try:
            provenance = Provenance.from_json(json.loads(provenance_bytes))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise WheelError(f"{path}: {record} is not valid JSON ({error})") from None
        except ProvenanceFormatError as error:
            raise WheelError(f"{path}: {record} {error}") from None
    return WheelFile(
        path=path,
        filename=path.name,
        project=name,
        display_name=raw["name"],
        version=str(version),
        sha256=sha256_file(path),
        size=path.stat().st_size,
        metadata=metadata,
        requires_python=raw.get("requires_python"),
        dist_info=dist_info,
        provenance=provenance,
    )


def read_provenance(path: Path) -> Provenance | None:
    """A wheel's gpuwheel.json without hashing or checking the wheel; None when it has none readable."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = [
                n for n in archive.namelist() if n.count("/") == 1 and n.endswith(f".dist-info/{PROVENANCE_FILE}")
            ]
            return Provenance.from_json(json.loads(archive.read(records[0]))) if records else None
    except (zipfile.BadZipFile, OSError, ValueError):  # ProvenanceFormatError is a ValueError
        return None


def version_or_none(text: str | None) -> Version | None:
    """A METADATA Version field parsed, or None when it is missing or no PEP 440 version."""
    try:
        return Version(text or "")
    except InvalidVersion:
        return None


def require_regular(path: Path) -> None:
    if why := irregular_file(path):
        raise WheelError(f"{path}: {why}; refused", hint="remove it from the wheels folder")


def escapes_root(name: str) -> bool:
    """Whether a zip member name would land outside the directory it is extracted to."""
    pure = PurePosixPath(name.replace("\\", "/"))
    return pure.is_absolute() or ".." in pure.parts or bool(pure.parts and ":" in pure.parts[0])


def refuse_unsafe_member(wheel: Path, name: str) -> None:
    # pip refuses such a wheel on install; no stage may finish, test or serve it, --force or not.
    if escapes_root(name):
        raise WheelError(
            f"{wheel}: member {name!r} would land outside the install root (path traversal); refused",
            hint="rebuild the wheel; no wheel may hold such a member",
        )


def _name_and_version(path: Path) -> tuple[str, Version]:
    try:
        name, version, _, _ = parse_wheel_filename(path.name)
    except InvalidWheelFilename as error:
        raise WheelError(f"{path}: not a wheel file name ({error})") from None
    return name, version


def _check_metadata(path: Path, where: str, metadata: bytes, name: str, version: Version) -> Any:
    """METADATA parsed, once its Name and Version are the file name's."""
    raw, _ = parse_email(metadata)
    if canonicalize_name(raw.get("name", "")) != name or version_or_none(raw.get("version")) != version:
        raise WheelError(
            f"{path}: {where} says {raw.get('name')} {raw.get('version')}, the file name says {name} {version}"
        )
    return raw


# ---- checking a wheel ---------------------------------------------------------------------------
@dataclass(frozen=True)
class WheelLayout:
    name: str  # canonical
    version: Version
    dist_info: str  # "<name>-<version>.dist-info"
    data_dir: str  # "<name>-<version>.data" (need not exist)
    members: frozenset[str]


def check_wheel(path: Path) -> WheelLayout:
    """Refuse anything pip would refuse, or that could write outside the wheel's root."""
    if not path.is_file():
        raise WheelError(f"{path}: no such file")
    name, version = _name_and_version(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise WheelError(f"{path}: not a wheel: not a readable zip archive ({error})") from None
    with archive:
        infos = [info for info in archive.infolist() if not info.is_dir()]
        names = [info.filename for info in infos]
        for member in names:
            refuse_unsafe_member(path, member)
        if len(set(names)) != len(names):
            duplicate = next(n for n in names if names.count(n) > 1)
            raise WheelError(f"{path}: member {duplicate!r} appears twice; refusing this wheel")
        dist_info = _single_dist_info(path, names, name, version)
        _check_metadata(path, f"{dist_info}/METADATA", _read(archive, path, f"{dist_info}/METADATA"), name, version)
        _check_record(archive, path, dist_info, infos)
    stem = dist_info[: -len(".dist-info")]
    return WheelLayout(name, version, dist_info, f"{stem}.data", frozenset(names))


def _single_dist_info(path: Path, names: list[str], name: str, version: Version) -> str:
    found = sorted(
        {
            member.split("/", 1)[0]
            for member in names
            if "/" in member and member.split("/", 1)[0].endswith(".dist-info")
        }
    )
    if len(found) != 1:
        raise WheelError(
            f"{path}: expected one top-level .dist-info directory, found {len(found)}"
            + (f" ({', '.join(found)})" if found else "; not a wheel")
        )
    dist_info = found[0]
    dist_name, _, dist_version = dist_info[: -len(".dist-info")].partition("-")
    if canonicalize_name(dist_name) != name or version_or_none(dist_version) != version:
        raise WheelError(f"{path}: its directory {dist_info} disagrees with the file name ({name} {version})")
    for required in ("METADATA", "WHEEL", "RECORD"):
        if f"{dist_info}/{required}" not in names:
            raise WheelError(f"{path}: {dist_info}/{required} is missing; not a wheel")
    return dist_info


def _read(archive: zipfile.ZipFile, path: Path, member: str) -> bytes:
    try:
        return archive.read(member)
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise_if_refused(error)
        raise WheelError(f"{path}: cannot read {member} ({error}); the wheel is corrupt") from None


def _check_record(archive: zipfile.ZipFile, path: Path, dist_info: str, infos: list[zipfile.ZipInfo]) -> None:
    """Every member is in RECORD with its hash and size, and RECORD lists nothing else."""
    record_name = f"{dist_info}/RECORD"
    unhashed = {f"{dist_info}/{name}" for name in _UNHASHED}
    try:
        rows = list(csv.reader(io.StringIO(_read(archive, path, record_name).decode("utf-8"))))
    except (UnicodeDecodeError, csv.Error) as error:
        raise WheelError(f"{path}: {record_name} is not a readable CSV file ({error})") from None
    recorded: dict[str, tuple[str, str]] = {}
    for number, row in enumerate(rows, start=1):
        if not row:
            continue
        if len(row) != 3:
            raise WheelError(f"{path}: {record_name}:{number} has {len(row)} fields, not path,hash,size")
        recorded[row[0]] = (row[1], row[2])
    for info in infos:
        if info.filename in unhashed:
            continue
        if info.filename not in recorded:
            raise WheelError(f"{path}: RECORD mismatch: {info.filename} is not listed in {record_name}")
        hash_text, size = recorded.pop(info.filename)
        algorithm, _, expected = hash_text.partition("=")
        if algorithm not in _HASHES:
            raise WheelError(
                f"{path}: RECORD mismatch: {info.filename} has hash {hash_text!r}; "
                f"RECORD must use one of {', '.join(_HASHES)}"
            )
        digest, actual_size = _hash_member(archive, path, info, algorithm)
        if digest != expected or (size and int(size) != actual_size):
            raise WheelError(
                f"{path}: RECORD mismatch: {info.filename} has {algorithm}={digest} "
                f"({actual_size} bytes), {record_name} says {hash_text} ({size or '?'} bytes)"
            )
    missing = sorted(name for name in recorded if name not in unhashed)
    if missing:
        raise WheelError(
            f"{path}: RECORD mismatch: {record_name} lists {missing[0]}, which the wheel does not hold"
            + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
        )


def _hash_member(archive: zipfile.ZipFile, path: Path, info: zipfile.ZipInfo, algorithm: str) -> tuple[str, int]:
    digest = hashlib.new(algorithm)
    size = 0
    try:
        with archive.open(info) as stream:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise_if_refused(error)
        raise WheelError(f"{path}: cannot read {info.filename} ({error}); the wheel is corrupt") from None
    return _record_digest(digest), size


def _record_digest(digest: Any) -> str:
    return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode("ascii")


# ---- the deterministic repack -------------------------------------------------------------------
def provenance_text(provenance: Mapping[str, Any]) -> str:
    """gpuwheel.json as written into a wheel: sorted keys, so the same record gives the same bytes."""
    return json.dumps(provenance, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def repack(
    source: Path,
    target: Path,
    renames: Mapping[str, str],
    version: Version,
    tags: set[Tag],
    provenance: Mapping[str, Any],
    epoch: int,
) -> None:
    """Write `source` as `target`: renamed dist-info/.data, labelled METADATA, provenance (the JSON
    object of gpuwheel.json), new RECORD.

    Entries sorted (the .dist-info last, RECORD at the very end), one timestamp, modes 0644/0755,
    ZIP_DEFLATED at level 6: the same input gives the same bytes.
    """
    date_time = time.gmtime(epoch)[:6]
    old_dist_info = next(old for old in renames if old.endswith(".dist-info"))
    new_dist_info = renames[old_dist_info]
    dropped = {f"{old_dist_info}/{name}" for name in (*_UNHASHED, PROVENANCE_FILE)}
    with zipfile.ZipFile(source) as archive:
        members = {
            _renamed(info.filename, renames): info
            for info in archive.infolist()
            if not info.is_dir() and info.filename not in dropped
        }
        replaced = {
            f"{new_dist_info}/METADATA": _labelled_metadata(archive.read(f"{old_dist_info}/METADATA"), version, source),
            f"{new_dist_info}/{PROVENANCE_FILE}": provenance_text(provenance).encode("utf-8"),
        }
        _check_wheel_tags(archive.read(f"{old_dist_info}/WHEEL"), tags, source)
        record_name = f"{new_dist_info}/RECORD"
        names = sorted(set(members) | set(replaced))
        order = [n for n in names if not n.startswith(f"{new_dist_info}/")] + [
            n for n in names if n.startswith(f"{new_dist_info}/")
        ]
        rows = []
        with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=_COMPRESS_LEVEL) as out:
            for name in order:
                if name in replaced:
                    data = replaced[name]
                    out.writestr(_entry(name, date_time, 0o644, len(data)), data)
                    rows.append((name, f"sha256={_record_digest(hashlib.sha256(data))}", str(len(data))))
                    continue
                info = members[name]
                mode = 0o755 if _executable(name, info) else 0o644
                digest = hashlib.sha256()
                with archive.open(info) as stream, out.open(_entry(name, date_time, mode, info.file_size), "w") as sink:
                    while chunk := stream.read(_CHUNK):
                        digest.update(chunk)
                        sink.write(chunk)
                rows.append((name, f"sha256={_record_digest(digest)}", str(info.file_size)))
            rows.append((record_name, "", ""))
            text = io.StringIO()
            csv.writer(text, lineterminator="\n").writerows(rows)
            out.writestr(_entry(record_name, date_time, 0o644, len(text.getvalue())), text.getvalue().encode("utf-8"))


def add_publish_mark(wheel: WheelFile, mark: PublishMark, out_dir: Path) -> Path:
    """A copy of the wheel, in out_dir under the same name, whose gpuwheel.json also carries `mark`:
    it travels with the file to every host that installs it. The rest of the record is kept as the
    wheel carries it (the publish stage never rewrites the build's record), and the same wheel and
    mark give the same bytes, so forcing it again finds it already published."""
    _, version, _, tags = parse_wheel_filename(wheel.filename)
    with zipfile.ZipFile(wheel.path) as archive:
        first = archive.infolist()[0].date_time  # the wheel's own timestamp (gpuwheel writes one for all)
        record = f"{wheel.dist_info}/{PROVENANCE_FILE}"
        carried = json.loads(archive.read(record)) if wheel.provenance is not None else {}
    target = Path(out_dir) / wheel.filename
    repack(
        wheel.path,
        target,
        {wheel.dist_info: wheel.dist_info},
        version,
        set(tags),
        {**carried, "publish": mark.to_json()},
        calendar.timegm((*first, 0, 0, 0)),
    )
    return target


def _renamed(name: str, renames: Mapping[str, str]) -> str:
    top, _, rest = name.partition("/")
    return f"{renames[top]}/{rest}" if top in renames and rest else name


def _entry(name: str, date_time: tuple[int, ...], mode: int, size: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=date_time)  # type: ignore[arg-type]
    info.compress_type = zipfile.ZIP_DEFLATED
    info.create_system = 3  # Unix, so that the mode bits below mean what they say
    info.external_attr = (stat.S_IFREG | mode) << 16
    info.file_size = size  # lets zipfile decide ZIP64 up front, the same way every time
    return info


def _executable(name: str, info: zipfile.ZipInfo) -> bool:
    base = PurePosixPath(name).name
    script = name.split("/", 1)[0].endswith(".data") and "/scripts/" in name
    return bool((info.external_attr >> 16) & 0o111) or base.endswith(".so") or ".so." in base or script


def _labelled_metadata(metadata: bytes, version: Version, wheel: Path) -> bytes:
    """METADATA with its Version header replaced, every other byte kept."""
    head, separator, body = metadata.partition(b"\n\n")
    new_head, count = re.subn(rb"(?m)^Version:[^\r\n]*", f"Version: {version}".encode("ascii"), head)
    if count != 1:
        raise WheelError(f"{wheel.name}: METADATA has {count} Version headers, expected one")
    return new_head + separator + body


def _check_wheel_tags(wheel_file: bytes, tags: set[Tag], source: Path) -> None:
    """The WHEEL file's Tag lines (auditwheel rewrote them) must be the file name's tags."""
    listed = {
        tag
        for line in wheel_file.decode("utf-8").splitlines()
        if line.startswith("Tag:")
        for tag in parse_tag(line.split(":", 1)[1].strip())
    }
    if listed != tags:
        raise WheelError(
            f"{source.name}: its WHEEL file lists tags {sorted(map(str, listed))}, its file name "
            f"{sorted(map(str, tags))}"
        )

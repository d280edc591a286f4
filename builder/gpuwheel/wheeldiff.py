"""Two wheels compared member by member: which members were added or removed, and for each member
whose bytes differ, how — its sizes, the first differing byte with a hex excerpt of both, the ELF
sections that differ (and the one holding that byte), or a unified diff of a text member. Where every
member is the same, what differs in the archive itself (order, timestamps, modes, compression).

`gpuwheel verify` compares a wheel with its rebuild through `compare_wheels`; it reads only the two
files, so it is tested on wheels made by hand as well as on rebuilds. docs/lock.md, "verify".
"""

from __future__ import annotations

import difflib
import hashlib
import io
import itertools
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from elftools.common.exceptions import ELFError
from elftools.construct import ConstructError
from elftools.elf.elffile import ELFFile

from gpuwheel.cache import sha256_file
from gpuwheel.errors import WheelError, raise_if_refused

ELF_MAGIC = b"\x7fELF"
_CHUNK = 1 << 20
_EXCERPT_BEFORE, _EXCERPT_AFTER = 8, 24  # bytes shown around the first difference
_DIFF_LINES = 40  # lines of a text member's unified diff kept
_ARCHIVE_NOTES = 5  # archive-level differences listed
# A differing member is read into memory to be analysed (vLLM's _C.so: ~470 MB); past this size (a
# zip's declared size bounds what zipfile inflates) only its hash and size are compared.
_ANALYSED_BYTES = 4 << 30


@dataclass(frozen=True)
class SectionDifference:
    """An ELF section whose header or bytes differ; a size of None: the section is absent there."""

    name: str
    sizes: tuple[int | None, int | None]


@dataclass(frozen=True)
class MemberDifference:
    """How one archive member differs between the two wheels (`sizes`: None where it is absent)."""

    name: str
    change: str  # added (only in the second wheel) | removed (only in the first) | changed
    kind: str  # elf | text | binary
    sizes: tuple[int | None, int | None]
    first_offset: int | None = None  # of the first differing byte (changed members)
    excerpts: tuple[str, str] = ("", "")  # hex of both around first_offset: "0x…: 7f 45 …"
    sections: tuple[SectionDifference, ...] = ()  # ELF: every section that differs
    at_section: str | None = None  # ELF: where first_offset lies (".text+0x34", "the ELF header")
    diff: tuple[str, ...] = ()  # text: a unified diff excerpt

    def summary(self) -> str:
        """One line: what changed in this member."""
        if self.change != "changed":
            present = self.sizes[1] if self.change == "added" else self.sizes[0]
            return f"{self.name}: {self.change} ({present:,} bytes)"
        parts = [f"{self.name}:"]
        if self.sizes[0] != self.sizes[1]:
            parts.append(f"size {self.sizes[0]:,} → {self.sizes[1]:,} bytes;")
        else:
            parts.append(f"same size ({self.sizes[0]:,} bytes);")
        if self.kind == "elf":
            names = ", ".join(s.name for s in self.sections) or "no section (headers only)"
            parts.append(f"ELF sections differ: {names};")
        elif self.kind == "text":
            parts.append(
                f"text, {sum(1 for line in self.diff if line[:1] in '+-' and line[:3] not in ('+++', '---'))}"
                f"{'+' if len(self.diff) >= _DIFF_LINES else ''} line(s) differ;"
            )
        if self.first_offset is None:
            parts.append(f"too large to compare byte by byte here (over {_ANALYSED_BYTES >> 30} GiB)")
        else:
            where = f" ({self.at_section})" if self.at_section else ""
            parts.append(f"first differing byte at {self.first_offset:#x}{where}")
        return " ".join(parts)


@dataclass(frozen=True)
class WheelDiff:
    """Two wheels compared: `members` differ, or else `archive` says how the zip files differ."""

    paths: tuple[Path, Path]
    sha256: tuple[str, str]
    members: tuple[MemberDifference, ...]
    archive: tuple[str, ...]  # where no member differs: member order, timestamps, modes, compression

    @property
    def same(self) -> bool:
        return self.sha256[0] == self.sha256[1]

    def to_json(self) -> dict[str, Any]:
        return {
            "paths": [str(p) for p in self.paths],
            "sha256": list(self.sha256),
            "same": self.same,
            "members": [{**asdict(m), "summary": m.summary()} for m in self.members],
            "archive": list(self.archive),
        }


def compare_wheels(first: Path, second: Path) -> WheelDiff:
    """Compare two wheels (any two zip files) member by member; WheelError when one is no zip file."""
    first, second = Path(first), Path(second)
    try:
        with zipfile.ZipFile(first) as a, zipfile.ZipFile(second) as b:
            infos_a, infos_b = _files(a), _files(b)
            members = []
            # The package's own members first: a changed RECORD or gpuwheel.json follows from them.
            for name in sorted(set(infos_a) | set(infos_b), key=_package_first):
                if name not in infos_b:
                    members.append(
                        MemberDifference(name, "removed", _kind_of(a, infos_a[name]), (infos_a[name].file_size, None))
                    )
                elif name not in infos_a:
                    members.append(
                        MemberDifference(name, "added", _kind_of(b, infos_b[name]), (None, infos_b[name].file_size))
                    )
                elif _digest(a, infos_a[name]) != _digest(b, infos_b[name]):
                    sizes = (infos_a[name].file_size, infos_b[name].file_size)
                    members.append(
                        MemberDifference(name, "changed", "binary", sizes)
                        if max(sizes) > _ANALYSED_BYTES
                        else _changed(name, a.read(infos_a[name]), b.read(infos_b[name]))
                    )
            archive = () if members else _archive_differences(a, b)
    except (zipfile.BadZipFile, OSError) as error:
        raise_if_refused(error)
        raise WheelError(f"cannot compare {first.name} with {second.name}: {error}") from None
    return WheelDiff((first, second), (sha256_file(first), sha256_file(second)), tuple(members), archive)


def _package_first(name: str) -> tuple[bool, str]:
    return name.split("/", 1)[0].endswith(".dist-info"), name


def _files(archive: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    return {info.filename: info for info in archive.infolist() if not info.is_dir()}


def _digest(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """sha256 of a member's bytes, streamed: a CRC match alone is no proof of sameness."""
    digest = hashlib.sha256()
    with archive.open(info) as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.digest()


def _kind_of(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> str:
    with archive.open(info) as stream:
        head = stream.read(4)
    if head == ELF_MAGIC:
        return "elf"
    return "text" if _text(archive.read(info)) is not None else "binary"


def _text(data: bytes) -> str | None:
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _changed(name: str, old: bytes, new: bytes) -> MemberDifference:
    offset = _first_difference(old, new)
    common: dict[str, Any] = {
        "name": name,
        "change": "changed",
        "sizes": (len(old), len(new)),
        "first_offset": offset,
        "excerpts": (_excerpt(old, offset), _excerpt(new, offset)),
    }
    if old.startswith(ELF_MAGIC) and new.startswith(ELF_MAGIC):
        sections_old, sections_new = _sections(old), _sections(new)
        if sections_old is not None and sections_new is not None:
            return MemberDifference(
                kind="elf",
                sections=_section_differences(old, new, sections_old, sections_new),
                at_section=_where(offset, sections_old),
                **common,
            )
    text_old, text_new = _text(old), _text(new)
    if text_old is not None and text_new is not None:
        lines = difflib.unified_diff(
            text_old.splitlines(), text_new.splitlines(), f"a/{name}", f"b/{name}", n=2, lineterm=""
        )
        return MemberDifference(kind="text", diff=tuple(itertools.islice(lines, _DIFF_LINES)), **common)
    return MemberDifference(kind="binary", **common)


def _first_difference(old: bytes, new: bytes) -> int:
    # Only the bytes both have are compared: a member that is a prefix of the other (a text file
    # appended to) differs first where the shorter one ends.
    common = min(len(old), len(new))
    view_old, view_new = memoryview(old)[:common], memoryview(new)[:common]
    for start in range(0, common, _CHUNK):
        chunk_old, chunk_new = view_old[start : start + _CHUNK], view_new[start : start + _CHUNK]
        if chunk_old != chunk_new:
            return start + next(i for i, (x, y) in enumerate(zip(chunk_old, chunk_new, strict=True)) if x != y)
    return common


def _excerpt(data: bytes, offset: int) -> str:
    start = max(0, offset - _EXCERPT_BEFORE)
    piece = data[start : offset + _EXCERPT_AFTER]
    return f"{start:#x}: {piece.hex(' ')}" if piece else f"{start:#x}: (end of file)"


# (name, file offset, size, type, address, flags) of each section, in header order
_Section = tuple[str, int, int, str, int, int]


def _sections(data: bytes) -> list[_Section] | None:
    """The section headers of an ELF image, None when it is no readable ELF. Section bytes are sliced
    from `data` by the caller: pyelftools would allocate whatever size a forged header claims."""
    try:
        elf = ELFFile(io.BytesIO(data))
        headers = [
            (
                section.name,
                section["sh_offset"],
                section["sh_size"],
                section["sh_type"],
                section["sh_addr"],
                section["sh_flags"],
            )
            for section in elf.iter_sections()
        ]
    except (ELFError, ConstructError, ValueError, KeyError):  # a truncated or forged header: compared as bytes
        return None
    return headers


def _section_differences(
    old: bytes, new: bytes, sections_old: list[_Section], sections_new: list[_Section]
) -> tuple[SectionDifference, ...]:
    by_name_old, by_name_new = _named(sections_old), _named(sections_new)
    differences = []
    for name in [*by_name_old, *(n for n in by_name_new if n not in by_name_old)]:
        a, b = by_name_old.get(name), by_name_new.get(name)
        if a is None or b is None or a[2:] != b[2:] or _bytes_of(old, a) != _bytes_of(new, b):
            differences.append(SectionDifference(name, (a[2] if a else None, b[2] if b else None)))
    return tuple(differences)


def _named(sections: list[_Section]) -> dict[str, _Section]:
    """Sections by name; the null section and repeated names get their index (`#0`, `.note#3`)."""
    named: dict[str, _Section] = {}
    for index, section in enumerate(sections):
        key = section[0] or f"#{index}"
        named[key if key not in named else f"{key}#{index}"] = section
    return named


def _bytes_of(data: bytes, section: _Section) -> bytes:
    _, offset, size, kind, _, _ = section
    return b"" if kind == "SHT_NOBITS" else data[offset : offset + size]


def _where(offset: int, sections: list[_Section]) -> str:
    """The section of the first image holding file offset `offset`, else the part of the file it is in."""
    for name, start, size, kind, _, _ in sections:
        if kind != "SHT_NOBITS" and start <= offset < start + size and name:
            return f"{name}+{offset - start:#x}"
    # An ELF64 header is 64 bytes (an ELF32 one 52: a difference there is in the header too)
    return "the ELF header" if offset < 64 else "outside every section: program or section headers, padding"


def _archive_differences(a: zipfile.ZipFile, b: zipfile.ZipFile) -> tuple[str, ...]:
    """The same members, different files: how the zip entries themselves differ."""
    infos_a, infos_b = a.infolist(), b.infolist()
    notes = []
    if [i.filename for i in infos_a] != [i.filename for i in infos_b]:
        notes.append("the members are in another order")
    by_name = {info.filename: info for info in infos_b}
    for info in infos_a:
        other = by_name.get(info.filename)
        if other is None:
            continue
        for field, label in (
            ("date_time", "timestamp"),
            ("external_attr", "mode"),
            ("compress_type", "compression"),
            ("create_system", "system"),
            ("extra", "extra field"),
            ("comment", "comment"),
        ):
            value_a, value_b = getattr(info, field), getattr(other, field)
            if value_a != value_b:
                if field == "external_attr":
                    value_a, value_b = oct(value_a >> 16), oct(value_b >> 16)
                notes.append(f"{info.filename}: {label} {value_a} → {value_b}")
        if len(notes) >= _ARCHIVE_NOTES:
            break
    if not notes and a.comment != b.comment:
        notes.append("the archive comment differs")
    return tuple(notes[:_ARCHIVE_NOTES]) or ("the zip files differ in their compressed bytes only",)

"""Read the GPU code an ELF shared object carries: its `.nv_fatbin` containers and their entries.

Layout (little-endian, checked against nvcc 13.0 output and `cuobjdump --list-elf --list-ptx`):
a container is a 16-byte header `u32 magic 0xBA55ED50, u16 version, u16 header size, u64 payload
size` followed by entries, containers 8-byte aligned one after another. An entry header is
`u16 kind (1 PTX, 2 ELF), u16, u32 header size, u64 payload size, u32 compressed size, u32,
u16 minor, u16 major, u32 arch` with `u64 flags` at +40 and `u64 decompressed size` at +56.
The ELF image is a buffer (a mapped file, a mapped wheel member, an inflated member): pyelftools reads
its headers through a stream over it, and the fatbin bytes are parsed in place, never copied. SASS
needs no decompression at all, and of each PTX payload only the start that holds `.version` and
`.target` is decoded (zstd and LZ4 alike: a PTX text is MBs, its header lines come first).
What the parse never reads an inflating reader need not even write (skip_plan; LeftOut when it did).
"""

from __future__ import annotations

import bisect
import io
import mmap
import re
import struct
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import zstandard
from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile

from gpuwheel.errors import AuditInputError

CONTAINER_MAGIC = 0xBA55ED50
_CONTAINER = struct.Struct("<IHHQ")
_ENTRY = struct.Struct("<HHIQIIHHI")  # kind, _, header size, payload size, compressed size, _, minor, major, arch
_ENTRY_MIN_HEADER = 64  # the fields read below end at +64
KIND_PTX, KIND_ELF = 1, 2
FLAG_LZ4, FLAG_ZSTD = 0x2000, 0x8000
FLAG_ARCH_SPECIFIC, FLAG_FAMILY = 0x100000, 0x200000
# The wrapper struct __cudaFatBinWrapper in .nvFatBinSegment: u32 magic, u32 version, u64 data address, u64.
_WRAPPER = struct.Struct("<IIQQ")
WRAPPER_MAGIC = 0x466243B1
_MAGIC_BYTES = struct.pack("<I", CONTAINER_MAGIC)
_SCAN_STEP = 1 << 20  # bytes searched for a container magic per step, outside containers
_MAX_PADDING = 4096  # zero bytes between two containers before the plan goes back to searching
_PTX_HEAD_STEPS = (1 << 10, 4 << 10, 16 << 10, 64 << 10)  # .version/.target come after a few comment lines
# A zstd frame's first block holds at most 128 KiB; 64 KiB of LZ4 output needs less than 65 KiB of input.
_PTX_STORED_READ = 256 << 10
_VERSION_RE = re.compile(rb"^\s*\.version\s+(\d+\.\d+)", re.M)
_TARGET_RE = re.compile(rb"^\s*\.target\s+(sm_\d+[af]?)", re.M)


@dataclass(frozen=True)
class _ArchCode:
    """Code for one arch number and variant: sm_90a / compute_90a are arch 90, variant "a"."""

    arch: int
    variant: str  # "" (plain), "a" (this arch only) or "f" (this arch's family)

    @property
    def major(self) -> int:
        return self.arch // 10

    @property
    def minor(self) -> int:
        return self.arch % 10


@dataclass(frozen=True)
class SassEntry(_ArchCode):
    """Machine code for one GPU arch."""

    # [start, end) file offsets of the cubin, which the parse steps over without reading
    payload: tuple[int, int] | None = field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        return f"sm_{self.arch}{self.variant}"


@dataclass(frozen=True)
class PtxEntry(_ArchCode):
    """PTX for one virtual arch, and the PTX ISA version its text declares (`.version`)."""

    isa: str  # "9.0"
    # [start, end) file offsets of the stored PTX, of which the parse reads _PTX_STORED_READ bytes at most
    payload: tuple[int, int] | None = field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        return f"compute_{self.arch}{self.variant}"


@dataclass(frozen=True)
class FatbinUnit:
    """One fatbin container: the GPU code of one compilation unit (or one device link)."""

    index: int  # position among the .so's non-empty containers, from 0
    offset: int  # file offset of the container header
    sass: tuple[SassEntry, ...]
    ptx: tuple[PtxEntry, ...]


def read_fatbin_units(path: Path | str) -> tuple[FatbinUnit, ...]:
    """The fatbin units of an ELF file on disk; () when it carries no GPU code."""
    with open(path, "rb") as file:
        return read_fatbin(map_file(file), str(path))


def map_file(file) -> mmap.mmap:
    """A read-only mapping of a whole file: only the pages the audit touches are ever read from disk."""
    return mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)


class LeftOut(Exception):
    """The parse needed bytes that an inflating reader left out of the image (see skip_plan)."""


def _overlaps(spans: Sequence[tuple[int, int]], start: int, end: int) -> bool:
    """Whether [start, end) meets one of the sorted, disjoint spans."""
    index = bisect.bisect_left(spans, (end,)) - 1  # the last span starting before `end`
    return index >= 0 and spans[index][1] > start


class _BufferStream(io.RawIOBase):
    """The seekable stream pyelftools wants, over a buffer: a read copies only the bytes asked for
    (io.BytesIO would copy the whole buffer first), and fails if it needs a span left out."""

    def __init__(self, view: memoryview, left_out: Sequence[tuple[int, int]]):
        super().__init__()
        self._view = view
        self._left_out = left_out
        self._at = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        at = {io.SEEK_SET: 0, io.SEEK_CUR: self._at, io.SEEK_END: len(self._view)}[whence] + offset
        if at < 0:
            raise ValueError(f"negative seek position {at}")
        self._at = at
        return at

    def tell(self) -> int:
        return self._at

    def readinto(self, buffer) -> int:
        chunk = self._view[self._at : self._at + len(buffer)]
        if _overlaps(self._left_out, self._at, self._at + len(chunk)):
            raise LeftOut(f"pyelftools reads bytes {self._at}-{self._at + len(chunk)}")
        buffer[: len(chunk)] = chunk
        self._at += len(chunk)
        return len(chunk)


def linked_cuda_runtime(data, name: str, left_out: Sequence[tuple[int, int]] = ()) -> int | None:
    """The CUDA major of the libcudart.so.N an ELF image (a buffer) links (its DT_NEEDED), or None.
    `left_out`: sorted [start, end) spans of the image never written (LeftOut if it needs them).

    The runtime, not only the kernels, has a driver floor: libcudart.so.13 fails to initialise
    on a driver older than CUDA 13.0's even when every kernel is native SASS.
    """
    dynamic = _open_elf(memoryview(data), left_out, name).get_section_by_name(".dynamic")
    if not isinstance(dynamic, DynamicSection):  # none, or not of type SHT_DYNAMIC: no tags to read
        return None
    for tag in dynamic.iter_tags("DT_NEEDED"):
        # pyelftools sets `needed` on DT_NEEDED tags at run time; its stub does not declare it
        match = re.fullmatch(r"libcudart\.so\.(\d+)", tag.needed)  # type: ignore[attr-defined]
        if match:
            return int(match[1])
    return None


def read_fatbin(data, name: str, left_out: Sequence[tuple[int, int]] = ()) -> tuple[FatbinUnit, ...]:
    """The fatbin units of an ELF image held in a buffer (bytes, mmap, memoryview); `name` goes into
    error messages. `left_out`: sorted [start, end) spans of the image never written; LeftOut if the
    parse read any byte of them (a span inside a fatbin region must lie in a cubin or PTX tail the
    parse stepped over)."""
    view = memoryview(data)
    elf = _open_elf(view, left_out, name)
    try:
        regions = _fatbin_regions(elf, name)
    except ELFError as error:
        raise AuditInputError(f"{name}: not a readable ELF file ({error}); is it truncated?") from None
    units: list[FatbinUnit] = []
    for file_offset, size in regions:
        region = view[file_offset : file_offset + size]  # a view: the section's hundreds of MB are not copied
        if len(region) != size:
            raise AuditInputError(
                f"{name}: file ends inside .nv_fatbin at offset {file_offset + len(region)}; the file is truncated"
            )
        found = _parse_containers(region, file_offset, name, first_index=len(units))
        _check_left_out(left_out, file_offset, file_offset + size, found)
        units.extend(found)
    return tuple(units)


def _check_left_out(left_out: Sequence[tuple[int, int]], start: int, end: int, units: list[FatbinUnit]) -> None:
    """LeftOut unless every span left out that meets the region [start, end) lies in one the parse of
    its units never read: a cubin, or a stored PTX past its first _PTX_STORED_READ bytes."""
    # Every parsed entry has its payload span (None only in entries made by hand).
    spans: list[tuple[float, float]] = []
    for unit in units:
        spans += (entry.payload for entry in unit.sass if entry.payload is not None)
        for ptx in unit.ptx:
            if ptx.payload is not None and ptx.payload[1] > ptx.payload[0] + _PTX_STORED_READ:
                spans.append((ptx.payload[0] + _PTX_STORED_READ, ptx.payload[1]))
    unread = sorted(spans)
    first = bisect.bisect_left(left_out, (start,))
    if first and left_out[first - 1][1] > start:  # a span from before the region reaching into it
        first -= 1
    for begin, stop in left_out[first:]:
        if begin >= end:
            break
        index = bisect.bisect_right(unread, (begin, float("inf"))) - 1
        if index < 0 or stop > unread[index][1]:
            raise LeftOut(f"the fatbin parse reads bytes left out at {begin}-{stop}")


def skip_plan(image) -> Iterator[tuple[int, int]]:
    """What an ELF image being filled front to back may leave unwritten: yields (keep, drop), meaning
    "fill the image up to offset `keep`, leave [keep, drop) out, then ask again", so that what the parse
    never reads (cubins and the tails of PTX texts, most of a CUDA library) is never written.

    A guess, made before the section headers at the end of the file say where `.nv_fatbin` lies:
    containers are recognised by their magic at 8-byte aligned offsets, wherever they are. Hand the
    spans left out to read_fatbin and linked_cuda_runtime: they raise LeftOut if the parse needed any.
    """
    size = len(image)
    at = 0
    while at < size:
        upto = min(size, at + _SCAN_STEP)
        yield upto, upto
        start = image.find(_MAGIC_BYTES, at, upto)
        while start >= 0 and start % 8:
            start = image.find(_MAGIC_BYTES, start + 1, upto)
        if start < 0:  # the next step looks again at the last 3 bytes, where a magic may begin
            at = upto if upto == size else upto - len(_MAGIC_BYTES) + 1
            continue
        at = yield from _container_plan(image, start, size)
        # Containers follow one another, maybe after a little zero padding: look right there first,
        # before the next step keeps a whole _SCAN_STEP.
        padding = 0
        while at + _CONTAINER.size <= size and padding < _MAX_PADDING:
            yield at + _CONTAINER.size, at + _CONTAINER.size
            if image[at : at + len(_MAGIC_BYTES)] == _MAGIC_BYTES:
                at = yield from _container_plan(image, at, size)
                padding = 0
            elif image[at : at + 8] == bytes(8):
                at += 8
                padding += 8
            else:
                break


def _container_plan(image, start: int, size: int) -> Generator[tuple[int, int], None, int]:
    """The plan for one container at `start`; returns the offset to look for the next one from."""
    yield start + _CONTAINER.size, start + _CONTAINER.size
    _, _, header_size, payload_size = _CONTAINER.unpack_from(image, start)
    end = start + header_size + payload_size
    if header_size != _CONTAINER.size or end > size:
        return start + 8  # not a container: a magic by chance
    entry = start + header_size
    while entry + _ENTRY_MIN_HEADER <= end:
        yield entry + _ENTRY_MIN_HEADER, entry + _ENTRY_MIN_HEADER
        kind, _, header_size, payload_size = _ENTRY.unpack_from(image, entry)[:4]
        payload = entry + header_size
        if kind not in (KIND_PTX, KIND_ELF) or header_size < _ENTRY_MIN_HEADER or payload + payload_size > end:
            return start + 8
        if kind == KIND_ELF:
            yield payload, payload + payload_size
        elif payload_size > _PTX_STORED_READ:
            yield payload + _PTX_STORED_READ, payload + payload_size
        entry = payload + payload_size
    return (end + 7) & ~7


def _open_elf(view: memoryview, left_out: Sequence[tuple[int, int]], name: str) -> ELFFile:
    """The ELF file in view, its section headers checked against its size.

    pyelftools reads a section's data as one `read(sh_size)`: a header claiming 1 TiB would ask for
    1 TiB of memory (MemoryError) before any check of ours ran.
    """
    try:
        # pyelftools only reads, seeks and tells; its annotation asks for IO[bytes], which no RawIOBase is
        elf = ELFFile(_BufferStream(view, left_out))  # type: ignore[arg-type]
        for section in elf.iter_sections():
            start, size = section["sh_offset"], section["sh_size"]
            if section["sh_type"] != "SHT_NOBITS" and start + size > len(view):
                raise AuditInputError(
                    f"{name}: section {section.name or '#' + str(section['sh_name'])} claims "
                    f"{size:,} bytes at offset {start:,}, past the file's end ({len(view):,} "
                    "bytes); the file is truncated or forged"
                )
    except ELFError as error:
        raise AuditInputError(f"{name}: not a readable ELF file ({error}); is it truncated?") from None
    return elf


def _fatbin_regions(elf: ELFFile, name: str) -> list[tuple[int, int]]:
    """(file offset, size) of the bytes holding fatbin containers."""
    section = elf.get_section_by_name(".nv_fatbin")
    if section is not None:
        if section["sh_type"] == "SHT_NOBITS":
            return []
        return [(section["sh_offset"], section["sh_size"])]
    # No .nv_fatbin: the fatbin wrappers still say where each container lives (another section).
    segment = elf.get_section_by_name(".nvFatBinSegment")
    if segment is None or segment["sh_type"] == "SHT_NOBITS":
        return []
    wrappers = segment.data()
    regions = []
    for at in range(0, len(wrappers) - _WRAPPER.size + 1, _WRAPPER.size):
        magic, _, address, _ = _WRAPPER.unpack_from(wrappers, at)
        if magic != WRAPPER_MAGIC:
            continue
        regions.append(_container_region(elf, address, name))
    return regions


def _container_region(elf: ELFFile, address: int, name: str) -> tuple[int, int]:
    """The file bytes of the single container a .nvFatBinSegment wrapper points at."""
    for section in elf.iter_sections():
        start = section["sh_addr"]
        if start and section["sh_type"] != "SHT_NOBITS" and start <= address < start + section["sh_size"]:
            file_offset = section["sh_offset"] + address - start
            stream = elf.stream
            stream.seek(file_offset)
            header = stream.read(_CONTAINER.size)
            if len(header) != _CONTAINER.size:
                break
            _, _, header_size, payload_size = _CONTAINER.unpack(header)
            return file_offset, header_size + payload_size
    raise AuditInputError(
        f"{name}: .nvFatBinSegment points at address {address:#x}, which no section holds; the fatbin cannot be located"
    )


def _parse_containers(data: memoryview, base: int, name: str, first_index: int) -> list[FatbinUnit]:
    units: list[FatbinUnit] = []
    at = 0
    while at + _CONTAINER.size <= len(data):
        magic, _, header_size, payload_size = _CONTAINER.unpack_from(data, at)
        if magic != CONTAINER_MAGIC:
            if not any(data[at : at + 8]):  # zero padding between containers of different objects
                at += 8
                continue
            raise AuditInputError(
                f"{name}: no fatbin container at offset {base + at:#x} "
                f"(magic {magic:#010x}); the .nv_fatbin section is corrupt"
            )
        end = at + header_size + payload_size
        if header_size < _CONTAINER.size or end > len(data):
            raise AuditInputError(
                f"{name}: fatbin container at offset {base + at:#x} claims {payload_size} bytes "
                f"past the end of its section; the .nv_fatbin section is truncated or corrupt"
            )
        sass, ptx = _parse_entries(data, at + header_size, end, base, name)
        if sass or ptx:  # an empty container (a device link without SASS) carries no code
            units.append(FatbinUnit(first_index + len(units), base + at, tuple(sass), tuple(ptx)))
        at = (end + 7) & ~7
    if any(data[at:]):
        raise AuditInputError(
            f"{name}: {len(data) - at} stray bytes at offset {base + at:#x} after the last "
            "fatbin container; the .nv_fatbin section is corrupt"
        )
    return units


def _parse_entries(data: memoryview, at: int, end: int, base: int, name: str) -> tuple[list[SassEntry], list[PtxEntry]]:
    sass: list[SassEntry] = []
    ptx: list[PtxEntry] = []
    while at < end:
        if at + _ENTRY_MIN_HEADER > end:
            raise AuditInputError(
                f"{name}: fatbin entry at offset {base + at:#x} is cut off by its container's end; "
                "the .nv_fatbin section is corrupt"
            )
        kind, _, header_size, payload_size, compressed_size, _, _, _, arch = _ENTRY.unpack_from(data, at)
        flags = struct.unpack_from("<Q", data, at + 40)[0]
        payload_start = at + header_size
        if header_size < _ENTRY_MIN_HEADER or payload_start + payload_size > end:
            raise AuditInputError(
                f"{name}: fatbin entry at offset {base + at:#x} (header {header_size} bytes, payload "
                f"{payload_size}) overruns its container; the .nv_fatbin section is corrupt"
            )
        variant = "a" if flags & FLAG_ARCH_SPECIFIC else "f" if flags & FLAG_FAMILY else ""
        payload = (base + payload_start, base + payload_start + payload_size)
        if kind == KIND_ELF:
            sass.append(SassEntry(arch, variant, payload))
        elif kind == KIND_PTX:
            stored = data[payload_start : payload_start + (compressed_size or payload_size)]
            head = _ptx_head(stored, flags, f"{name}: PTX entry at offset {base + at:#x}")
            ptx.append(PtxEntry(arch, variant, _ptx_isa(head, f"{name}: PTX entry at offset {base + at:#x}"), payload))
        else:
            raise AuditInputError(
                f"{name}: fatbin entry at offset {base + at:#x} has unknown kind {kind}; "
                "the .nv_fatbin section is corrupt"
            )
        at = payload_start + payload_size
    return sass, ptx


def _ptx_head(stored: memoryview, flags: int, where: str) -> bytes:
    """Enough of the PTX text to hold `.version` and `.target`: its first KiB, else 4, 16, 64 KiB, decoded
    from the first _PTX_STORED_READ bytes of the payload (a PTX text is MBs; its header lines come first)."""
    stored = stored[:_PTX_STORED_READ]
    head = b""
    for want in _PTX_HEAD_STEPS:
        try:
            if flags & FLAG_ZSTD:
                head = zstandard.ZstdDecompressor().stream_reader(stored).read(want)
            elif flags & FLAG_LZ4:
                head = _lz4_prefix(stored, want)
            else:
                head = bytes(stored[:want])
        except (zstandard.ZstdError, ValueError) as error:
            raise AuditInputError(
                f"{where}: compressed payload does not decompress ({error}); the fatbin is corrupt"
            ) from None
        if len(head) == want:  # cut off: a last line may be only half there
            head = head[: head.rfind(b"\n") + 1]
        if _VERSION_RE.search(head) and _TARGET_RE.search(head):
            break
    return head


def _lz4_prefix(block: memoryview, want: int) -> bytes:
    """The first `want` bytes a raw LZ4 block decodes to (fewer if it is shorter), reading only the
    sequences that produce them. Written out because the lz4 binding decodes only whole blocks (it has
    no LZ4_decompress_safe_partial); the format is lz4_Block_format.md of the lz4 sources."""
    out = bytearray()
    at = 0
    while len(out) < want and at < len(block):
        token = block[at]
        literals, at = _lz4_length(block, at + 1, token >> 4)
        if at + literals > len(block):
            raise ValueError(f"LZ4 literals run past the block's end at {at}")
        out += block[at : at + literals]
        at += literals
        if len(out) >= want or at == len(block):  # the last sequence has literals only
            break
        if at + 2 > len(block):
            raise ValueError(f"LZ4 match offset cut off at {at}")
        offset = block[at] | block[at + 1] << 8
        match, at = _lz4_length(block, at + 2, token & 15)
        if not 0 < offset <= len(out):
            raise ValueError(f"LZ4 match offset {offset} outside the {len(out)} bytes decoded")
        start, left = len(out) - offset, match + 4
        while left > 0:  # the match may overlap what it produces: copy at most `offset` bytes at a time
            piece = out[start : start + min(left, offset)]
            out += piece
            start += len(piece)
            left -= len(piece)
    return bytes(out[:want])


def _lz4_length(block: memoryview, at: int, length: int) -> tuple[int, int]:
    """A 4-bit length from a token, extended by bytes of 255 and one below when it is 15."""
    if length == 15:
        while True:
            if at >= len(block):
                raise ValueError("LZ4 length cut off by the block's end")
            extra = block[at]
            at += 1
            length += extra
            if extra != 255:
                break
    return length, at


def _ptx_isa(head: bytes, where: str) -> str:
    version = _VERSION_RE.search(head)
    if version is None or _TARGET_RE.search(head) is None:
        raise AuditInputError(f"{where}: no `.version`/`.target` line at the start of the PTX; the fatbin is corrupt")
    return version[1].decode()

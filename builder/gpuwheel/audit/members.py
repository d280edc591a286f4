"""The GPU code of a wheel's .so members, read straight from the wheel, several members at once.

Nothing is extracted to disk. A stored member is read in place: a view of the mapped wheel from the
member's first byte, so pyelftools and the fatbin parser touch only the pages of the ELF headers and
the sections they read. A deflated member has no random access (each byte may copy from the 32 KiB
before it), so reaching `.nv_fatbin` and the section headers after it means inflating all of it,
front to back: once, by ISA-L (4x zlib's speed here), into an anonymous mapping of its size in which
only what the parse will read is written — ELF headers and sections, fatbin headers, PTX heads — and
the cubins and PTX tails, 80-95% of a CUDA library, are never written, so never allocated.

Members are read by worker processes, one per core, the largest first, as long as the sizes of the
members being inflated (an upper bound of what they write) stay within a memory budget.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import struct
import zipfile
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path

from isal import isal_zlib

from gpuwheel.audit.fatbin import FatbinUnit, LeftOut, linked_cuda_runtime, map_file, read_fatbin, skip_plan
from gpuwheel.errors import AuditInputError, raise_if_refused

ELF_MAGIC = b"\x7fELF"
MEMORY_BUDGET = 1 << 30  # sizes of the members inflated at once; a larger member is read alone
# Compressed bytes read, and inflated bytes produced, per step: small buffers are reused from malloc's
# heap and stay in cache; 1 MiB / 256 KiB ones cost a page fault every 4 KiB and copies of the input
# left over, 0.84 instead of 0.69 CPU-s for the 470 MB of vLLM 0.14.0's _C.abi3.so (measured).
_READ = 64 << 10
_PIECE = 32 << 10
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra field length
_LOCAL_HEADER_MAGIC = b"PK\x03\x04"  # zipfile.stringFileHeader, which is not public

SoCode = tuple[tuple[FatbinUnit, ...], int | None]  # fatbin units, N of the libcudart.so.N it links


def read_so_members(wheels: Mapping[Path, Sequence[zipfile.ZipInfo]]) -> dict[tuple[Path, str], SoCode | None]:
    """(wheel, member name) → the member's fatbin units and linked CUDA runtime, or None when it is no ELF.

    Raises the error of the first bad member in the order given, as reading them one by one would.
    """
    jobs = [(wheel, member) for wheel, members in wheels.items() for member in members]
    # Largest first: the long inflations start at once, the small members fill in beside them.
    pending = deque(sorted(range(len(jobs)), key=lambda index: -jobs[index][1].file_size))
    slots = max(1, min(_cores(), len(jobs)))
    finished: dict[int, Future] = {}
    running: dict[Future, int] = {}
    held = 0
    first_failure = len(jobs)
    # Processes, not threads: the Python between two ISA-L calls holds the GIL, and on a busy machine the
    # threads wait on each other more than they run. Forked, they start with what is already imported.
    with ProcessPoolExecutor(slots, mp_context=multiprocessing.get_context("fork")) as pool:
        while pending or running:
            while (
                pending
                and len(running) < slots
                and (not running or held + _inflated_size(jobs[pending[0]][1]) <= MEMORY_BUDGET)
            ):
                index = pending.popleft()
                if index < first_failure:  # after a failure only members before it still matter
                    running[pool.submit(_read_member, *jobs[index])] = index
                    held += _inflated_size(jobs[index][1])
            for future in wait(running, return_when=FIRST_COMPLETED).done:
                index = running.pop(future)
                held -= _inflated_size(jobs[index][1])
                finished[index] = future
                if future.exception() is not None:
                    first_failure = min(first_failure, index)
    if first_failure < len(jobs):
        finished[first_failure].result()  # raises that member's exception
    return {(wheel, member.filename): finished[index].result() for index, (wheel, member) in enumerate(jobs)}


def _inflated_size(member: zipfile.ZipInfo) -> int:
    """What reading a member may hold in memory: its size when inflated (a stored one is read in place)."""
    return 0 if member.compress_type == zipfile.ZIP_STORED else member.file_size


def _cores() -> int:
    """The cores this process may run on (a container or taskset may allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _read_member(wheel: Path, member: zipfile.ZipInfo) -> SoCode | None:
    name = f"{wheel.name}:{member.filename}"
    try:
        with open(wheel, "rb") as file:
            start = _data_offset(file, member)
            if member.compress_type == zipfile.ZIP_STORED:
                image = memoryview(map_file(file))[start : start + member.file_size]
                return _read_image(image, name) if image[: len(ELF_MAGIC)] == ELF_MAGIC else None
            return _read_inflated(file, start, member, name)
    # isal's stub declares `error` an Exception instance; it is the exception class IsalError
    except (zipfile.BadZipFile, isal_zlib.error, EOFError, OSError) as error:  # type: ignore[misc]
        raise_if_refused(error)
        raise AuditInputError(f"{name}: cannot read this member ({error}); the wheel is corrupt") from None


def _read_inflated(file, start: int, member: zipfile.ZipInfo, name: str) -> SoCode | None:
    """Inflate leaving out what looks like cubins and PTX tails; if the parse needed any of it after all
    (a magic by chance), inflate again, whole."""
    inflated = _inflate(file, start, member, skip_unread=True)
    if inflated is None:
        return None
    image, left_out = inflated
    try:
        return read_fatbin(image, name, left_out), linked_cuda_runtime(image, name, left_out)
    except LeftOut:
        pass
    except AuditInputError:
        if not left_out:
            raise
        # Maybe only the zeros where left-out bytes belong: the whole image decides.
    whole = _inflate(file, start, member, skip_unread=False)
    if whole is None:  # not reached: the same bytes began with the ELF magic the first time
        return None
    return _read_image(whole[0], name)


def _read_image(image, name: str) -> SoCode:
    return read_fatbin(image, name), linked_cuda_runtime(image, name)


def _data_offset(file, member: zipfile.ZipInfo) -> int:
    """Where the member's bytes start: after its local header, whose name and extra field lengths may
    differ from the central directory's."""
    file.seek(member.header_offset)
    header = file.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size or header[:4] != _LOCAL_HEADER_MAGIC:
        raise zipfile.BadZipFile(f"no local file header at offset {member.header_offset}")
    if member.flag_bits & 0x1:
        raise zipfile.BadZipFile("the member is encrypted")
    _, name_length, extra_length = _LOCAL_HEADER.unpack(header)
    return member.header_offset + _LOCAL_HEADER.size + name_length + extra_length


def _inflate(
    file, start: int, member: zipfile.ZipInfo, *, skip_unread: bool
) -> tuple[mmap.mmap, list[tuple[int, int]]] | None:
    """The member's bytes in an anonymous mapping (freed when the last view of it goes), CRC-checked,
    and the spans left out of it (never written, so never even allocated); None as soon as the bytes
    do not start with the ELF magic."""
    size = member.file_size
    if size < len(ELF_MAGIC):
        return None
    image = mmap.mmap(-1, size)
    plan = skip_plan(image) if skip_unread else iter(())
    keep, drop = next(plan, (size, size))
    left_out: list[tuple[int, int]] = []
    at = crc = 0
    for piece in _inflated_pieces(file, start, member):
        if at + len(piece) > size:
            raise zipfile.BadZipFile(f"{member.filename!r} inflates past its recorded size {size}")
        crc = isal_zlib.crc32(piece, crc)
        view, used = memoryview(piece), 0
        while used < len(view):
            if at < keep:
                step = min(len(view) - used, keep - at)
                image[at : at + step] = view[used : used + step]
            elif at < drop:
                step = min(len(view) - used, drop - at)
            else:
                keep, drop = next(plan, (size, size))
                if drop > max(keep, at):
                    left_out.append((max(keep, at), drop))
                continue
            at += step
            used += step
        if at - len(piece) < len(ELF_MAGIC) <= at and image[: len(ELF_MAGIC)] != ELF_MAGIC:
            return None  # the magic just came in, and it is not ELF's: inflate no further
    if at != size:
        raise EOFError(f"{member.filename!r} inflates to {at} of its {size} bytes")
    if crc != member.CRC:
        raise zipfile.BadZipFile(f"Bad CRC-32 for file {member.filename!r}")
    return image, left_out


def _inflated_pieces(file, start: int, member: zipfile.ZipInfo) -> Iterator[bytes]:
    """The member's bytes, _PIECE at a time at most (a deflate stream may inflate 1000-fold)."""
    if member.compress_type != zipfile.ZIP_DEFLATED:  # bzip2, lzma: zipfile's reader (wheels hardly use them)
        with zipfile.ZipFile(file) as archive, archive.open(member) as source:
            yield from iter(lambda: source.read(_PIECE), b"")
        return
    inflater = isal_zlib.decompressobj(-15)  # raw deflate, as zip stores it
    file.seek(start)
    left = member.compress_size
    while left:
        data = file.read(min(left, _READ))
        if not data:
            raise EOFError(f"the wheel ends inside {member.filename!r}")
        left -= len(data)
        while data:
            yield inflater.decompress(data, _PIECE)
            data = inflater.unconsumed_tail
    yield inflater.flush()
    if not inflater.eof:
        raise EOFError(f"{member.filename!r} ends before its deflate stream does")

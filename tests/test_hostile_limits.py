"""Hostile inputs and interrupted runs, part two (issue 11): bounds on what an archive, a binary, a
wheel folder or a recipe can make gpuwheel do, and what a killed or concurrent run leaves behind.
Each case goes through the CLI: one line, the exit code of its kind, nothing written outside the
roots (the test's cache, wheels and index folders)."""

from __future__ import annotations

import errno
import io
import os
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from sources_helpers import demo_package, file_member, leftovers, sha256, stored, tarball


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line(result, code: int, text: str) -> None:
    assert result.exit_code == code, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert text in result.stderr, result.stderr


def _local_archive(tmp_path: Path, make_recipe, data: bytes, name: str = "demo-1.0.tar.gz") -> Path:
    (tmp_path / name).write_bytes(data)
    return make_recipe(tmp_path, package=[demo_package({"path": name, "sha256": sha256(data)})])


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


# ---- archives ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_an_archive_expanding_past_the_byte_limit_is_refused_before_anything_is_written(
        gpuwheel, make_recipe, cache, tmp_path, monkeypatch, kind):
    # 4 MiB of zeros compress to a few KiB: the ratio of an archive bomb, at a test's scale.
    zeros = b"\0" * (4 << 20)
    data = (tarball([file_member("demo-1.0/zeros", zeros)]) if kind == "tar"
            else _zip({"demo-1.0/zeros": zeros}))
    assert len(data) < 64 << 10
    recipe = _local_archive(tmp_path, make_recipe, data, "demo-1.0.tar.gz" if kind == "tar" else "demo-1.0.zip")
    monkeypatch.setenv("GPUWHEEL_MAX_EXTRACT_BYTES", str(1 << 20))
    result = gpuwheel("fetch", recipe)
    _one_line(result, 4, f"expands to {4 << 20:,} bytes, over the limit of {1 << 20:,}; refused, nothing extracted")
    assert "raise GPUWHEEL_MAX_EXTRACT_BYTES" in result.stderr
    assert stored(cache) == [] and leftovers(cache) == []
    monkeypatch.delenv("GPUWHEEL_MAX_EXTRACT_BYTES")  # the default takes it
    assert gpuwheel("fetch", recipe).exit_code == 0


def test_an_archive_of_too_many_members_is_refused(gpuwheel, make_recipe, cache, tmp_path, monkeypatch):
    recipe = _local_archive(tmp_path, make_recipe, tarball([file_member(f"demo-1.0/f{i}") for i in range(20)]))
    monkeypatch.setenv("GPUWHEEL_MAX_EXTRACT_MEMBERS", "10")
    _one_line(gpuwheel("fetch", recipe), 4, "demo-1.0.tar.gz holds more than 10 members; refused, nothing extracted")
    assert stored(cache) == [] and leftovers(cache) == []
    monkeypatch.setenv("GPUWHEEL_MAX_EXTRACT_MEMBERS", "lots")
    _one_line(gpuwheel("fetch", recipe), 4, "GPUWHEEL_MAX_EXTRACT_MEMBERS='lots' must be a positive whole number")


def test_a_full_disk_while_extracting_says_so_not_damaged_archive(gpuwheel, make_recipe, cache, tmp_path,
                                                                   monkeypatch):
    from gpuwheel import sources

    recipe = _local_archive(tmp_path, make_recipe, tarball([file_member("demo-1.0/setup.py", b"x" * 1000)]))

    def full(self, tarinfo, targetpath):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), targetpath)
    monkeypatch.setattr(sources.tarfile.TarFile, "makefile", full)
    result = gpuwheel("fetch", recipe)
    _one_line(result, 4, "extracting demo-1.0.tar.gz into")
    assert "failed: No space left on device; kept nothing (free space there" in result.stderr
    assert "damaged" not in result.stderr
    assert stored(cache) == [] and leftovers(cache) == []


@pytest.mark.parametrize("kept", [20, 50])
def test_a_gzip_cut_short_in_its_first_block_is_a_damaged_archive_not_aborted(gpuwheel, make_recipe, cache,
                                                                             tmp_path, kept):
    whole = tarball([file_member("demo-1.0/setup.py", os.urandom(4096))])
    recipe = _local_archive(tmp_path, make_recipe, whole[:kept])
    result = gpuwheel("fetch", recipe)  # click printed "Aborted!" for the EOFError of tarfile.is_tarfile
    _one_line(result, 4, "demo 1.0: demo-1.0.tar.gz is a damaged archive (EOFError: Compressed file ended")
    assert stored(cache) == [] and leftovers(cache) == []


# ---- binaries and wheel folders ------------------------------------------------------------------
def _elf_claiming(tmp_path: Path, section: str, size: int) -> Path:
    """A real shared object whose `section` header claims `size` bytes."""
    from elftools.elf.elffile import ELFFile

    source = tmp_path / "f.c"
    source.write_text(f'__attribute__((section("{section}"))) const char data[64] = {{1}};\n'
                      "int f(void) { return data[0]; }\n")
    built = tmp_path / "built.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(built), str(source)], check=True)
    image = bytearray(built.read_bytes())
    with open(built, "rb") as file:
        elf = ELFFile(file)
        (index,) = [i for i, s in enumerate(elf.iter_sections()) if s.name == section]
        struct.pack_into("<Q", image, elf["e_shoff"] + index * elf["e_shentsize"] + 32, size)  # Elf64_Shdr.sh_size
    forged = tmp_path / "forged.so"
    forged.write_bytes(bytes(image))
    return forged


@pytest.mark.parametrize("section", [".nv_fatbin", ".nvFatBinSegment", ".dynamic"])
def test_a_section_header_claiming_a_tebibyte_is_refused_against_the_file_size(gpuwheel, tmp_path, section):
    forged = _elf_claiming(tmp_path, section, 1 << 40)
    result = gpuwheel("audit", forged, "--arch", "9.0")
    _one_line(result, 10, f"forged.so: section {section} claims 1,099,511,627,776 bytes at offset")
    assert "the file is truncated or forged" in result.stderr


def _gpuwheel_process(
        args: list, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """The CLI in its own process: a hang fails the test at the timeout instead of stalling it."""
    return subprocess.run([sys.executable, "-m", "gpuwheel", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_a_fifo_named_like_a_wheel_neither_hangs_audit_nor_publish(tmp_path):
    wheels, index = tmp_path / "wheels", tmp_path / "index"
    wheels.mkdir()
    fifo = wheels / "demo-1.0-py3-none-any.whl"
    os.mkfifo(fifo)
    for args, code in ((["audit", fifo, "--arch", "9.0"], 10), (["audit", wheels, "--arch", "9.0"], 10),
                       (["publish", "--wheels", wheels, "--index-dir", index, "--force"], 10)):
        result = _gpuwheel_process(args)
        assert result.returncode == code, result.stderr
        assert f"{fifo}: is a FIFO (named pipe), not a regular file" in result.stderr
        assert result.stderr.count("\n") == 1
    assert not index.exists()


# ---- recipes and numbers -------------------------------------------------------------------------
def test_a_recipe_nested_thousands_deep_is_a_recipe_error(gpuwheel, make_recipe, tmp_path):
    # Literal text: the hostile input is the TOML itself (no TOML writer nests 5000 deep).
    recipe = make_recipe(tmp_path, text='extends = "h100"\n' + "x = " + "[" * 5000 + "]" * 5000 + "\n")
    _one_line(gpuwheel("plan", recipe), 2, "recipe.toml: arrays or inline tables nested too deeply to read")


def test_huge_job_counts_are_refused(gpuwheel, make_recipe, tmp_path):
    recipe = make_recipe(tmp_path, extends="h100", build={"jobs": 100000000000})
    _one_line(gpuwheel("plan", recipe), 2,
              f"recipe.toml:{make_recipe.line(recipe, 'jobs = ')}: build.jobs must be from 1 to 1024, got 100000000000")
    result = gpuwheel("plan", "h100", "--jobs", "99999")
    assert result.exit_code == 2 and "99999 is not in the range 1<=x<=1024" in result.stderr


def test_a_cache_that_is_a_file_is_named_with_its_fix(gpuwheel, tmp_path, monkeypatch):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder belongs\n")
    monkeypatch.setenv("GPUWHEEL_CACHE", str(blocker))
    result = gpuwheel("fetch", "h100", "--offline")
    _one_line(result, 15, f"cannot write {blocker}/sources")
    assert f"the cache {blocker} (GPUWHEEL_CACHE) must be a folder you can write" in result.stderr
    assert blocker.read_text() == "a file where the cache folder belongs\n"


# ---- killed and concurrent runs ------------------------------------------------------------------
def test_a_killed_fetchs_leftovers_go_with_the_next_fetch_under_the_same_lock(gpuwheel, make_recipe, cache,
                                                                              tmp_path):
    data = tarball([file_member("demo-1.0/setup.py", b"print('demo')\n")])
    recipe = _local_archive(tmp_path, make_recipe, data)
    key, other = sha256(data), "f" * 64
    sources = cache / "sources"
    # What a SIGKILLed fetch of this archive leaves: a half-extracted tree and a download's part file,
    # under the temp names gpuwheel gives them; and another source's, whose fetch may be running now.
    half = sources / "trees" / f".tmp-{key}-k1ll3d"
    (half / "demo-1.0").mkdir(parents=True)
    (half / "demo-1.0" / "half.o").write_bytes(b"\0" * 4096)
    part = sources / "archives" / key / ".tmp-x1.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"half a download")
    running = sources / "trees" / f".tmp-{other}-l1ve"
    running.mkdir(parents=True)

    result = gpuwheel("fetch", recipe)
    assert result.exit_code == 0, result.stderr
    assert not half.exists() and not part.exists()
    assert running.is_dir()  # not under this fetch's lock: maybe another fetch's work in progress
    assert (sources / "trees" / key / "demo-1.0" / "setup.py").is_file()


def test_a_killed_finishs_half_written_staging_goes_with_the_next_finish_of_the_target(gpuwheel, cache, tmp_path):
    staging = tmp_path / "staging"
    half, others = staging / ".gpuwheel-finish-h100-k1ll3d", staging / ".gpuwheel-finish-b200-l1ve"
    for folder in (half, others):
        folder.mkdir(parents=True)
        (folder / "0").write_bytes(b"half a wheel")
    raw = tmp_path / "flash_attn-2.8.3-cp312-cp312-linux_x86_64.whl"
    raw.write_bytes(b"not a zip")
    result = gpuwheel("finish", "h100", raw, "--out", staging)
    assert result.exit_code == 10, result.stderr  # the finish fails on the raw wheel, after its sweep
    assert not half.exists()
    assert others.is_dir()  # another target's finish into the same folder may be running


HOLDER = """
import sys, time
from pathlib import Path
from gpuwheel.cache import target_lock
with target_lock(sys.argv[1]):
    Path(sys.argv[2]).write_text("held")
    while not Path(sys.argv[3]).exists():
        time.sleep(0.05)
"""


def test_a_second_build_of_a_target_waits_for_the_first_and_says_for_whom(tmp_path, monkeypatch):
    env = {**os.environ, "GPUWHEEL_CACHE": str(tmp_path / "cache"), "CUDA_HOME": str(tmp_path / "no-cuda")}
    held, release = tmp_path / "held", tmp_path / "release"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, "h100", held, release], env=env)
    try:
        deadline = time.monotonic() + 30
        while not held.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        second = subprocess.Popen([sys.executable, "-m", "gpuwheel", "build", "h100", "--backend", "local"],
                                  env=env, stderr=subprocess.PIPE, text=True)
        waiting = second.stderr.readline()
        assert waiting.startswith(f"waiting for the other build of h100 on this machine (pid {holder.pid}) "
                                  "to finish"), waiting
        time.sleep(0.5)
        assert second.poll() is None  # still waiting: it touched nothing of the first's
        release.write_text("")
        rest = second.communicate(timeout=120)[1]
    finally:
        release.write_text("")
        holder.wait(timeout=30)
    # Once the lock was free it went on, to the toolchain check this machine fails.
    assert second.returncode == 7, rest
    assert "CUDA_HOME=" in rest and "Traceback" not in rest

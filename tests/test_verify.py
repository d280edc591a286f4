"""`gpuwheel verify WHEEL`: a finished wheel rebuilt from its provenance and lock is the same bytes; a
tampered one is named member by member (ELF section, first differing byte), and what cannot be rebuilt
is refused in one line with the exit code of its kind."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from packaging.utils import parse_wheel_filename
from packaging.version import Version

from wheels_helpers import write_wheel
from build_helpers import SHARED_CACHE, fixture_recipe
from gpuwheel.wheeldiff import compare_wheels
from wheels_helpers import rewrite_member

LIBRARY = """
const char *gw_greeting(void) { return "%s"; }
int gw_add(int a, int b) { return a + b; }
"""


def _library(directory: Path, greeting: str) -> Path:
    """A real shared library whose .rodata holds `greeting` (same length: only that section's bytes differ)."""
    directory.mkdir(parents=True, exist_ok=True)
    source = directory / "greeting.c"
    source.write_text(LIBRARY % greeting)
    out = directory / "libgreeting.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-Wl,--build-id=none", str(source), "-o", str(out)],
                   check=True, capture_output=True, text=True)
    return out


def _section_of(data: bytes, name: str) -> tuple[int, int]:
    section = ELFFile(io.BytesIO(data)).get_section_by_name(name)
    return section["sh_offset"], section["sh_size"]


def _wheel(directory: Path, library: Path, *, config: str = "heads = 128\n", extra: dict | None = None) -> Path:
    return write_wheel(directory, "gwdiff", "1.0", {"gwdiff/libgreeting.so": library, "gwdiff/config.toml":
                                                    config.encode(), "gwdiff/__init__.py": b"", **(extra or {})})


# ---- the comparison, on wheels made here ---------------------------------------------------------------
def test_two_wheels_differing_in_one_elf_section_name_it_and_the_first_byte(tmp_path):
    first = _wheel(tmp_path / "a", _library(tmp_path / "liba", "hello"))
    second = _wheel(tmp_path / "b", _library(tmp_path / "libb", "hellp"))

    diff = compare_wheels(first, second)

    assert not diff.same
    so, record = diff.members  # the library, and RECORD (which hashes it)
    assert (so.name, so.change, so.kind) == ("gwdiff/libgreeting.so", "changed", "elf")
    assert [s.name for s in so.sections] == [".rodata"]
    offset, size = _section_of(_library(tmp_path / "liba", "hello").read_bytes(), ".rodata")
    assert offset <= so.first_offset < offset + size
    assert so.at_section == f".rodata+{so.first_offset - offset:#x}"
    assert "68 65 6c 6c 6f" in so.excerpts[0] and "68 65 6c 6c 70" in so.excerpts[1]  # "hello", "hellp"
    assert so.summary().startswith("gwdiff/libgreeting.so: same size (")
    assert "ELF sections differ: .rodata; first differing byte at" in so.summary()
    assert record.name.endswith(".dist-info/RECORD") and record.kind == "text"


def test_a_text_member_that_differs_shows_a_unified_diff(tmp_path):
    library = _library(tmp_path / "lib", "hello")
    first = _wheel(tmp_path / "a", library, config="heads = 128\ndtype = 'bf16'\n")
    second = _wheel(tmp_path / "b", library, config="heads = 64\ndtype = 'bf16'\n")

    diff = compare_wheels(first, second)

    config = next(m for m in diff.members if m.name == "gwdiff/config.toml")
    assert config.kind == "text" and config.sections == ()
    assert "-heads = 128" in config.diff and "+heads = 64" in config.diff
    assert config.summary() == ("gwdiff/config.toml: size 27 → 26 bytes; text, 2 line(s) differ; first differing "
                                "byte at 0x8")
    assert [m.name for m in diff.members] == ["gwdiff/config.toml", "gwdiff-1.0.dist-info/RECORD"]


def test_a_text_member_the_other_extends_differs_where_the_shorter_ends(tmp_path):
    library = _library(tmp_path / "lib", "hello")
    first = _wheel(tmp_path / "a", library, config="heads = 128\n")
    second = _wheel(tmp_path / "b", library, config="heads = 128\ndtype = 'bf16'\n")

    config = next(m for m in compare_wheels(first, second).members if m.name == "gwdiff/config.toml")

    assert config.kind == "text" and config.first_offset == len("heads = 128\n")
    assert "+dtype = 'bf16'" in config.diff


def test_an_added_and_a_removed_member_are_named(tmp_path):
    library = _library(tmp_path / "lib", "hello")
    first = _wheel(tmp_path / "a", library, extra={"gwdiff/old.txt": b"gone\n"})
    second = _wheel(tmp_path / "b", library, extra={"gwdiff/_C.so": library.read_bytes()})

    diff = compare_wheels(first, second)

    changes = {m.name: (m.change, m.kind, m.sizes) for m in diff.members}
    size = library.stat().st_size
    assert changes["gwdiff/_C.so"] == ("added", "elf", (None, size))
    assert changes["gwdiff/old.txt"] == ("removed", "text", (5, None))
    assert next(m for m in diff.members if m.name == "gwdiff/_C.so").summary() == f"gwdiff/_C.so: added ({size:,} bytes)"


def test_the_same_members_in_another_archive_say_how_the_zip_differs(tmp_path):
    first = _wheel(tmp_path / "a", _library(tmp_path / "lib", "hello"))
    second = tmp_path / "b" / first.name
    second.parent.mkdir()
    with zipfile.ZipFile(first) as old, zipfile.ZipFile(second, "w", zipfile.ZIP_DEFLATED) as new:
        for info in old.infolist():
            info.date_time = (2020, 1, 1, 0, 0, 0)
            new.writestr(info, old.read(info))

    diff = compare_wheels(first, second)

    assert diff.members == ()
    written = zipfile.ZipFile(first).getinfo("gwdiff/libgreeting.so").date_time
    assert diff.archive[0] == f"gwdiff/libgreeting.so: timestamp {written} → (2020, 1, 1, 0, 0, 0)"
    assert compare_wheels(first, first).same


# ---- gpuwheel verify: refusals before anything is built ----------------------------------------------------
@pytest.fixture(scope="module")
def locked_dir(locked) -> Path:
    """The folder of the fixture recipe and the lock `gpuwheel lock` wrote for it (conftest's `locked`)."""
    return locked[0].parent


def _error_line(result) -> str:
    [line] = [line for line in result.stderr.splitlines() if line.startswith("gpuwheel: error:")]
    return line


def _recording_wheel(directory: Path, provenance: dict) -> Path:
    """A wheel whose gpuwheel.json says what a finished one would (the refusals read nothing else)."""
    return write_wheel(directory, "gwfixture", "0.1.0", {"gwfixture/__init__.py": b""}, provenance=provenance)


def _fixture_plan_hash(recipe: Path) -> str:
    from gpuwheel.plan import make_plan
    from gpuwheel.recipe import load_recipe

    return make_plan(load_recipe(recipe)).hash


def test_a_wheel_without_provenance_is_refused(gpuwheel, tmp_path):
    wheel = write_wheel(tmp_path, "gwfixture", "0.1.0", {"gwfixture/__init__.py": b""})

    result = gpuwheel("verify", wheel)

    assert result.exit_code == 10
    assert _error_line(result) == ("gpuwheel: error: gwfixture-0.1.0-cp311-cp311-linux_x86_64.whl: no "
                                   "gwfixture-0.1.0.dist-info/gpuwheel.json; gpuwheel did not finish this wheel, so "
                                   "nothing says how to rebuild it (verify wheels that `gpuwheel build` made)")


def test_a_wheel_naming_a_path_for_its_target_is_refused_before_any_recipe_is_read(gpuwheel, tmp_path):
    wheel = _recording_wheel(tmp_path, {"target": "../../etc/x", "plan_hash": "0" * 64,
                                        "package": {"name": "gwfixture"}})

    result = gpuwheel("verify", wheel)

    assert result.exit_code == 10
    assert "its gpuwheel.json has no usable target ('../../etc/x')" in _error_line(result)


def test_a_wheel_whose_target_is_not_on_the_recipe_path_is_refused(gpuwheel, tmp_path, locked_dir):
    wheel = _recording_wheel(tmp_path, {"target": "fixture", "plan_hash": _fixture_plan_hash(locked_dir / "fixture.toml"),
                                        "package": {"name": "gwfixture"}})

    result = gpuwheel("verify", wheel)

    assert result.exit_code == 2
    assert _error_line(result) == ("gpuwheel: error: gwfixture-0.1.0-cp311-cp311-linux_x86_64.whl was built for "
                                   "target 'fixture': unknown target 'fixture' (put its recipe on the recipe path "
                                   "(gpuwheel --recipes DIR verify …, or GPUWHEEL_RECIPES), or name it: --target RECIPE)")


def test_a_lock_of_another_plan_is_refused_naming_both_plans(gpuwheel, tmp_path, locked_dir, make_recipe):
    # the wheel was built when the recipe said 12.0 only
    other = _fixture_plan_hash(make_recipe(tmp_path, **fixture_recipe(archs="12.0")))
    wheel = _recording_wheel(tmp_path / "wheel", {"target": "fixture", "plan_hash": other,
                                                  "package": {"name": "gwfixture"}})

    result = gpuwheel("--recipes", locked_dir, "verify", wheel)

    assert result.exit_code == 21
    lock_hash = _fixture_plan_hash(locked_dir / "fixture.toml")
    assert _error_line(result) == (
        f"gpuwheel: error: {locked_dir / 'fixture.lock'} locks plan {lock_hash[:16]}, {wheel.name} was built from plan "
        f"{other[:16]}; the recipe gives neither now (verify with the lock and recipes of the commit that built the "
        "wheel (--lock LOCK, --recipes DIR))")


def test_a_recipe_changed_since_the_lock_and_the_wheel_names_the_drift(gpuwheel, tmp_path, locked_dir, make_recipe):
    recipes = tmp_path / "recipes"
    make_recipe(recipes, **fixture_recipe(archs="12.0"))
    wheel = _recording_wheel(tmp_path, {"target": "fixture", "plan_hash": _fixture_plan_hash(locked_dir / "fixture.toml"),
                                        "package": {"name": "gwfixture"}})

    result = gpuwheel("verify", wheel, "--target", recipes / "fixture.toml", "--lock", locked_dir / "fixture.lock")

    assert result.exit_code == 21
    assert "the lock is stale: target.torch_cuda_arch_list is '12.0' now, '9.0a;12.0' in the lock" \
        in _error_line(result)


def test_wheels_of_two_builds_or_a_recipe_of_another_target_are_refused(gpuwheel, tmp_path, locked_dir):
    plan = _fixture_plan_hash(locked_dir / "fixture.toml")
    first = _recording_wheel(tmp_path / "a", {"target": "fixture", "plan_hash": plan, "package": {"name": "gwfixture"}})
    second = _recording_wheel(tmp_path / "b", {"target": "other", "plan_hash": plan, "package": {"name": "gwfixture"}})

    two_builds = gpuwheel("--recipes", locked_dir, "verify", first, second)
    other_recipe = gpuwheel("verify", second, "--target", locked_dir / "fixture.toml")

    assert two_builds.exit_code == 10
    assert _error_line(two_builds) == (f"gpuwheel: error: the wheels record 2 builds (fixture plan {plan[:16]}, other "
                                       f"plan {plan[:16]}) (verify the wheels of one build at a time)")
    assert other_recipe.exit_code == 2
    no_package = gpuwheel("--recipes", locked_dir, "verify", _recording_wheel(tmp_path / "c", {
        "target": "fixture", "plan_hash": plan, "package": {"name": "vllm"}}))
    assert no_package.exit_code == 2
    assert _error_line(no_package) == (f"gpuwheel: error: {locked_dir / 'fixture.toml'}: no package 'vllm', which "
                                       "gwfixture-0.1.0-cp311-cp311-linux_x86_64.whl is (name the recipe the wheel "
                                       "was built from (--target RECIPE))")
    assert _error_line(other_recipe) == (f"gpuwheel: error: {locked_dir / 'fixture.toml'} is the recipe of target "
                                         f"'fixture', {second.name} was built for target 'other' (name the recipe "
                                         "the wheel was built from)")


# ---- gpuwheel verify: a real rebuild ------------------------------------------------------------------------
def _tampered(wheel: Path, out: Path, section: str) -> tuple[Path, str]:
    """The wheel with one byte of its .so's `section` flipped, RECORD recorded again by gpuwheel's own
    deterministic repack (so that it is still a valid wheel, the same in every other byte)."""
    from gpuwheel.wheelfile import repack

    with zipfile.ZipFile(wheel) as archive:
        [member] = [n for n in archive.namelist() if n.endswith(".so")]
        data = bytearray(archive.read(member))
        provenance_name = next(n for n in archive.namelist() if n.endswith(".dist-info/gpuwheel.json"))
        provenance = json.loads(archive.read(provenance_name))
    offset, size = _section_of(bytes(data), section)
    data[offset + size // 2] ^= 0xFF
    out.parent.mkdir(parents=True, exist_ok=True)
    edited = rewrite_member(wheel, out.parent / "edited.whl", {member: bytes(data)})
    dist_info = provenance_name.split("/")[0]
    _, version, _, tags = parse_wheel_filename(wheel.name)
    repack(edited, out, {dist_info: dist_info}, Version(str(version)), set(tags), provenance,
            provenance["wheel"]["source_date_epoch"])
    return out, member


def _record_mismatches(wheel: Path) -> list[str]:
    """The members whose bytes RECORD does not hash (what pip checks on install)."""
    with zipfile.ZipFile(wheel) as archive:
        [record] = [n for n in archive.namelist() if n.endswith(".dist-info/RECORD")]
        rows = list(csv.reader(io.StringIO(archive.read(record).decode())))
        return [name for name, digest, _ in rows if digest and digest != "sha256=" + base64.urlsafe_b64encode(
            hashlib.sha256(archive.read(name)).digest()).rstrip(b"=").decode()]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH: the rebuild compiles CUDA code")
def test_verify_rebuilds_a_locked_wheel_to_the_same_bytes_and_names_a_tampered_section(gpuwheel, monkeypatch,
                                                                                       tmp_path, locked_dir):
    monkeypatch.setenv("GPUWHEEL_CACHE", str(SHARED_CACHE))
    out = tmp_path / "staging"
    built = gpuwheel("build", locked_dir / "fixture.toml", "--backend", "local", "--locked", "--out", out, "--json")
    assert built.exit_code == 0, built.stderr
    [wheel] = out.glob("*.whl")

    verified = gpuwheel("--recipes", locked_dir, "verify", wheel)

    assert verified.exit_code == 0, verified.stderr
    assert f"✓ {wheel.name}: the same sha256 {hashlib.sha256(wheel.read_bytes()).hexdigest()}" in verified.stdout
    assert sorted(p.name for p in out.iterdir()) == [wheel.name]  # the rebuild went to the cache, not here

    tampered, member = _tampered(wheel, tmp_path / "tampered" / wheel.name, ".text")
    assert _record_mismatches(tampered) == []  # still a valid wheel: RECORD hashes the tampered .so

    result = gpuwheel("--recipes", locked_dir, "verify", tampered)

    assert result.exit_code == 22
    assert _error_line(result).startswith(f"gpuwheel: error: {wheel.name}: the rebuild is not the same bytes: "
                                          f"{member}: same size (")
    assert "ELF sections differ: .text; first differing byte at" in _error_line(result)
    assert f"  {member}: same size (" in result.stdout
    assert "    wheel:   0x" in result.stdout and "    rebuilt: 0x" in result.stdout
    report = gpuwheel("verify", tampered, "--target", locked_dir / "fixture.toml", "--json")
    assert report.exit_code == 22
    [check] = report.json()["wheels"]
    assert [(m["name"], m["at_section"].split("+")[0]) for m in check["diff"]["members"] if m["kind"] == "elf"] == \
        [(member, ".text")]
    assert Path(check["rebuilt"]).read_bytes() == wheel.read_bytes()
    if shutil.which("diffoscope"):
        assert Path(check["diffoscope"]).read_text().startswith(f"--- {tampered}")
    else:
        assert check["diffoscope_note"].startswith("diffoscope is not installed")

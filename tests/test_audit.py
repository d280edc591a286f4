"""The arch audit on real nvcc 13.0 binaries: what a user sees for each way a wheel can be built."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zipfile
from pathlib import Path

import lz4.block
import pytest
from click.testing import CliRunner
from elftools.elf.elffile import ELFFile
from hypothesis import given, settings
from hypothesis import strategies as st

from audit_helpers import (GOLDEN, build_fixtures, cuobjdump_listing, golden_fixture_wheels, golden_target,
                           nvcc_version, our_listing, verdict_digests)
from gpuwheel import facts
from gpuwheel.audit import fatbin
from gpuwheel.audit.fatbin import LeftOut, PtxEntry, SassEntry, _lz4_prefix, read_fatbin, read_fatbin_units
from gpuwheel.audit.report import AuditTarget, audit, ptx_jits_on, sass_runs_on
from gpuwheel.cli import main
from gpuwheel.errors import AuditFailure, AuditInputError
from wheels_helpers import write_wheel

RTX6000PRO_DRIVER = "570.195.03"
R580 = "580.65.06"


@pytest.fixture(scope="session")
def sos(tmp_path_factory) -> dict[str, Path]:
    """Every fixture .so, compiled once per test session."""
    return build_fixtures(tmp_path_factory.mktemp("audit-fixtures"))


def target(arch: str, driver: str | None = None, optional: tuple[str, ...] = ()) -> AuditTarget:
    return AuditTarget(facts.parse_arch(arch), driver, optional)


def verdicts(path: Path, arch: str, driver: str | None = None) -> list[str]:
    return [unit.verdict for unit in audit(path, target(arch, driver)).sos[0].units]


def run_cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


# ---- the parser against cuobjdump --------------------------------------------------------------

@pytest.mark.parametrize("name", ["sm90a", "sm120", "ptx80", "compressed_zstd", "compressed_lz4", "variants", "mixed"])
def test_sass_and_ptx_lists_equal_cuobjdumps(sos, name):
    units = read_fatbin_units(sos[name])
    assert units, "every fixture carries GPU code"
    assert our_listing(units) == cuobjdump_listing(sos[name])


def test_ptx_isa_is_read_from_the_ptx_text_whatever_the_compression(sos):
    for name in ("ptx80", "compressed_zstd", "compressed_lz4"):
        isas = {entry.isa for unit in read_fatbin_units(sos[name]) for entry in unit.ptx}
        assert isas == {"9.0"}, name  # nvcc 13.0 writes PTX ISA 9.0


def test_variants_carry_their_suffix(sos):
    entries = {(e.name) for unit in read_fatbin_units(sos["variants"]) for e in (*unit.sass, *unit.ptx)}
    assert {"sm_100f", "sm_120a", "compute_90a"} <= entries


def test_fatbin_found_through_nvfatbinsegment_when_the_section_is_renamed(sos):
    assert read_fatbin_units(sos["moved"])  # .nv_fatbin renamed: wrappers lead to the containers
    moved = [(u.sass, u.ptx) for u in read_fatbin_units(sos["moved"])]
    assert moved == [(u.sass, u.ptx) for u in read_fatbin_units(sos["compressed_zstd"])]


@settings(max_examples=200, deadline=None)
@given(text=st.binary(max_size=20000) | st.text(alphabet=".version 9.0\n.target sm_80 {}[];%r", max_size=20000)
       .map(str.encode), want=st.integers(min_value=1, max_value=30000))
def test_lz4_prefix_is_the_start_of_what_the_lz4_library_decodes(text, want):
    block = lz4.block.compress(text, store_size=False)
    assert _lz4_prefix(memoryview(block), want) == lz4.block.decompress(block, uncompressed_size=len(text))[:want]


# ---- verdicts ------------------------------------------------------------------------------------

def test_sm120_build_runs_natively_on_rtx6000pro(sos):
    report = audit(sos["sm120"], target("12.0", RTX6000PRO_DRIVER))
    assert report.passed
    assert set(verdicts(sos["sm120"], "12.0")) == {"native"}
    assert set(verdicts(sos["sm120"], "12.1")) == {"native"}  # a later minor of the same major
    assert set(verdicts(sos["sm120"], "10.0")) == {"none"}


def test_a_linked_cuda_13_runtime_fails_on_a_570_driver_whatever_its_kernels(sos):
    """Native sm_120 SASS, but libcudart.so.13 will not initialise on driver 570 (CUDA 12.8)."""
    path = sos["sm120_shared_cudart"]
    assert set(verdicts(path, "12.0")) == {"native"}
    report = audit(path, target("12.0", RTX6000PRO_DRIVER))
    assert not report.passed
    assert report.sos[0].cuda_runtime == 13
    assert ("links libcudart.so.13, which needs driver ≥ 580.65.06 (target driver 570.195.03); "
            "build with CUDA ≤ 12.8") in report.problems[0]
    assert audit(path, target("12.0", "580.65.06")).passed
    assert audit(path, target("12.0")).passed  # no driver given: nothing to judge the runtime by
    # a statically linked runtime is not visible here: the plan's toolkit/driver check covers it
    assert audit(sos["sm120"], target("12.0", RTX6000PRO_DRIVER)).passed


def test_sm90a_only_runs_on_exactly_9_0(sos):
    assert set(verdicts(sos["sm90a"], "9.0")) == {"native"}
    report = audit(sos["sm90a"], target("12.0", RTX6000PRO_DRIVER))
    assert not report.passed
    assert set(unit.verdict for unit in report.sos[0].units) == {"none"}
    assert "none of its 2 fatbin units runs on 12.0 (it carries sm_90a)" in report.problems[0]


def test_compute_80_ptx_from_cuda_13_fails_on_a_570_driver(sos):
    report = audit(sos["ptx80"], target("12.0", RTX6000PRO_DRIVER))
    (unit,) = report.sos[0].units
    assert (unit.verdict, unit.runs_as, unit.ptx_isa, unit.jit_min_driver) == ("jit", "compute_80", "9.0", R580)
    assert "PTX ISA 9.0 cannot be JIT-compiled by driver 570.195.03" in unit.problem
    assert not report.passed and report.sos[0].verdict == "fail"


def test_compute_80_ptx_passes_with_a_driver_that_reads_it(sos):
    assert audit(sos["ptx80"], target("12.0", R580)).passed
    unchecked = audit(sos["ptx80"], target("12.0"))  # no driver: JIT reported, not judged
    assert unchecked.passed and not unchecked.driver_checked and unchecked.sos[0].count("jit") == 1


def test_compressed_payloads_judged_like_plain_ones(sos):
    for name in ("compressed_zstd", "compressed_lz4"):
        report = audit(sos[name], target("12.0", RTX6000PRO_DRIVER))
        assert report.passed and report.sos[0].ptx_isa_range == "9.0", name
        assert set(verdicts(sos[name], "8.9")) == {"none"}, name  # compute_120 PTX does not JIT for an older GPU


def test_family_and_arch_specific_variants(sos):
    assert verdicts(sos["variants"], "10.3")[-1] == "native"  # sm_100f runs on 10.3
    assert verdicts(sos["variants"], "12.0")[-1] == "native"  # sm_120a on exactly 12.0
    assert verdicts(sos["variants"], "12.1")[-1] == "none"  # sm_120a not on 12.1; compute_90a PTX only on 9.0
    nine = audit(sos["variants"], target("9.0", R580)).sos[0].units[-1]
    assert (nine.verdict, nine.runs_as) == ("jit", "compute_90a")


def test_each_unit_of_a_mixed_so_judged_on_its_own(sos):
    report = audit(sos["mixed"], target("12.0", RTX6000PRO_DRIVER))
    units = report.sos[0].units
    # The device-link unit (nvcc's default sm_75), then one unit per object in link order.
    assert [(u.verdict, u.sass, u.ptx) for u in units] == [
        ("none", ("sm_75",), ()),
        ("none", ("sm_90a",), ()),
        ("native", ("sm_120",), ("compute_80",)),
        ("jit", (), ("compute_80",)),
    ]
    assert report.sos[0].none_archs == ("sm_75", "sm_90a")
    assert len(report.problems) == 1 and "unit 3: PTX ISA 9.0 cannot be JIT-compiled by driver 570.195.03" in report.problems[0]


@pytest.mark.parametrize(("code", "gpu", "runs"), [
    ("8.0", "8.6", True), ("8.6", "8.0", False), ("8.0", "9.0", False), ("9.0a", "9.0", True),
    ("10.0a", "10.3", False), ("10.0f", "10.3", True), ("10.3f", "10.0", False), ("12.0f", "12.1", True),
    ("12.0f", "10.0", False), ("12.0", "12.1", True),
])
def test_sass_rules(code, gpu, runs):
    arch, target_arch = facts.parse_arch(code), facts.parse_arch(gpu)
    assert sass_runs_on(SassEntry(arch.number, arch.suffix), target_arch) is runs


@pytest.mark.parametrize(("code", "gpu", "jits"), [
    ("8.0", "12.0", True), ("12.0", "9.0", False), ("9.0a", "9.0", True), ("9.0a", "10.0", False),
    ("10.0f", "10.3", True), ("10.0f", "12.0", False),
])
def test_ptx_rules(code, gpu, jits):
    arch, target_arch = facts.parse_arch(code), facts.parse_arch(gpu)
    assert ptx_jits_on(PtxEntry(arch.number, arch.suffix, "9.0"), target_arch) is jits


# ---- wheels and the CLI ------------------------------------------------------------------------

@pytest.fixture
def wheels(sos, tmp_path) -> dict[str, Path]:
    good = write_wheel(tmp_path, "kernels", "1.0", {"kernels/_native.so": sos["sm120"],
                                                  "kernels/_mixed.so": sos["mixed"], "kernels/__init__.py": b""})
    bad = write_wheel(tmp_path, "fa2", "1.0", {"fa2/_fa2_C.abi3.so": sos["ptx80"]})
    return {"good": good, "bad": bad}


def test_wheel_audited_per_so(wheels):
    report = audit(wheels["good"], target("12.0", R580))
    assert report.passed
    assert [so.path for so in report.sos] == ["kernels/_native.so", "kernels/_mixed.so"]
    assert [(so.count("native"), so.count("jit"), so.count("none")) for so in report.sos] == [(2, 0, 0), (1, 1, 2)]
    failing = audit(wheels["good"], target("12.0", RTX6000PRO_DRIVER))
    assert not failing.passed and not failing.wheels[0].passed
    assert [so.verdict for so in failing.sos] == ["pass", "fail"]


def test_cli_fails_the_fa2_style_wheel_with_the_reason(wheels):
    result = run_cli("audit", str(wheels["bad"]), "--arch", "12.0", "--driver", RTX6000PRO_DRIVER)
    assert result.exit_code == AuditFailure.exit_code
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("gpuwheel: error: audit failed for GPU 12.0 + driver 570.195.03: fa2-1.0")
    assert "PTX ISA 9.0 cannot be JIT-compiled by driver 570.195.03" in last


def test_cli_table_and_json(wheels):
    result = run_cli("audit", str(wheels["good"]), "--arch", "12.0", "--driver", R580, "--details")
    assert result.exit_code == 0, result.output
    assert "kernels/_mixed.so" in result.stdout and "every GPU .so runs on GPU 12.0 + driver 580.65.06" in result.stdout
    result = run_cli("audit", str(wheels["good"]), "--arch", "12.0", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["passed"] and not data["driver_checked"]
    assert [so["jit"] for so in data["sos"]] == [0, 1]
    assert "no driver given" in run_cli("audit", str(wheels["good"]), "--arch", "12.0").stderr


def test_directory_of_wheels(wheels):
    report = audit(wheels["good"].parent, target("12.0", RTX6000PRO_DRIVER))
    assert [Path(w.path).name for w in report.wheels] == [wheels["bad"].name, wheels["good"].name]
    assert [w.passed for w in report.wheels] == [False, False]


def test_target_recipe_and_its_optional_globs(sos, tmp_path):
    wheel = write_wheel(tmp_path, "vllm", "0.11.0", {"vllm/_C.abi3.so": sos["sm120"],
                                                    "vllm/_flashmla_C.abi3.so": sos["sm90a"]})
    result = run_cli("audit", str(wheel), "--target", "rtx6000pro")
    assert result.exit_code == 0, result.output  # FlashMLA declared audit.optional in the recipe
    assert "optional" in result.stdout
    result = run_cli("audit", str(wheel), "--arch", "12.0")
    assert result.exit_code == AuditFailure.exit_code and "vllm/_flashmla_C.abi3.so: none of its" in result.stderr


@pytest.mark.parametrize("compression", [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED], ids=["deflated", "stored"])
def test_verdicts_are_the_ones_recorded_before_the_reader_was_rewritten(sos, tmp_path, compression):
    recorded = json.loads(GOLDEN.read_text())["fixtures"]
    if recorded["nvcc"] != nvcc_version():
        pytest.skip(f"fixture digests were recorded under {recorded['nvcc']}; this nvcc is {nvcc_version()}")
    wheels = golden_fixture_wheels(sos, tmp_path / "wheels", compression)
    for name, digests in recorded["digests"].items():
        assert verdict_digests(audit(wheels, golden_target(name))) == digests, name


def test_a_container_magic_outside_the_fatbin_changes_nothing(sos, tmp_path, monkeypatch):
    # A container-like record planted in .dynstr, its "cubin" over the name libcudart.so.13: a reader that
    # left out what looks like a cubin before knowing where .nv_fatbin is would lose the linked runtime.
    # The first search step keeps the whole of a small file; a 64-byte step stands in for a large library,
    # whose .dynamic and section headers lie hundreds of MB past it.
    monkeypatch.setattr(fatbin, "_SCAN_STEP", 64)
    data = bytearray(sos["sm120_shared_cudart"].read_bytes())
    name = data.index(b"libcudart.so.13\0")
    start = (name - 80) & ~7
    cubin = name + 16 - (start + 80)
    struct.pack_into("<IHHQ", data, start, 0xBA55ED50, 1, 16, 64 + cubin)
    struct.pack_into("<HHIQ48x", data, start + 16, 2, 0, 64, cubin)
    planted = tmp_path / "planted.so"
    planted.write_bytes(bytes(data))
    on_disk = audit(planted, target("12.0", R580)).sos[0]
    for compression in (zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED):
        wheel = write_wheel(tmp_path, f"planted{compression}", "1.0", {"planted/_C.so": planted},
                            compression=compression)
        in_wheel = audit(wheel, target("12.0", R580)).sos[0]
        assert in_wheel.cuda_runtime == 13
        assert in_wheel.units == on_disk.units


def test_the_parse_refuses_an_image_missing_bytes_it_reads(sos):
    data = sos["compressed_zstd"].read_bytes()
    units = read_fatbin(data, "zstd.so")
    cubins = sorted(entry.payload for unit in units for entry in unit.sass)
    assert read_fatbin(data, "zstd.so", cubins) == units  # the parse steps over every cubin
    offset, _ = _fatbin_section(sos["compressed_zstd"])
    for missing in [(offset, offset + 16), (0, 64)]:  # a container header, the ELF header
        with pytest.raises(LeftOut):
            read_fatbin(data, "zstd.so", [missing])


def test_the_first_bad_member_in_wheel_order_is_named(sos, tmp_path):
    # Members are read in parallel, the largest first; the error is still the one a reader in order meets.
    broken = {}
    for name in ("sm120", "mixed"):
        data = bytearray(sos[name].read_bytes())
        offset, _ = _fatbin_section(sos[name])
        struct.pack_into("<I", data, offset, 0xDEADBEEF)
        broken[name] = data
    assert len(broken["sm120"]) < len(broken["mixed"])
    wheel = write_wheel(tmp_path, "two", "1.0", {"two/a_small.so": bytes(broken["sm120"]),
                                                 "two/b_large.so": bytes(broken["mixed"])})
    _one_line_error(run_cli("audit", str(wheel), "--arch", "12.0"), AuditInputError.exit_code,
                    "two/a_small.so", "no fatbin container at offset")


# ---- bad input ------------------------------------------------------------------------------------

def _one_line_error(result, exit_code: int, *fragments: str) -> None:
    assert result.exit_code == exit_code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpuwheel: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.output


def _untouched(directory: Path):
    before = sorted(os.listdir(directory))
    return lambda: sorted(os.listdir(directory)) == before


def test_not_a_wheel_nor_elf(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    same = _untouched(tmp_path)
    _one_line_error(run_cli("audit", str(text), "--arch", "12.0"), AuditInputError.exit_code,
                    "neither a wheel nor an ELF shared object")
    assert same()


def test_zip_that_is_no_wheel(tmp_path):
    archive = tmp_path / "kernels-1.0-py3-none-any.whl"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("kernels/x.py", "")
    _one_line_error(run_cli("audit", str(archive), "--arch", "12.0"), AuditInputError.exit_code, "no *.dist-info/WHEEL")


def test_wheel_with_path_traversal_is_refused(sos, tmp_path):
    wheel = write_wheel(tmp_path, "evil", "1.0", {"evil/_C.so": sos["sm120"], "../../escape.so": b"\x7fELF"},
                        check=False)
    same = _untouched(tmp_path)
    _one_line_error(run_cli("audit", str(wheel), "--arch", "12.0"), AuditInputError.exit_code,
                    "'../../escape.so'", "path traversal")
    assert same() and not (tmp_path.parent / "escape.so").exists()


def test_wheel_without_gpu_code(tmp_path):
    wheel = write_wheel(tmp_path, "pure", "1.0", {"pure/__init__.py": b"",
                                                 "pure/_speedups.so": Path(shutil.which("ls"))})
    _one_line_error(run_cli("audit", str(wheel), "--arch", "12.0"), AuditFailure.exit_code,
                    "carries no GPU code")


def _fatbin_section(path: Path) -> tuple[int, int]:
    with open(path, "rb") as stream:
        section = ELFFile(stream).get_section_by_name(".nv_fatbin")
        return section["sh_offset"], section["sh_size"]


def test_truncated_fatbin(sos, tmp_path):
    broken = tmp_path / "truncated.so"
    offset, size = _fatbin_section(sos["sm120"])
    broken.write_bytes(sos["sm120"].read_bytes()[:offset + size // 2])
    result = run_cli("audit", str(broken), "--arch", "12.0")
    assert result.exit_code == AuditInputError.exit_code and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_corrupt_container_length(sos, tmp_path):
    broken = tmp_path / "corrupt.so"
    data = bytearray(sos["sm120"].read_bytes())
    offset, _ = _fatbin_section(sos["sm120"])
    struct.pack_into("<Q", data, offset + 8, 1 << 40)  # the first container's payload size
    broken.write_bytes(bytes(data))
    _one_line_error(run_cli("audit", str(broken), "--arch", "12.0"), AuditInputError.exit_code,
                    "truncated or corrupt", str(broken))


def test_corrupt_container_magic(sos, tmp_path):
    broken = tmp_path / "magic.so"
    data = bytearray(sos["sm120"].read_bytes())
    offset, _ = _fatbin_section(sos["sm120"])
    struct.pack_into("<I", data, offset, 0xDEADBEEF)
    broken.write_bytes(bytes(data))
    _one_line_error(run_cli("audit", str(broken), "--arch", "12.0"), AuditInputError.exit_code,
                    "no fatbin container at offset", "corrupt")


def test_corrupt_compressed_ptx(sos, tmp_path):
    broken = tmp_path / "zstd.so"
    data = bytearray(sos["ptx80"].read_bytes())
    offset, size = _fatbin_section(sos["ptx80"])
    start = data.index(b"\x28\xb5\x2f\xfd", offset, offset + size)  # the zstd frame magic of the PTX payload
    data[start + 8:start + 40] = b"\xff" * 32
    broken.write_bytes(bytes(data))
    _one_line_error(run_cli("audit", str(broken), "--arch", "12.0"), AuditInputError.exit_code,
                    "does not decompress")


def test_bad_arch_and_driver_options(sos):
    result = run_cli("audit", str(sos["sm120"]), "--arch", "12.0a")
    assert result.exit_code == 2 and "compute capability" in result.output
    result = run_cli("audit", str(sos["sm120"]), "--arch", "12.0", "--driver", "latest")
    assert result.exit_code == 2 and "not a driver version" in result.output
    result = run_cli("audit", str(sos["sm120"]))
    assert result.exit_code == 2 and "--target TARGET or --arch" in result.output


def test_so_without_gpu_code(tmp_path):
    plain = tmp_path / "libplain.so"
    plain.write_bytes(Path(shutil.which("ls")).read_bytes())  # an ELF without any fatbin
    _one_line_error(run_cli("audit", str(plain), "--arch", "12.0"), AuditFailure.exit_code,
                    "libplain.so: carries no GPU code (no fatbin)")

"""Finishing real raw wheels for rtx6000pro (GPU 12.0, driver 570.195.03): label, platform tag,
deterministic bytes, provenance, and the audit that refuses a wheel whose kernels cannot run there."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from wheels_helpers import (PTX80, SM120, TORCH_WHEEL, compile_plain_library, compile_so, extract_torch_libs,
                            raw_wheel, rewrite_member, toolchain)
from gpuwheel.backends.base import ToolchainInfo
from gpuwheel.backends.sccache import CacheStats
from gpuwheel.backends.packages import RawWheel, RawWheels
from gpuwheel.errors import AuditFailure, WheelError
from gpuwheel.publish.gate import PublishGate, check_gate
from gpuwheel.wheelfile import read_wheel
from gpuwheel.plan import make_plan
from gpuwheel.recipe import load_recipe
from gpuwheel.smoke.report import PASS, CheckResult, GpuInfo, SmokeReport, WheelSmoke, write_json
from gpuwheel.wheels import finish_wheels, show_wheel

LABEL = "cu130.sm120.torch214"  # nvcc 13.0 built them, for the target's arch list 12.0, against torch 2.14
FLASH_ATTN = f"flash_attn-2.8.3+{LABEL}"

pytestmark = pytest.mark.skipif(not TORCH_WHEEL.exists(), reason=f"the torch 2.14.1 CUDA wheel is not at {TORCH_WHEEL}")


@pytest.fixture(scope="module")
def plan():
    """The fixtures are CUDA 13 builds linking libcudart.so.13: a fleet on driver ≥ 580 runs them."""
    return make_plan(load_recipe("rtx6000pro-cu13"))


@pytest.fixture(scope="module")
def plan_570():
    """The 570-driver fleet: where compute_80 PTX from CUDA 13 (ISA 9.0) cannot be JIT-compiled."""
    return make_plan(load_recipe("rtx6000pro"))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The real raw wheels: flash-attn with sm_120 SASS linking libc10/libtorch/libcudart, and vLLM
    (already labelled +cu130, as vLLM labels its builds) with compute_80 PTX only."""
    work = tmp_path_factory.mktemp("raw")
    torch_libs = extract_torch_libs(work / "torch-lib")
    sm120 = compile_so(work, "sm120", [*SM120, "--cudart", "shared"],
                       link=[f"-L{torch_libs}", "-lc10", "-ltorch"])
    ptx80 = compile_so(work, "ptx80", PTX80)
    static = compile_so(work, "sm120_static", SM120)  # nvcc's default static cudart: no driver floor in sight
    return {
        "flash-attn": raw_wheel(work, "flash-attn", "2.8.3", "flash_attn", {"flash_attn_2_cuda.so": sm120}),
        "flash-attn-static": raw_wheel(work / "static", "flash-attn", "2.8.3", "flash_attn",
                                       {"flash_attn_2_cuda.so": static}),
        "vllm": raw_wheel(work, "vllm", "0.26.0+cu130", "vllm", {"_C.abi3.so": ptx80},
                          scripts={"vllm-hello": "#!/usr/bin/env python\nprint('hello')\n"}),
        "work": work,
    }


@pytest.fixture(scope="module")
def finished(plan, built, tmp_path_factory):
    out = tmp_path_factory.mktemp("wheels") / "rtx6000pro-cu13" / "staging"
    (wheel,) = finish_wheels(plan, [("flash-attn", built["flash-attn"])], toolchain=toolchain(), out_dir=out).wheels
    return wheel


def _needed(so: bytes, tmp_path: Path) -> list[str]:
    path = tmp_path / "needed.so"
    path.write_bytes(so)
    dynamic = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True).stdout
    return [line.split("[", 1)[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]


# ---- the story: a raw wheel becomes a finished one ---------------------------------------------
def test_finishing_the_same_raw_wheel_twice_gives_identical_bytes(plan, built, finished, tmp_path):
    again = finish_wheels(plan, [("flash-attn", built["flash-attn"])], toolchain=toolchain(),
                          out_dir=tmp_path / "again").wheels[0]
    assert again.filename == finished.filename
    assert again.path.read_bytes() == finished.path.read_bytes()
    assert again.sha256 == finished.sha256 == hashlib.sha256(finished.path.read_bytes()).hexdigest()


def test_label_is_in_file_name_dist_info_metadata_and_record(finished):
    assert finished.filename.startswith(f"{FLASH_ATTN}-cp311-cp311-manylinux")
    assert finished.version == f"2.8.3+{LABEL}" and finished.label == LABEL
    with zipfile.ZipFile(finished.path) as wheel:
        names = wheel.namelist()
        assert {name.split("/")[0] for name in names} == {"flash_attn", f"{FLASH_ATTN}.dist-info"}
        metadata = wheel.read(f"{FLASH_ATTN}.dist-info/METADATA").decode()
        assert f"\nVersion: 2.8.3+{LABEL}\n" in metadata and "Name: flash-attn" in metadata
        tags = [line.split(": ")[1] for line in wheel.read(f"{FLASH_ATTN}.dist-info/WHEEL").decode().splitlines()
                if line.startswith("Tag:")]
        assert sorted(tags) == sorted(f"cp311-cp311-{platform}" for platform in finished.platform_tags)
        rows = list(csv.reader(io.StringIO(wheel.read(f"{FLASH_ATTN}.dist-info/RECORD").decode())))
        assert [row[0] for row in rows] == names  # every member, in archive order, RECORD last
        assert rows[-1] == [f"{FLASH_ATTN}.dist-info/RECORD", "", ""]
        for path, digest, size in rows[:-1]:
            data = wheel.read(path)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert (digest, int(size)) == (f"sha256={expected}", len(data)), path


def test_libc10_libtorch_and_cudart_are_not_grafted_and_the_tag_is_manylinux(built, finished, tmp_path):
    assert finished.grafted == ()
    assert all(tag.startswith("manylinux") for tag in finished.platform_tags)
    with zipfile.ZipFile(finished.path) as wheel, zipfile.ZipFile(built["flash-attn"]) as raw:
        assert not any(".libs/" in name for name in wheel.namelist())
        so = wheel.read("flash_attn/flash_attn_2_cuda.so")
        assert so == raw.read("flash_attn/flash_attn_2_cuda.so")  # nothing grafted, so auditwheel left it alone
    assert {"libc10.so", "libtorch.so", "libcudart.so.13"} <= set(_needed(so, tmp_path))


def test_entries_are_sorted_with_one_timestamp_and_fixed_modes(finished):
    with zipfile.ZipFile(finished.path) as wheel:
        infos = wheel.infolist()
    names = [info.filename for info in infos]
    payload = [n for n in names if not n.startswith(f"{FLASH_ATTN}.dist-info/")]
    metadata = [n for n in names if n.startswith(f"{FLASH_ATTN}.dist-info/")]
    assert names == payload + metadata and payload == sorted(payload) and metadata[-1].endswith("/RECORD")
    assert metadata[:-1] == sorted(metadata[:-1])
    assert {info.date_time for info in infos} == {(1980, 1, 1, 0, 0, 0)}
    assert {info.compress_type for info in infos} == {zipfile.ZIP_DEFLATED}
    modes = {info.filename: stat.S_IMODE(info.external_attr >> 16) for info in infos}
    assert modes.pop("flash_attn/flash_attn_2_cuda.so") == 0o755
    assert set(modes.values()) == {0o644}


def test_source_date_epoch_sets_every_timestamp(plan, built, finished, tmp_path):
    later = finish_wheels(plan, [("flash-attn", built["flash-attn"])], toolchain=toolchain(), out_dir=tmp_path,
                          source_date_epoch=1700000000).wheels[0]
    with zipfile.ZipFile(later.path) as wheel:
        assert {info.date_time for info in wheel.infolist()} == {(2023, 11, 14, 22, 13, 20)}
    assert later.sha256 != finished.sha256 and later.provenance.to_json()["wheel"]["source_date_epoch"] == 1700000000


def test_pip_installs_the_finished_wheel_and_reports_the_labelled_version(built, finished, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "--disable-pip-version-check"]
    requirement = f"flash-attn==2.8.3+{LABEL}"
    # What users do by hand: rename a wheel to carry a label. Installing from an index, pip refuses it.
    by_hand = tmp_path / "renamed"
    by_hand.mkdir()
    (by_hand / f"{FLASH_ATTN}-cp311-cp311-linux_x86_64.whl").write_bytes(built["flash-attn"].read_bytes())
    refused = subprocess.run([*pip, "install", "--no-index", "--no-deps", "--find-links", str(by_hand), requirement],
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "inconsistent version" in refused.stdout + refused.stderr
    installed = subprocess.run([*pip, "install", "--no-index", "--no-deps", "--find-links", str(finished.path.parent),
                                requirement], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    shown = subprocess.run([*pip, "show", "-f", "flash-attn"], check=True, capture_output=True, text=True).stdout
    assert f"Version: 2.8.3+{LABEL}" in shown
    assert f"{FLASH_ATTN}.dist-info/gpuwheel.json" in shown and "flash_attn/flash_attn_2_cuda.so" in shown


def test_the_build_stages_raw_wheels_and_toolchain_info_are_finished(plan, built, finished, tmp_path):
    info = ToolchainInfo(backend="local", python="3.11.7", torch="2.14.1+cu130", torch_cuda="13.0", nvcc="13.0.88",
                         cc="c++ (Debian 12.2.0-14) 12.2.0", location=str(tmp_path / "venv"), sccache="sccache 0.10.0")
    raw = RawWheels(plan.hash, info, (RawWheel("flash-attn", built["flash-attn"], tmp_path / "build.log", 1.0,
                                               CacheStats(0, 0)),))
    (wheel,) = finish_wheels(plan, raw, toolchain=info, out_dir=tmp_path / "out").wheels
    assert wheel.filename == finished.filename
    # Where and how fast it built is not what built it: kept out, so machines agree on the bytes.
    assert "location" not in wheel.provenance.to_json()["toolchain"]["observed"]
    assert "sccache" not in wheel.provenance.to_json()["toolchain"]["observed"]
    assert wheel.provenance.to_json()["toolchain"]["observed"]["torch_cuda"] == "13.0"
    stale = RawWheels("0" * 64, info, raw.wheels)
    with pytest.raises(WheelError, match="built for plan 000000000000, not for this plan"):
        finish_wheels(plan, stale, toolchain=info, out_dir=tmp_path / "stale")
    assert not (tmp_path / "stale").exists()


def test_without_an_observed_toolchain_the_label_uses_the_plans_pins(gpuwheel, built, tmp_path):
    result = gpuwheel("finish", "rtx6000pro", built["flash-attn-static"], "--out", tmp_path, "--json")
    assert result.exit_code == 0, result.stderr
    (written,) = result.json()["wheels"]
    assert written["filename"].startswith("flash_attn-2.8.3+cu128.sm120.torch211-")  # recipe: CUDA 12.8.1, torch 2.11.0
    assert show_wheel(written["path"])["provenance"]["toolchain"]["observed"] is None
    shown = gpuwheel("show-wheel", written["path"])
    assert "not observed; planned: " in shown.stdout and "cuda 12.8.1" in shown.stdout


# ---- provenance ---------------------------------------------------------------------------------
def test_provenance_states_target_toolchain_sources_patches_env_and_audit(plan, finished):
    record = show_wheel(finished.path)["provenance"]
    assert record == finished.provenance.to_json()
    package = plan.package("flash-attn")
    assert record["target"] == "rtx6000pro-cu13" and record["plan_hash"] == plan.hash
    assert record["target_spec"]["compute_capability"] == "12.0" and record["target_spec"]["arch_list"] == ["12.0"]
    assert record["target_spec"]["min_driver"] == "580.65.06"
    assert record["toolchain"]["observed"] == toolchain()
    assert record["toolchain"]["planned"]["cuda"] == plan.toolchain.cuda
    assert record["sources"] == [{"name": "flash-attn", "role": "package", "kind": "sdist",
                                  "location": "flash_attn-2.8.3.tar.gz", "sha256": package.source.sha256,
                                  "commit": None, "index": None}]
    assert [(p["name"], p["sha256"]) for p in record["patches"]] == [(r.name, r.sha256) for r in package.patches]
    assert record["build"]["env"]["FLASH_ATTN_CUDA_ARCHS"] == "120"
    assert "MAX_JOBS" not in record["build"]["env"] and record["build"]["env_excluded"] == ["MAX_JOBS", "NVCC_THREADS"]
    assert record["audit"]["passed"] is True and record["audit"]["arch"] == "12.0"
    assert record["audit"]["driver"] == "580.65.06"
    assert record["audit"]["sos"][0]["path"] == "flash_attn/flash_attn_2_cuda.so"
    assert record["audit"]["sos"][0]["sass_archs"] == ["sm_120"]


def test_vllm_dependencies_are_sources_with_their_revs(plan_570, built, tmp_path):
    plan = plan_570
    # The PTX-only build fails the audit; finished anyway to read what it records about vLLM's sources.
    wheel = finish_wheels(plan, [("vllm", built["vllm"])], toolchain=toolchain(), out_dir=tmp_path,
                          allow_audit_failure=True).wheels[0]
    sources = {source["name"]: source for source in wheel.provenance.to_json()["sources"]}
    cutlass = next(d for d in plan.package("vllm").dependencies if d.name == "cutlass")
    assert sources["vllm"]["sha256"] == plan.package("vllm").source.sha256
    assert sources["cutlass"] == {"name": "cutlass", "role": "dependency", "kind": "git", "location": cutlass.git,
                                  "rev": cutlass.rev, "commit": cutlass.commit, "submodules": True,
                                  "provided_by": "source"}
    # 12.0 compiles nothing of these: their files came from vLLM's own wheel, and the wheel says so
    standing = plan.package("vllm").stand_ins
    assert {name for name, s in sources.items() if s.get("provided_by") == "stand-in"} == set(standing)
    published = sources[plan.package("vllm").stand_in.location]
    assert (published["role"], published["sha256"], published["stands_in_for"]) == (
        "stand-in", plan.package("vllm").stand_in.sha256, list(standing))
    assert wheel.provenance.to_json()["build"]["components"] == {
        "rust_frontend": {"mode": "off", "in_wheel": False, "members": []}}
    assert wheel.provenance.to_json()["audit"]["optional_globs"] == list(plan.package("vllm").audit_optional)


def test_the_publish_gate_accepts_the_finished_wheel(finished, tmp_path):
    wheel = read_wheel(finished.path)
    smoke = tmp_path / "smoke.json"
    kernels = CheckResult("flash_attn_varlen_func hdim128 bf16 8x1001+184", PASS, "max err 0.002", 1.5)
    write_json(SmokeReport(target="rtx6000pro-cu13", compute_capability="12.0", gpu=GpuInfo("RTX PRO 6000", "12.0"),
                           gpu_skip_reason=None, python="python3", torch="2.14.0+cu130", index_url=str(tmp_path),
                           checks=(CheckResult("install", PASS, "installed"),),
                           wheels=(WheelSmoke(wheel.filename, wheel.sha256, wheel.project, wheel.version, (kernels,)),)),
               smoke)
    assert check_gate([wheel], PublishGate("rtx6000pro-cu13", "12.0", smoke)) == {}


def test_show_wheel_prints_the_provenance(gpuwheel, plan, finished):
    result = gpuwheel("show-wheel", finished.path)
    assert result.exit_code == 0, result.stderr
    for expected in ("rtx6000pro-cu13", plan.hash, "passed for arch 12.0, driver 580.65.06", "flash_attn-2.8.3.tar.gz",
                     plan.package("flash-attn").source.sha256, "0001-build-with-cxx20-for-torch-2.14.patch",
                     "FLASH_ATTN_CUDA_ARCHS", "release 13.0"):
        assert expected in result.stdout, expected
    as_json = gpuwheel("show-wheel", finished.path, "--json")
    assert as_json.exit_code == 0 and as_json.json() == json.loads(json.dumps(show_wheel(finished.path)))


def test_show_wheel_of_a_wheel_gpuwheel_did_not_finish(gpuwheel, built):
    result = gpuwheel("show-wheel", built["flash-attn"])
    assert result.exit_code == 10
    assert result.stderr == (f"gpuwheel: error: {built['flash-attn'].name}: no flash_attn-2.8.3.dist-info/gpuwheel.json; "
                             "gpuwheel did not finish this wheel (finish it with `gpuwheel finish TARGET WHEEL`)\n")


# ---- the audit decides ---------------------------------------------------------------------------
PTX_REASON = "PTX ISA 9.0 cannot be JIT-compiled by driver 570.195.03"


def test_a_ptx_only_cuda13_wheel_fails_the_audit_and_nothing_is_written(plan_570, built, tmp_path):
    plan = plan_570
    out = tmp_path / "wheels" / "rtx6000pro" / "staging"
    with pytest.raises(AuditFailure) as failure:
        finish_wheels(plan, [("vllm", built["vllm"])], toolchain=toolchain(), out_dir=out)
    message = str(failure.value)
    assert message.startswith(f"vllm-0.26.0+{LABEL}-cp311-cp311-manylinux")
    assert "vllm/_C.abi3.so: unit 0: " + PTX_REASON in message and "target rtx6000pro" in message
    assert not (tmp_path / "wheels").exists()  # nor the directories the call made


def test_audit_failure_through_the_cli_leaves_the_staging_dir_as_it_was(gpuwheel, built, tmp_path):
    out = tmp_path / "staging"
    out.mkdir()
    (out / "earlier.txt").write_text("kept")
    tc = tmp_path / "toolchain.json"
    tc.write_text(json.dumps(toolchain()))
    # Two wheels, the second failing: neither may land.
    result = gpuwheel("finish", "rtx6000pro", built["flash-attn-static"], built["vllm"], "--out", out, "--toolchain", tc)
    assert result.exit_code == 11
    assert result.stderr.startswith("gpuwheel: error: vllm-0.26.0+") and PTX_REASON in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["earlier.txt"]


def test_allow_audit_failure_finishes_it_marked_failed(gpuwheel, built, tmp_path):
    tc = tmp_path / "toolchain.json"
    tc.write_text(json.dumps(toolchain()))
    result = gpuwheel("finish", "rtx6000pro", built["vllm"], "--out", tmp_path / "out", "--toolchain", tc,
                      "--allow-audit-failure", "--json")
    assert result.exit_code == 0, result.stderr
    assert "although its audit failed" in result.stderr and PTX_REASON in result.stderr
    (written,) = result.json()["wheels"]
    # vLLM's own +cu130 is replaced, not appended to.
    assert written["filename"].startswith(f"vllm-0.26.0+{LABEL}-") and written["audit_passed"] is False
    audit = show_wheel(written["path"])["provenance"]["audit"]
    assert audit["passed"] is False and audit["allowed_failure"] is True
    assert any(PTX_REASON in problem for problem in audit["problems"])
    # The .data directory carries the label too, and its script stays executable.
    script = f"vllm-0.26.0+{LABEL}.data/scripts/vllm-hello"
    with zipfile.ZipFile(written["path"]) as wheel:
        assert stat.S_IMODE(wheel.getinfo(script).external_attr >> 16) == 0o755
        assert not any(".data/" in name and not name.startswith(f"vllm-0.26.0+{LABEL}.data/") for name in wheel.namelist())
        assert f"{script},sha256=" in wheel.read(f"vllm-0.26.0+{LABEL}.dist-info/RECORD").decode()


# ---- auditwheel: what it grafts, and what it cannot place ---------------------------------------
@pytest.fixture(scope="module")
def needs_extra(built):
    """flash-attn whose .so also links libgwextra.so, a library no exclusion covers."""
    work = built["work"] / "extra"
    work.mkdir()
    compile_plain_library(work, "libgwextra.so")
    so = compile_so(work, "sm120_extra", SM120, link=[f"-L{work}", "-lgwextra"])
    return raw_wheel(work, "flash-attn", "2.8.3", "flash_attn", {"flash_attn_2_cuda.so": so}), work


def test_a_library_auditwheel_cannot_locate_is_a_clear_error(gpuwheel, needs_extra, tmp_path, monkeypatch):
    monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    raw, _ = needs_extra
    result = gpuwheel("finish", "rtx6000pro", raw, "--out", tmp_path / "out")
    assert result.exit_code == 10
    assert result.stderr.startswith(f"gpuwheel: error: {raw.name}: auditwheel cannot repair it: Cannot repair wheel, "
                                    'because required library "libgwextra.so" could not be located (')
    assert "LD_LIBRARY_PATH" in result.stderr and not (tmp_path / "out").exists()


def test_a_grafted_library_is_recorded_and_the_bytes_stay_identical(plan, needs_extra, tmp_path, monkeypatch):
    raw, library_dir = needs_extra
    monkeypatch.setenv("LD_LIBRARY_PATH", str(library_dir))
    first, second = (finish_wheels(plan, [("flash-attn", raw)], toolchain=toolchain(),
                                   out_dir=tmp_path / name).wheels[0] for name in ("a", "b"))
    assert first.path.read_bytes() == second.path.read_bytes()
    (grafted,) = first.grafted
    assert grafted.startswith("flash_attn.libs/libgwextra-") and first.provenance.to_json()["wheel"]["grafted"] == [grafted]
    with zipfile.ZipFile(first.path) as wheel:
        assert stat.S_IMODE(wheel.getinfo(grafted).external_attr >> 16) == 0o755


# ---- bad input ------------------------------------------------------------------------------------
RAW_NAME = "flash_attn-2.8.3-cp311-cp311-linux_x86_64.whl"


def _finish_cli(gpuwheel, raw: Path, out: Path):
    result = gpuwheel("finish", "rtx6000pro", raw, "--package", "flash-attn", "--out", out)
    assert result.exit_code == 10, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("gpuwheel: error: ")
    assert not out.exists()
    return result.stderr


def test_not_a_wheel(gpuwheel, tmp_path):
    fake = tmp_path / RAW_NAME
    fake.write_text("this is no zip archive")
    assert "not a wheel: not a readable zip archive" in _finish_cli(gpuwheel, fake, tmp_path / "out")
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    assert f"{notes}: not a wheel file name" in _finish_cli(gpuwheel, notes, tmp_path / "out")


def test_a_zip_with_path_traversal(gpuwheel, tmp_path):
    evil = tmp_path / RAW_NAME
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("flash_attn/__init__.py", "")
        archive.writestr("../../etc/cron.d/evil", "* * * * * root true\n")
        archive.writestr("flash_attn-2.8.3.dist-info/WHEEL", "Wheel-Version: 1.0\n")
    message = _finish_cli(gpuwheel, evil, tmp_path / "out")
    assert "member '../../etc/cron.d/evil' would land outside the install root (path traversal)" in message


def test_a_record_mismatch(gpuwheel, built, tmp_path):
    edited = rewrite_member(built["flash-attn"], tmp_path / RAW_NAME, {"flash_attn/__init__.py": b"import os\n"})
    message = _finish_cli(gpuwheel, edited, tmp_path / "out")
    assert "RECORD mismatch: flash_attn/__init__.py has sha256=" in message
    assert "flash_attn-2.8.3.dist-info/RECORD says sha256=" in message


def test_a_wheel_of_a_package_the_plan_does_not_build(plan, built, tmp_path):
    with pytest.raises(WheelError, match=r"package 'torch' is not in the plan for rtx6000pro-cu13 "
                                         r"\(it builds flash-attn, vllm, causal-conv1d\)"):
        finish_wheels(plan, [TORCH_WHEEL], toolchain=toolchain(), out_dir=tmp_path / "out")
    with pytest.raises(WheelError, match="a wheel of flash-attn, not of package vllm"):
        finish_wheels(plan, [("vllm", built["flash-attn"])], toolchain=toolchain(), out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()

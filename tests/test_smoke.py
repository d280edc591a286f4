"""`gpuwheel smoke` as a user runs it: real wheels (a real CUDA .so from nvcc), a real static index,
real venvs and pip. There is no GPU here, so these tell the skip path: the checks that need no GPU
run and pass, the GPU checks are skipped with the reason, and the report is never a pass."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from gpuwheel.kinds.flash_attn import built_head_dims
from gpuwheel.kinds.vllm import APPEND_KV_PATCH, built_serving, smoke_groups
from gpuwheel.layout import target_paths
from gpuwheel.provenance import Provenance
from gpuwheel.publish.local import publish_local
from gpuwheel.smoke.report import (FAIL, PASS, SKIP, SCHEMA, CheckResult, GpuInfo, SmokeReport, SmokeReportFormatError,
                                   WheelSmoke, read_json, write_json)
from vllm_patches_helpers import PATCHES
from smoke_helpers import (TARGET, build_cuda_so, build_driver_linked_so, build_libcuda_stub, build_unresolved_so,
                           make_vllm_wheel, make_wheel, smoke_recipe)

PROVENANCE = {"target": TARGET, "audit": {"passed": True, "arch": "9.0", "driver": "580.65.06"}}


def gpuwheel(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpuwheel", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "COLUMNS": "250"})


@pytest.fixture(scope="module")
def cuda_so(tmp_path_factory) -> Path:
    if not Path(shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc").exists():
        pytest.skip("needs nvcc (CUDA toolkit) to build the test wheel's kernel")
    return build_cuda_so(tmp_path_factory.mktemp("so"))


def _rows(report: dict, suite: str) -> dict[str, dict]:
    checks = report["checks"] if suite == "environment" else next(
        w["checks"] for w in report["wheels"] if w["filename"] == suite)
    return {c["name"]: c for c in checks}


def test_skip_path_from_a_wheels_dir_reports_gpu_skip_and_never_a_pass(tmp_path, cuda_so, make_recipe):
    recipe = make_recipe(tmp_path / "recipes", **smoke_recipe())
    wheel = make_wheel(tmp_path / "wheels", cuda_so, provenance=PROVENANCE)
    junit, report_path = tmp_path / "out" / "junit.xml", tmp_path / "out" / "smoke.json"

    result = gpuwheel("smoke", recipe, "--wheels", tmp_path / "wheels", "--junit", junit, "--report", report_path,
                      "--json")

    assert result.returncode == 14, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("gpuwheel: error: not smoke-tested on the target GPU: GPU checks skipped: "
                            "no GPU visible")
    report = json.loads(report_path.read_text())
    assert json.loads(result.stdout) == report  # --json prints on stdout what the report file holds
    assert read_json(report_path).to_json() == report  # and it reads back as the SmokeReport written
    assert report["schema"] == SCHEMA
    assert report["passed"] is False and report["gpu"] is None and report["gpu_checks"] == "skipped"
    assert "no GPU visible" in report["gpu_skip_reason"]
    assert report["target"] == TARGET and report["compute_capability"] == "9.0"
    assert report["python"].startswith("a fresh venv of ")
    (entry,) = report["wheels"]
    assert entry["filename"] == wheel.name and entry["passed"] is False
    assert entry["sha256"] == hashlib.sha256(wheel.read_bytes()).hexdigest()
    checks = _rows(report, wheel.name)
    assert {name: c["status"] for name, c in checks.items()} == {
        "code for 9.0 on driver 580.65.06 (audit)": "pass", ".so load": "pass", "import": "pass"}
    environment = _rows(report, "environment")
    assert environment["install"]["status"] == "pass" and environment["GPU"]["status"] == "skip"
    assert "GPU checks skipped" in result.stderr  # the printed table shows the reason

    suites = {s.get("name"): s for s in ET.parse(junit).getroot()}
    assert set(suites) == {"environment", wheel.name}
    gpu_case = next(c for c in suites["environment"] if c.get("name") == "GPU")
    assert "no GPU visible" in gpu_case.find("skipped").get("message")
    assert suites[wheel.name].get("failures") == "0"
    assert not list(report_path.parent.glob(".*.part")), "a temp file was left beside the report"


def test_a_smoke_report_reads_back_as_written(tmp_path):
    kernels = CheckResult("flash_attn_varlen_func hdim128 bf16 8x1001+184", PASS, "max err 0.002", 1.875,
                          {"max_err_full": 0.002, "tflops_full": 310.5})
    report = SmokeReport(
        target="h100", compute_capability="9.0", gpu=GpuInfo("NVIDIA H100 80GB HBM3", "9.0"), gpu_skip_reason=None,
        python="python3", torch="2.11.0+cu130", index_url="https://index.example/simple/",
        checks=(CheckResult("install", PASS, "installed 2 wheels", 0.75),),
        wheels=(WheelSmoke("flash_attn-2.8.3+cu130-cp312-cp312-linux_x86_64.whl", "ab" * 32, "flash-attn",
                           "2.8.3+cu130", (kernels, CheckResult("paged decode", FAIL, "max err 3.1", 0.5))),
                WheelSmoke("gw_b-1.0-py3-none-any.whl", "cd" * 32, "gw-b", "1.0", (CheckResult("GPU", SKIP, "no"),))))
    write_json(report, tmp_path / "smoke.json")
    assert read_json(tmp_path / "smoke.json") == report
    assert SmokeReport.from_json(report.to_json()) == report
    unnumbered = report.to_json()
    del unnumbered["schema"]  # written before gpuwheel numbered the format: the same format, schema 1
    assert SmokeReport.from_json(unnumbered) == report

    # A check whose status is none of pass, fail, skip is a failure, never a pass.
    odd = {**kernels.to_json(), "status": "ok"}
    assert CheckResult.from_json(odd) == CheckResult(kernels.name, FAIL, "check reported status 'ok'", 1.875)

    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(SmokeReportFormatError) as error:
        read_json(tmp_path / "list.json")
    assert str(error.value) == f"smoke report {tmp_path / 'list.json'}: the report is a list, not a JSON object"


def test_the_publish_gate_refuses_wheels_whose_gpu_checks_were_skipped(tmp_path, cuda_so, make_recipe):
    recipe = make_recipe(tmp_path / "recipes", **smoke_recipe())
    wheels = tmp_path / "wheels"
    make_wheel(wheels, cuda_so, provenance=PROVENANCE)
    assert gpuwheel("smoke", recipe, "--wheels", wheels).returncode == 14
    assert (wheels / "smoke.json").is_file()  # default: beside the wheels, where publish looks

    result = gpuwheel("publish", recipe, "--wheels", wheels, "--index-dir", tmp_path / "index")

    assert result.returncode == 13
    # Called what it is: untested on the target GPU, not a failure (nothing that ran failed).
    assert "not smoke-tested on the target GPU (GPU checks skipped: no GPU visible" in result.stderr
    assert "failed smoke" not in result.stderr and "unknown GPU" not in result.stderr
    assert not (tmp_path / "index" / "files").exists() or not list((tmp_path / "index" / "files").iterdir())


def test_installs_from_a_real_static_index_and_writes_the_default_report(tmp_path, cuda_so, make_recipe):
    recipe = make_recipe(tmp_path / "recipes", **smoke_recipe())
    wheel = make_wheel(tmp_path / "built", cuda_so, provenance=PROVENANCE)
    index = publish_local([wheel], tmp_path / "index")

    result = gpuwheel("smoke", recipe, "--index", index.index_url, cwd=tmp_path)

    assert result.returncode == 14, result.stderr
    report = json.loads((tmp_path / target_paths(TARGET).smoke_report).read_text())
    assert report["index_url"] == index.index_url
    assert [w["filename"] for w in report["wheels"]] == [wheel.name]
    assert _rows(report, wheel.name)["import"]["status"] == "pass"


def test_a_so_with_an_undefined_symbol_fails_the_load_check(tmp_path, make_recipe):
    recipe = make_recipe(tmp_path / "recipes", **smoke_recipe())
    wheel = make_wheel(tmp_path / "wheels", build_unresolved_so(tmp_path), provenance=PROVENANCE)

    result = gpuwheel("smoke", recipe, "--wheels", tmp_path / "wheels")

    assert result.returncode == 12, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "gpuwheel: error: 2 smoke check(s) failed for target h100-smoke: ")
    checks = _rows(json.loads((tmp_path / "wheels" / "smoke.json").read_text()), wheel.name)
    assert checks[".so load"]["status"] == "fail"
    assert "undefined symbol: _ZN3c1019UndefinedTensorImpl10_singletonE" in checks[".so load"]["detail"]
    assert "built against another torch?" in checks[".so load"]["detail"]
    assert checks["import"]["status"] == "fail"
    assert checks["code for 9.0 on driver 580.65.06 (audit)"]["status"] == "skip"  # no GPU code in it


def test_with_python_holding_torch_the_wheels_go_beside_it_without_deps(tmp_path, cuda_so, make_recipe):
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                           text=True)
    if probe.returncode != 0:
        pytest.skip(f"{sys.executable} has no torch to stand for a GPU machine's interpreter")
    installed = probe.stdout.strip()
    wheels = tmp_path / "wheels"
    make_wheel(wheels, cuda_so, provenance=PROVENANCE)

    pinned = gpuwheel("smoke", make_recipe(tmp_path / "a", **smoke_recipe(torch=installed.split("+")[0])),
                      "--wheels", wheels, "--python", sys.executable)
    report = json.loads((wheels / "smoke.json").read_text())
    other = gpuwheel("smoke", make_recipe(tmp_path / "b", **smoke_recipe(torch="2.11.0")), "--wheels", wheels,
                     "--python", sys.executable)

    assert pinned.returncode == 14, pinned.stderr
    environment = _rows(report, "environment")
    assert "(--no-deps)" in environment["install"]["detail"]
    assert environment["torch"]["status"] == "pass" and report["torch"] == installed
    assert f"torch {installed} sees no CUDA device" in report["gpu_skip_reason"]
    assert f"loaded against torch {installed}" in _rows(report, report["wheels"][0]["filename"])[".so load"]["detail"]
    assert other.returncode == 12
    assert f"torch {installed} in {sys.executable}, but the recipe pins 2.11.0" in \
        _rows(json.loads((wheels / "smoke.json").read_text()), "environment")["torch"]["detail"]


@pytest.mark.parametrize("args, message", [
    (["--index", "file:///nowhere/simple", "--wheels", "."], "give --index URL or --wheels DIR, not both"),
    (["--wheels", "empty"], "no wheels in "),
    (["--wheels", "empty", "--python", "/no/such/python3"], "--python /no/such/python3: no such interpreter"),
])
def test_bad_input_is_one_line(tmp_path, args, message, make_recipe):
    recipe = make_recipe(tmp_path / "recipes", **smoke_recipe())
    (tmp_path / "empty").mkdir()
    if "/no/such/python3" in args:
        make_wheel(tmp_path / "empty", build_unresolved_so(tmp_path))

    result = gpuwheel("smoke", recipe, *args, cwd=tmp_path)

    assert result.returncode == (2 if "not both" in message else 12), result.stderr
    assert message in result.stderr.strip().splitlines()[-1]
    assert not list(tmp_path.glob("**/smoke.json"))


def test_the_built_head_dims_come_from_the_plan_env_in_gpuwheel_json():
    # as gpuwheel.wheels writes it: the package's build env under "build"
    provenance = {"target": "h100", "build": {"profile": "inference", "env": {"GPUWHEEL_FA_HEAD_DIMS": "64;128;256"}}}
    assert built_head_dims(Provenance.from_json(provenance)) == [64, 128, 256]
    assert built_head_dims(Provenance.from_json({"target": "h100"})) is None
    assert built_head_dims(None) is None


# gpuwheel.json of a vLLM 0.26.0 serving build for 9.0a (recipes/h200-torch211.toml), as wheels.py writes it
SERVING = {"head_dims": [128], "dtypes": ["fp16", "bf16"], "omit": ["fa3", "flashmla"]}
VLLM_PROVENANCE = {"target": TARGET, "build": {"profile": "serving", "serving": SERVING}}


@pytest.fixture(scope="module")
def driver_linked_so(tmp_path_factory) -> Path:
    """A .so that needs the NVIDIA driver's libcuda.so.1, linked against a stub that is then out of sight."""
    directory = tmp_path_factory.mktemp("driver")
    return build_driver_linked_so(directory, build_libcuda_stub(directory / "stub"))


def test_a_vllm_0_26_wheel_on_a_machine_without_gpu_or_driver_is_checked_as_far_as_it_can_be(
        tmp_path, driver_linked_so, make_recipe):
    # 0.26.0's layout: the op libraries are *_stable_libtorch, FA3 and FlashMLA left out by the profile,
    # and DeepGEMM's extension built for several CPythons
    wheel = make_vllm_wheel(tmp_path / "wheels", {
        "vllm/_C_stable_libtorch.abi3.so": driver_linked_so,
        "vllm/_moe_C_stable_libtorch.abi3.so": driver_linked_so,
        "vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so": driver_linked_so,
        "vllm/third_party/deep_gemm/_C.cpython-399-x86_64-linux-gnu.so": build_unresolved_so(tmp_path),
    }, provenance=VLLM_PROVENANCE)

    result = gpuwheel("smoke", make_recipe(tmp_path / "recipes", **smoke_recipe()), "--wheels", tmp_path / "wheels")

    assert result.returncode == 14, result.stderr
    checks = _rows(json.loads((tmp_path / "wheels" / "smoke.json").read_text()), wheel.name)
    libraries = checks["op libraries in the wheel"]
    assert libraries["status"] == "pass"
    assert libraries["detail"] == ("_C (vllm/_C_stable_libtorch.abi3.so), _moe_C (vllm/_moe_C_stable_libtorch.abi3.so), "
                                   "_vllm_fa2_C (vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so); "
                                   "left out by the serving profile: fa3, flashmla")
    loading = checks[".so load"]
    assert loading["status"] == "skip"  # no driver here: not the wheel's failure, and no pass either
    assert "3 of 3 .so need the NVIDIA driver's libcuda.so.1, which this machine lacks" in loading["detail"]
    assert "1 extension module(s) for other Pythons not loaded (cpython-399)" in loading["detail"]
    assert checks["import"]["status"] == "pass"
    assert checks["op libraries"] == {**checks["op libraries"], "status": "skip",
                                      "detail": "torch is not installed in this interpreter: the op libraries load into torch"}
    gpu = {name: c for name, c in checks.items() if name.startswith("GPU: ")}
    assert sorted(gpu) == [
        "GPU: FA2 varlen (head dims 128), moe_permute and MoE at 8192 tokens",
        "GPU: moe_permute refuses mismatched rows at 8192 tokens",
        "GPU: tiny model generating with 8192-token chunked prefill (compiled)",
        "GPU: tiny model generating with 8192-token chunked prefill (eager)",
        "GPU: what the serving profile left out of FA2 raises"]
    assert all(c["status"] == "skip" and "no GPU visible" in c["detail"] for c in gpu.values())


def test_a_vllm_wheel_missing_an_op_library_or_holding_an_omitted_one_fails(tmp_path, driver_linked_so, make_recipe):
    wheel = make_vllm_wheel(tmp_path / "wheels", {
        "vllm/_C_stable_libtorch.abi3.so": driver_linked_so,
        "vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so": driver_linked_so,
        "vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so": driver_linked_so,  # the profile omits fa3
    }, provenance=VLLM_PROVENANCE)

    result = gpuwheel("smoke", make_recipe(tmp_path / "recipes", **smoke_recipe()), "--wheels", tmp_path / "wheels")

    assert result.returncode == 12, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "gpuwheel: error: 1 smoke check(s) failed for target h100-smoke: ")
    libraries = _rows(json.loads((tmp_path / "wheels" / "smoke.json").read_text()),
                      wheel.name)["op libraries in the wheel"]
    assert libraries["status"] == "fail"
    assert libraries["detail"] == (
        "the wheel has no _moe_C (vllm/_moe_C_stable_libtorch.*so or vllm/_moe_C.*so); the serving profile omits "
        "fa3, flashmla, yet the wheel has vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so")


def test_the_serving_profile_comes_from_gpuwheel_json():
    assert built_serving(Provenance.from_json(VLLM_PROVENANCE)) == SERVING
    assert built_serving(Provenance.from_json({"build": {"profile": "full", "serving": None}})) is None
    assert built_serving(Provenance.from_json({"target": "h200"})) is None and built_serving(None) is None


def test_the_append_kv_refusal_is_checked_where_the_wheel_was_built_without_those_kernels(tmp_path):
    """Patch 0012 left FA2's appending split-KV kernels out: the wheel's provenance names it, and the
    FA2 error group then expects fwd_kvcache with new keys to be refused; a wheel without it is not asked."""
    def fa2_spec(provenance: dict) -> dict:
        groups = smoke_groups("vllm", Provenance.from_json(provenance), (), tmp_path)
        return next(g.spec for g in groups if g.group == "vllm-fa2-errors")["fa2"]

    patches = [{"name": APPEND_KV_PATCH, "sha256": "0" * 64, "strip": 1, "tree": "vllm-flash-attn"}]
    assert APPEND_KV_PATCH in (PATCHES / "0.26.0" / "series").read_text()
    assert fa2_spec({**VLLM_PROVENANCE, "patches": patches}) == {
        "head_dims": [128], "dtypes": ["fp16", "bf16"], "append_kv": False}
    assert "append_kv" not in fa2_spec(VLLM_PROVENANCE)  # built before 0012: the kernels are there
    full = {"target": TARGET, "build": {"profile": "full", "serving": None}, "patches": patches}
    assert "append_kv" not in fa2_spec(full)  # 0012 changes nothing without the serving profile


def _gpu_of_cc_90() -> str | None:
    """Why the GPU test cannot run here, or None when python3 sees a compute capability 9.0 GPU."""
    probe = subprocess.run(["python3", "-c", "import torch; print(torch.cuda.get_device_capability() "
                            "if torch.cuda.is_available() else 'none')"], capture_output=True, text=True)
    if probe.returncode != 0:
        return "python3 has no torch"
    return None if probe.stdout.strip() == "(9, 0)" else f"no compute capability 9.0 GPU (torch sees {probe.stdout.strip()})"


@pytest.mark.gpu
def test_on_an_h100_the_report_passes(tmp_path, cuda_so, make_recipe):
    reason = _gpu_of_cc_90()
    if reason:
        pytest.skip(f"needs an NVIDIA GPU of compute capability 9.0 and torch in python3: {reason}")
    recipe = make_recipe(tmp_path / "recipes", **smoke_recipe(python="3.12"))
    make_wheel(tmp_path / "wheels", cuda_so, provenance=PROVENANCE)

    result = gpuwheel("smoke", recipe, "--wheels", tmp_path / "wheels", "--python", "python3")

    report = json.loads((tmp_path / "wheels" / "smoke.json").read_text())
    assert report["gpu"]["compute_capability"] == "9.0" and report["gpu_checks"] == "ran"
    assert result.returncode in (0, 12), result.stderr  # 12 only for a torch that differs from the pin
    assert all(c["status"] == "pass" for c in report["wheels"][0]["checks"])


def test_the_marlin_check_reads_which_ops_have_a_cuda_kernel(tmp_path, monkeypatch):
    """Patch 0009 leaves the Marlin ops' schemas without CUDA kernels: the op check (vllm-ops, no GPU)
    passes a serving wheel that omits Marlin only when its ops have none, a full wheel only when
    each has one. Ops of a test namespace stand in for `_C::marlin_gemm` and kin, registered through
    torch's dispatcher the way vLLM's .cu files register theirs."""
    torch = pytest.importorskip("torch", reason="the check reads torch's dispatcher (pip install torch)")
    from gpuwheel.smoke import vllm as vllm_checks
    from gpuwheel.smoke.probe import Recorder

    schemas = torch.library.Library("gpuwheel_marlin_test", "DEF")
    for op in ("with_cuda", "without_cuda"):
        schemas.define(f"{op}(Tensor x) -> Tensor")
    kernels = torch.library.Library("gpuwheel_marlin_test", "IMPL", "CUDA")
    kernels.impl("with_cuda", lambda x: x)

    def marlin_check(ops: tuple[str, ...], omit: list[str]) -> dict:
        monkeypatch.setitem(vllm_checks.OMITTABLE_OPS, "marlin", {"gpuwheel_marlin_test": ops})
        results = tmp_path / f"{len(list(tmp_path.iterdir()))}.jsonl"
        recorder = Recorder(str(results))
        vllm_checks.run_op_checks({"root": str(tmp_path), "op_libraries": [], "omit": omit}, recorder)
        recorder.handle.close()
        (row,) = [json.loads(line) for line in results.read_text().splitlines()]
        return row

    assert marlin_check(("with_cuda",), [])["status"] == "pass"
    omitted = marlin_check(("without_cuda",), ["fa3", "marlin"])
    assert (omitted["name"], omitted["status"]) == ("marlin kernels left out", "pass")
    assert omitted["detail"] == "gpuwheel_marlin_test::without_cuda: no CUDA kernel (refused at call)"
    full = marlin_check(("with_cuda", "without_cuda"), [])
    assert (full["name"], full["status"]) == ("marlin kernels built", "fail")
    assert full["detail"] == "gpuwheel_marlin_test::without_cuda has no CUDA kernel"
    left_out = marlin_check(("with_cuda", "without_cuda"), ["marlin"])
    assert (left_out["status"], left_out["detail"]) == ("fail", "gpuwheel_marlin_test::with_cuda still has a CUDA kernel")
    assert marlin_check(("not_defined",), [])["status"] == "skip"


def test_the_attention_checks_tolerance_is_twice_torchs_own_error_never_below_the_dtypes_floor():
    """One rule for the FA2 and flash-attn attention checks (varlen, decode, append-KV): a dtype's
    floor while torch SDPA's own error is small, twice that error above it."""
    from gpuwheel.smoke.flash_attn import FLOOR, tolerance_for

    assert tolerance_for("torch.float16", 0.0) == FLOOR["float16"] == 2e-3
    assert tolerance_for("torch.float16", 1e-3) == 2e-3  # 2 x 1e-3: at the floor
    assert tolerance_for("torch.float16", 1.3e-3) == pytest.approx(2.6e-3)  # the H100's fp16 causal varlen
    assert tolerance_for("torch.bfloat16", 1e-3) == FLOOR["bfloat16"] == 1.6e-2
    assert tolerance_for("torch.bfloat16", 9.99e-3) == pytest.approx(1.998e-2)

"""Package kinds as a user meets them: a recipe entry picks its kind (or gets the one named after the
package, else the generic kind), and plan, smoke and the audit follow the kind. causal-conv1d is the
shipped package of the generic kind (rtx6000pro-cu13)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from smoke_helpers import build_cuda_so, make_wheel, smoke_recipe

MAMBA = {"name": "mamba-ssm", "version": "2.2.6", "kind": "generic",
         "source": {"sdist": "mamba_ssm-2.2.6.tar.gz", "sha256": "0" * 64}, "env": {"MAMBA_FORCE_BUILD": "TRUE"}}


def mamba_recipe(make_recipe, directory: Path, **changes) -> Path:
    """The shipped generic-kind target plus mamba-ssm, its entry changed by `changes` (None leaves a key out)."""
    package = {key: value for key, value in {**MAMBA, **changes}.items() if value is not None}
    return make_recipe(directory, extends="rtx6000pro-cu13", package=[package])


def _package(plan: dict, name: str) -> dict:
    return next(p for p in plan["packages"] if p["name"] == name)


def test_a_generic_package_plans_with_the_recipe_archs_and_its_own_env(gpuwheel, make_recipe, tmp_path):
    result = gpuwheel("plan", mamba_recipe(make_recipe, tmp_path), "--only", "mamba-ssm", "--json", "--jobs", "3")

    assert result.exit_code == 0, result.stderr
    package = _package(result.json(), "mamba-ssm")
    assert package["kind"] == "generic"
    assert package["env"] == {"TORCH_CUDA_ARCH_LIST": "12.0", "MAMBA_FORCE_BUILD": "TRUE", "MAX_JOBS": "3",
                              "NVCC_THREADS": "1"}
    assert package["audit_optional"] == [] and package["stand_ins"] == [] and package["measured_build"] is None


def test_the_plan_table_shows_a_generic_package_env(gpuwheel, make_recipe, tmp_path):
    result = gpuwheel("plan", mamba_recipe(make_recipe, tmp_path), "--only", "mamba-ssm")

    assert result.exit_code == 0, result.stderr
    assert "TORCH_CUDA_ARCH_LIST" in result.stdout and "MAMBA_FORCE_BUILD" in result.stdout


def test_a_package_without_a_kind_key_takes_the_kind_named_after_it_else_the_generic_one(
        gpuwheel, make_recipe, tmp_path):
    plan = gpuwheel("plan", mamba_recipe(make_recipe, tmp_path, kind=None), "--json").json()

    assert {p["name"]: p["kind"] for p in plan["packages"]} == {
        "flash-attn": "flash-attn", "vllm": "vllm", "causal-conv1d": "generic", "mamba-ssm": "generic"}
    assert "FLASH_ATTN_CUDA_ARCHS" in _package(plan, "flash-attn")["env"]


def test_a_package_can_name_the_kind_it_builds_like(gpuwheel, make_recipe, tmp_path):
    # a fork of flash-attn under another name builds as flash-attn does
    fork = mamba_recipe(make_recipe, tmp_path, name="flash-attn-fork", kind="flash-attn")
    plan = gpuwheel("plan", fork, "--only", "flash-attn-fork", "--json").json()

    env = _package(plan, "flash-attn-fork")["env"]
    assert env["FLASH_ATTN_CUDA_ARCHS"] == "120" and env["FLASH_ATTENTION_FORCE_BUILD"] == "TRUE"


def test_an_unknown_kind_is_one_line_naming_the_field_and_exit_code_2(gpuwheel, make_recipe, tmp_path):
    path = mamba_recipe(make_recipe, tmp_path, kind="flash_attn")

    result = gpuwheel("plan", path)

    assert result.exit_code == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"{path.name}:{make_recipe.line(path, 'kind = ')}: " in result.stderr  # the file and line of the kind key
    assert "unknown package kind 'flash_attn' (did you mean 'flash-attn'?)" in result.stderr


def test_a_profile_of_another_kind_is_refused(gpuwheel, make_recipe, tmp_path):
    path = mamba_recipe(make_recipe, tmp_path, profile="inference")

    result = gpuwheel("plan", path)

    assert result.exit_code == 2, result.stderr
    assert "profile 'inference' is for flash-attn, not mamba-ssm" in result.stderr


def test_causal_conv1d_ships_through_the_generic_kind_with_its_patch_and_no_prebuilt_download(gpuwheel):
    plan = gpuwheel("plan", "rtx6000pro-cu13", "--only", "causal-conv1d", "--json").json()

    package = _package(plan, "causal-conv1d")
    assert package["kind"] == "generic"
    assert package["source"]["location"] == "causal_conv1d-1.7.0.tar.gz"
    assert package["env"]["TORCH_CUDA_ARCH_LIST"] == "12.0"
    assert package["env"]["CAUSAL_CONV1D_FORCE_BUILD"] == "TRUE"  # setup.py would fetch a prebuilt wheel
    assert [p["name"] for p in package["patches"]] == ["0001-archs-from-torch-cuda-arch-list.patch"]


# ---- smoke -------------------------------------------------------------------------------------------
def _smoke(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpuwheel", "smoke", *map(str, args)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "COLUMNS": "250"})


def test_a_causal_conv1d_wheel_without_a_gpu_skips_its_gpu_check_with_the_reason(tmp_path, make_recipe):
    if not Path(shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc").exists():
        pytest.skip("needs nvcc (CUDA toolkit) to build the test wheel's kernel")
    (tmp_path / "so").mkdir()
    wheel = make_wheel(tmp_path / "wheels", build_cuda_so(tmp_path / "so"), name="causal-conv1d", version="1.7.0",
                       provenance={"audit": {"passed": True}})

    result = _smoke(make_recipe(tmp_path / "recipes", **smoke_recipe()), "--wheels", tmp_path / "wheels")

    assert result.returncode == 14, result.stderr  # never a pass without the GPU checks
    report = json.loads((tmp_path / "wheels" / "smoke.json").read_text())
    checks = {c["name"]: c for w in report["wheels"] if w["filename"] == wheel.name for c in w["checks"]}
    gpu = checks["GPU: causal_conv1d_fn and causal_conv1d_update against a torch conv1d reference"]
    assert gpu["status"] == "skip" and "no GPU visible" in gpu["detail"]
    assert checks["import"]["status"] == "pass"  # the host side of the generic kind still ran


def test_the_causal_conv1d_reference_is_a_causal_depthwise_conv():
    torch = pytest.importorskip("torch")
    # the check module, loaded by path under a private name as probe.py loads it
    path = Path(__file__).parents[1] / "builder" / "gpuwheel" / "smoke" / "causal_conv1d.py"
    spec = importlib.util.spec_from_file_location("_gpuwheel_smoke_causal_conv1d", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reference = module.reference
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    weight = torch.tensor([[0.5, 1.0, 2.0]])  # output t = 0.5 x[t-2] + x[t-1] + 2 x[t]
    assert reference(x, weight, None, None).tolist() == [[[2.0, 5.0, 8.5, 12.0]]]
    assert reference(x, weight, torch.tensor([1.0]), "silu").shape == (1, 1, 4)

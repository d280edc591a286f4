"""vLLM recipes as users write them: the serving profile, stand-ins, the Rust frontend, and what
`gpuwheel plan` makes of them for the shipped 12.0 and 9.0a targets."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from gpuwheel import facts
from gpuwheel.kinds import vllm as vllm_kind

def vllm_recipe(make_recipe, directory, **fields):
    """The 12.0 vLLM target with these fields added to its vllm package."""
    return make_recipe(directory, extends="rtx6000pro-torch211", package=[{"name": "vllm", **fields}])


def plan_json(gpuwheel, recipe) -> dict:
    result = gpuwheel("plan", recipe, "--only", "vllm", "--json")
    assert result.exit_code == 0, result.stderr
    return result.json()["packages"][0]


def test_the_12_0_serving_plan_builds_fa2_for_head_dim_128_and_stands_in_for_python_only_dependencies(gpuwheel):
    package = plan_json(gpuwheel, "rtx6000pro-torch211")

    assert package["serving"] == {"head_dims": [128], "dtypes": ["fp16", "bf16"], "omit": []}
    assert package["stand_ins"] == ["flashmla", "fmha_sm100", "tml_fa4", "triton_kernels"]
    env = package["env"]
    assert (env["GPUWHEEL_VLLM_FA2_HEAD_DIMS"], env["GPUWHEEL_VLLM_OMIT"]) == ("128", "")
    # triton_kernels.cmake wants the package directory itself, not the repository
    assert env["TRITON_KERNELS_SRC_DIR"].endswith("/triton_kernels/python/triton_kernels/triton_kernels")
    assert (env["CARGO"], env["CARGO_NET_OFFLINE"]) == ("false", "true")  # Rust frontend off, never online


def test_the_hopper_plan_leaves_fa3_and_flashmla_out_and_needs_no_flashmla_sources(gpuwheel):
    result = gpuwheel("plan", "h200-torch211", "--only", "vllm", "--json")
    package = result.json()["packages"][0]

    assert package["serving"]["omit"] == ["fa3", "flashmla"]
    assert package["env"]["GPUWHEEL_VLLM_OMIT"] == "fa3;flashmla"
    assert "flashmla" in package["stand_ins"]
    assert not any("dependency flashmla" in step for step in result.json()["steps"])


GPU_RECIPES = Path(__file__).parent / "gpu" / "recipes"


# tests/gpu/recipes/ → the package the GPU runs build of it (docs/gpu-runs.md)
GPU_RUNS = {
    "h100-torch211": "flash-attn",  # its vLLM pins torch 2.14: flash-attn only, as its comment says
    "h200-causal-conv1d": "causal-conv1d",
    "h200-torch211-full": "vllm",
    "rtx6000pro-torch211-cmake-order": "vllm",
    "rtx6000pro-torch211-nomarlin": "vllm",
    "rtx6000pro-torch211-stock": "vllm",
}


def test_every_recipe_of_the_gpu_runs_plans_the_package_they_build(gpuwheel):
    assert sorted(GPU_RUNS) == sorted(path.stem for path in GPU_RECIPES.glob("*.toml"))
    for name, package in GPU_RUNS.items():
        result = gpuwheel("plan", GPU_RECIPES / f"{name}.toml", "--only", package, "--json")
        assert result.exit_code == 0, f"{name}: {result.stderr}"


def test_the_stock_baseline_recipe_builds_vllm_as_released(gpuwheel):
    result = gpuwheel("plan", GPU_RECIPES / "rtx6000pro-torch211-stock.toml", "--only", "vllm", "--json")
    assert result.exit_code == 0, result.stderr
    [package] = result.json()["packages"]

    assert package["serving"] is None and package["patches"] == []  # no profile, no patch
    assert not any(key.startswith("GPUWHEEL_VLLM_") for key in package["env"])
    assert not any(step.startswith("patch vllm") for step in result.json()["steps"])


def test_a_blackwell_datacenter_plan_compiles_flashmla_from_its_sources(gpuwheel, make_recipe, tmp_path):
    recipe = make_recipe(tmp_path, extends="rtx6000pro-torch211",
                         target={"name": "b200-vllm", "compute_capability": "10.0", "torch_cuda_arch_list": "10.0"})

    package = plan_json(gpuwheel, recipe)

    assert "flashmla" not in package["stand_ins"]  # flashmla.cmake builds 10.0f with CUDA 13


def test_a_recipe_that_omits_marlin_says_so_to_the_build(gpuwheel, make_recipe, tmp_path):
    recipe = vllm_recipe(make_recipe, tmp_path, serving={"omit": ["marlin"]})

    package = plan_json(gpuwheel, recipe)

    assert package["serving"]["omit"] == ["marlin"]
    assert package["env"]["GPUWHEEL_VLLM_OMIT"] == "marlin"  # what patch 0009's CMake reads
    assert "marlin" not in package["stand_ins"]  # Marlin is vLLM's own code: no sources to stand in for


@pytest.mark.parametrize("fields, message", [
    ({"serving": {"head_dims": [100]}}, "'100' is not one of vLLM's FA2 head dims (choose from 32, 64, 96, 128"),
    ({"serving": {"omit": ["fa4"]}}, "'fa4' is no kernel family gpuwheel can leave out of vLLM (did you mean 'fa3'?)"),
    ({"serving": {"dtypes": [], "head_dims": []}}, "the serving profile builds no FA2 kernels"),
    ({"rust_frontend": "requried"}, "unknown rust_frontend 'requried' (did you mean 'required'?)"),
    ({"stand_in": {"wheel": "vllm-0.26.0.tar.gz", "sha256": "0" * 64}},
     "'vllm-0.26.0.tar.gz' is not a wheel file name"),
    ({"stand_in": {"sha256": "abc"}}, "sha256 must be 64 lowercase hex digits"),
])
def test_bad_vllm_keys_get_one_line_naming_the_file_and_key(gpuwheel, make_recipe, tmp_path, fields, message):
    recipe = vllm_recipe(make_recipe, tmp_path, **fields)

    result = gpuwheel("plan", recipe)

    assert result.exit_code == 2
    assert message in result.stderr
    assert "recipe.toml:" in result.stderr and "Traceback" not in result.stderr


def test_a_dependency_path_that_leaves_the_tree_is_refused(gpuwheel, make_recipe, tmp_path):
    recipe = vllm_recipe(make_recipe, tmp_path, dependency=[{
        "name": "triton_kernels", "git": "https://github.com/triton-lang/triton.git", "rev": "v3.5.1",
        "src_dir_env": "TRITON_KERNELS_SRC_DIR", "subdir": "../../etc"}])

    result = gpuwheel("plan", recipe)

    assert result.exit_code == 2
    assert "subdir '../../etc' must be a relative path inside the tree" in result.stderr


def test_the_serving_profile_is_vllms_and_the_inference_profile_flash_attns(gpuwheel, make_recipe, tmp_path):
    recipe = make_recipe(tmp_path, extends="rtx6000pro-torch211",
                         package=[{"name": "flash-attn", "profile": "serving"}])

    result = gpuwheel("plan", recipe)

    assert result.exit_code == 2
    assert "profile 'serving' is for vllm, not flash-attn" in result.stderr


@pytest.mark.parametrize("torch, cuda, requirement", [
    ("2.11.0", "12.8.1", "torch==2.11.0+cu128"),  # PyPI's 2.11.0 is a CUDA 13.0 build
    ("2.11.0", "13.0.2", "torch==2.11.0"),
    ("2.10.0", "12.8.1", "torch==2.10.0"),  # PyPI's 2.10.0 is the CUDA 12.8 build
    ("2.14.1", "13.0.2", "torch==2.14.1"),
])
def test_the_toolchain_asks_pip_for_the_torch_build_of_the_recipes_toolkit(torch, cuda, requirement):
    assert facts.torch_requirement(torch, cuda) == requirement


def test_plan_predicts_a_build_from_the_measured_build_of_the_same_profile(gpuwheel, make_recipe, tmp_path):
    measured = plan_json(gpuwheel, "h200-torch211")["measured_build"]
    text = gpuwheel("plan", "h200-torch211", "--only", "vllm").stdout

    expected = vllm_kind.MEASURED_BUILDS[("0.26.0", "9.0a", "serving:128:fp16,bf16:fa3,flashmla")]
    assert (measured["cpu_s"], measured["longest_s"]) == (expected.cpu_s, expected.longest_s)
    assert (f"vllm 0.26.0: measured {expected.cpu_s:,} CPU-s, longest step {expected.longest_s} s"
            in text.replace("\n", " "))
    wider = make_recipe(tmp_path, extends="h200-torch211",
                        package=[{"name": "vllm", "serving": {"head_dims": [64, 128]}}])
    assert plan_json(gpuwheel, wider)["measured_build"] is None  # no measured build of that profile


@pytest.mark.parametrize("target, serving, ordered", [
    ("rtx6000pro-torch211", None, True),  # the very profile the 12.0 table was measured from
    ("rtx6000pro-torch211", {"omit": ["marlin"]}, True),  # fewer TUs: the Marlin lines order nothing
    ("rtx6000pro-torch211", {"dtypes": ["bf16"]}, True),
    ("rtx6000pro-torch211", {"head_dims": [96, 128]}, False),  # hd96 TUs the table does not know
    ("h200-torch211", None, True),
    ("h200-torch211", {"omit": ["flashmla"]}, False),  # FA3's TUs would start after every listed one
])
def test_the_compile_order_table_goes_only_to_builds_it_covers(gpuwheel, make_recipe, tmp_path, target, serving,
                                                               ordered):
    recipe = make_recipe(tmp_path, extends=target, package=[{"name": "vllm", **({"serving": serving} if serving else {})}])

    env = plan_json(gpuwheel, recipe)["env"]

    assert env.get(vllm_kind.COMPILE_ORDER_ENV) == (vllm_kind.COMPILE_ORDER_FILE if ordered else None)
    if ordered:
        tree = vllm_kind.tree_files("0.26.0", env)[vllm_kind.COMPILE_ORDER_FILE]
        assert tree == (vllm_kind.COMPILE_ORDER_DIR / f"0.26.0-{env['TORCH_CUDA_ARCH_LIST']}.tsv").read_text()


@pytest.mark.parametrize("key", sorted(vllm_kind.COMPILE_ORDERS))
def test_each_shipped_compile_order_is_what_its_ninja_log_gives(key, build_vllm):
    """The tables are made, not edited: benchmarks/build_vllm.py --write-order of the committed log."""
    table = (vllm_kind.COMPILE_ORDER_DIR / vllm_kind.COMPILE_ORDERS[key][1]).read_text()
    log = Path(__file__).parent.parent / "docs" / "runs" / table.splitlines()[0].rsplit(" from ", 1)[1]

    assert table == build_vllm.compile_order(build_vllm.read_log(log), log.name)


def test_an_empty_compile_order_in_the_recipes_env_builds_in_cmakes_order(gpuwheel, make_recipe, tmp_path):
    recipe = vllm_recipe(make_recipe, tmp_path, env={vllm_kind.COMPILE_ORDER_ENV: ""})

    env = plan_json(gpuwheel, recipe)["env"]

    assert env[vllm_kind.COMPILE_ORDER_ENV] == ""  # patch 0011 reads empty as off
    assert vllm_kind.COMPILE_ORDER_FILE not in vllm_kind.tree_files("0.26.0", env)


@pytest.mark.parametrize("value", ["/home/me/my-order.tsv", "../outside.tsv"])
def test_a_compile_order_the_recipe_names_itself_is_never_written_by_gpuwheel(gpuwheel, make_recipe, tmp_path, value):
    recipe = vllm_recipe(make_recipe, tmp_path, env={vllm_kind.COMPILE_ORDER_ENV: value})

    env = plan_json(gpuwheel, recipe)["env"]

    assert env[vllm_kind.COMPILE_ORDER_ENV] == value
    assert vllm_kind.tree_files("0.26.0", env) == {}  # the patch stage writes no file there, the shipped table nowhere
    assert vllm_kind.tree_files("0.26.0", {**env, "TORCH_CUDA_ARCH_LIST": "10.0"}) == {}  # no table, no KeyError


def test_a_full_build_gets_no_compile_order(gpuwheel, make_recipe, tmp_path):
    recipe = make_recipe(tmp_path, extends="rtx6000pro-torch211", package=[{"name": "vllm", "profile": "full"}])

    assert vllm_kind.COMPILE_ORDER_ENV not in plan_json(gpuwheel, recipe)["env"]


def _vendored_crate(root):
    """`cargo vendor`-shaped output holding one crate, and an app that depends on it from crates.io."""
    import hashlib
    import json
    crate = root / "vendor" / "gwdep"
    (crate / "src").mkdir(parents=True)
    (crate / "Cargo.toml").write_text('[package]\nname = "gwdep"\nversion = "0.1.0"\nedition = "2021"\n')
    (crate / "src" / "lib.rs").write_text("pub fn answer() -> u32 { 42 }\n")
    files = {p.relative_to(crate).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in crate.rglob("*") if p.is_file()}
    (crate / ".cargo-checksum.json").write_text(json.dumps({"files": files, "package": None}))
    app = root / "app"
    (app / "src").mkdir(parents=True)
    (app / "Cargo.toml").write_text('[package]\nname = "app"\nversion = "0.1.0"\nedition = "2021"\n'
                                    '[dependencies]\ngwdep = "0.1"\n')
    (app / "src" / "main.rs").write_text('fn main() { println!("{}", gwdep::answer()); }\n')
    return root / "vendor", app


@pytest.mark.skipif(not shutil.which("cargo"), reason="needs cargo (rustup or apt-get install cargo)")
def test_vendored_crates_build_offline_with_gpuwheels_cargo_source_replacement(tmp_path, make_recipe, gpuwheel):
    vendor, app = _vendored_crate(tmp_path)
    recipe = vllm_recipe(make_recipe, tmp_path, rust_frontend="required", cargo_vendor=str(vendor))
    env = plan_json(gpuwheel, recipe)["env"]
    assert (env["VLLM_REQUIRE_RUST_FRONTEND"], env["GPUWHEEL_CARGO_VENDOR"]) == ("1", str(vendor))
    (app / ".cargo").mkdir()
    (app / ".cargo" / "config.toml").write_text(vllm_kind.cargo_config(env["GPUWHEEL_CARGO_VENDOR"]))
    offline = {**os.environ, "CARGO_NET_OFFLINE": "true", "CARGO_HOME": str(tmp_path / "cargo-home")}

    built = subprocess.run(["cargo", "run", "-q"], cwd=app, env=offline, capture_output=True, text=True, timeout=300)

    assert built.returncode == 0, built.stderr
    assert built.stdout.strip() == "42"
    (app / ".cargo" / "config.toml").unlink()  # without the replacement: a fast, offline refusal, no hang
    refused = subprocess.run(["cargo", "build", "-q"], cwd=app, env=offline, capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode != 0 and "offline" in refused.stderr


def test_the_serving_profile_is_refused_for_a_release_whose_patch_set_lacks_it(gpuwheel, make_recipe, tmp_path):
    recipe = make_recipe(tmp_path, extends="rtx6000pro-cu13", package=[{"name": "vllm", "profile": "serving"}])

    result = gpuwheel("plan", recipe, "--only", "vllm")

    assert result.exit_code == 3
    assert "vLLM 0.33.0: gpuwheel's serving profile exists for vLLM 0.26.0 only" in result.stderr.replace("\n", " ")

"""Recipes, compatibility checks and `plan`: the story of a user picking a target."""

from __future__ import annotations

import shutil
import string
import sys

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuwheel import facts
from gpuwheel.errors import RecipeError
from gpuwheel.plan import make_plan
from gpuwheel.recipe import PROJECT_ROOT, list_targets, load_recipe

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

SHIPPED = ["rtx6000pro", "rtx6000pro-cu13", "rtx6000pro-torch211", "h100", "h200", "h200-torch211", "b200", "l40s",
           "a100"]


def test_every_required_target_is_shipped_and_plans(gpuwheel):
    assert set(SHIPPED) <= set(list_targets())
    for name in list_targets():
        result = gpuwheel("plan", name, "--json")
        assert result.exit_code == 0, result.stderr
        plan = result.json()
        assert {"hash", "target", "toolchain", "packages"} <= plan.keys()
        # rtx6000pro-cu13 also builds causal-conv1d, the generic kind's shipped example
        extra = ["causal-conv1d"] if name == "rtx6000pro-cu13" else []
        assert [p["name"] for p in plan["packages"]] == ["flash-attn", "vllm", *extra]


def test_rtx6000pro_plan_builds_sm120_for_both_packages_with_a_toolkit_the_570_driver_runs(gpuwheel):
    plan = gpuwheel("plan", "rtx6000pro", "--json").json()
    env = {p["name"]: p["env"] for p in plan["packages"]}
    assert env["flash-attn"]["FLASH_ATTN_CUDA_ARCHS"] == "120"
    assert env["vllm"]["TORCH_CUDA_ARCH_LIST"] == "12.0"
    cuda = plan["toolchain"]["cuda"]
    assert facts.driver_tuple(facts.cuda_min_driver(cuda)) <= facts.driver_tuple("570.195.03")
    assert plan["target"]["min_driver"] == "570.195.03"
    assert env["vllm"]["VLLM_MAIN_CUDA_VERSION"] == facts.major_minor(cuda)


def test_vllm_plan_points_every_pinned_dependency_at_a_prefetched_tree(gpuwheel):
    plan = gpuwheel("plan", "rtx6000pro", "--json").json()
    vllm = next(p for p in plan["packages"] if p["name"] == "vllm")
    assert "-DFETCHCONTENT_FULLY_DISCONNECTED=ON" in vllm["env"]["CMAKE_ARGS"]
    names = {d["name"] for d in vllm["dependencies"]}
    assert {"cutlass", "vllm-flash-attn", "flashmla"} <= names
    for dep in vllm["dependencies"]:
        tree = f"$GPUWHEEL_DEPS/{dep['name']}" + (f"/{dep['subdir']}" if dep["subdir"] else "")
        assert vllm["env"].get(dep["src_dir_env"]) == tree or tree in vllm["env"]["CMAKE_ARGS"]
    assert {"MAX_JOBS", "NVCC_THREADS"} <= vllm["env"].keys()


def test_plan_text_shows_steps_env_and_hash(gpuwheel):
    result = gpuwheel("plan", "rtx6000pro")
    assert result.exit_code == 0
    out = result.stdout  # the result, on stdout: `gpuwheel plan rtx6000pro > plan.txt` keeps it
    assert "plan hash:" in out and "FLASH_ATTN_CUDA_ARCHS" in out and "VLLM_CUTLASS_SRC_DIR" in out
    assert "build flash-attn" in out and "build vllm" in out


def test_targets_table_lists_gpu_arch_cuda_torch_and_versions(gpuwheel):
    result = gpuwheel("targets")
    assert result.exit_code == 0
    for name in SHIPPED:
        assert name in result.stdout
    assert "12.0" in result.stdout and "9.0a" in result.stdout
    assert result.stderr == ""


def test_targets_json_lists_each_target_with_its_file_and_pins(gpuwheel):
    result = gpuwheel("targets", "--json")
    assert result.exit_code == 0, result.stderr
    targets = {t["name"]: t for t in result.json()["targets"]}
    assert sorted(targets) == sorted(SHIPPED)
    h100 = targets["h100"]
    assert h100["file"].endswith("recipes/h100.toml") and h100["compute_capability"] == "9.0"
    assert h100["packages"]["flash-attn"] == {"version": "2.8.3", "profile": "inference"}


def test_show_names_the_file_each_value_came_from(gpuwheel, make_recipe, tmp_path):
    path = make_recipe(tmp_path, extends="h100", toolchain={"python": "3.11"})
    result = gpuwheel("show", path)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    python_line = next(line for line in lines if "toolchain.python" in line)
    assert '"3.11"' in python_line and "recipe.toml" in python_line
    origins = {v["key"]: v["from"] for v in gpuwheel("show", path, "--json").json()["values"]}
    # the table may cut a long path short
    assert origins["toolchain.python"].endswith(f"recipe.toml:{make_recipe.line(path, 'python = ')}")
    cuda_line = next(line for line in lines if "toolchain.cuda" in line)
    assert "cuda-13" in cuda_line  # inherited from recipes/_base/


def test_show_prints_keys_and_values_as_written_not_as_markup_or_reprs(gpuwheel, make_recipe, tmp_path):
    path = make_recipe(tmp_path, extends="h100", package=[{
        "name": "flash-attn", "profile": "inference", "inference": {"head_dims": [64, 128], "disable": ["dropout"]},
        "env": {"NOTE": "[bold]kept[/bold]"}}])
    result = gpuwheel("show", path)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    head_dims = next(line for line in lines if "package[flash-attn].inference.head_dims" in line)
    assert "[64, 128]" in head_dims  # a TOML list, not a Python tuple
    note = next(line for line in lines if "package[flash-attn].env.NOTE" in line)
    assert '"[bold]kept[/bold]"' in note  # rich markup printed, not interpreted

    shown = gpuwheel("show", path, "--json").json()
    values = {v["key"]: v for v in shown["values"]}
    assert values["package[flash-attn].inference.head_dims"]["value"] == [64, 128]
    assert values["toolchain.cuda"] == {"key": "toolchain.cuda", "value": "13.0.2",
                                        "from": "recipes/_base/cuda-13.0.toml:5"}


# ---- impossible recipes: refused with every problem and the right numbers --------------------
def test_arch_120_with_cuda_126_needs_128(gpuwheel, make_recipe, tmp_path):
    path = make_recipe(tmp_path, extends="rtx6000pro", toolchain={"cuda": "12.6.3"})
    result = gpuwheel("plan", path)
    assert result.exit_code == 3
    assert "arch 12.0 needs CUDA ≥ 12.8 (recipe has 12.6.3)" in result.stderr
    assert "Traceback" not in result.stderr


def test_cuda_129_with_570_driver_is_refused_with_the_driver_it_needs(gpuwheel, make_recipe, tmp_path):
    path = make_recipe(tmp_path, extends="rtx6000pro", toolchain={"cuda": "12.9.1"})
    result = gpuwheel("plan", path)
    assert result.exit_code == 3
    assert "binaries from CUDA 12.9 need driver ≥ 575.51.03 (fleet min_driver 570.195.03)" in result.stderr
    assert "use CUDA ≤ 12.8" in result.stderr


def test_vllm_027_on_cuda_128_is_refused_because_torch_213_has_no_cu128_build(gpuwheel, make_recipe, tmp_path):
    # A 570-driver fleet wanting vLLM 0.27.0: its torch pin 2.13.0 is CUDA 13.0 on PyPI and has no
    # cu128 build on PyTorch's index either (cu128 ends with 2.11): refused before any download.
    path = make_recipe(tmp_path, extends="rtx6000pro", toolchain={"torch": "2.13.0"},
                       package=[{"name": "vllm", "version": "0.27.0", "profile": "full"}])
    result = gpuwheel("plan", path)
    assert result.exit_code == 3
    assert result.stderr.strip().splitlines() == [
        "gpuwheel: error: recipe.toml: 1 problem(s): torch 2.13.0 has no CUDA 12.8 build: PyTorch's cu128 wheels "
        "end with torch 2.11 (torch 2.13 has 12.6, 13.0, 13.2): use torch ≤ 2.11 with CUDA 12.8, or a toolkit this "
        "torch is built for"]


@pytest.mark.parametrize("torch", ["2.12.0", "2.14.1", "2.15.0"])
def test_cuda_128_with_any_torch_after_211_is_refused(gpuwheel, make_recipe, torch, tmp_path):
    path = make_recipe(tmp_path, extends="rtx6000pro", toolchain={"torch": torch})
    result = gpuwheel("plan", path, "--only", "flash-attn")  # no vLLM pin in the way
    assert result.exit_code == 3
    assert f"torch {torch} has no CUDA 12.8 build: PyTorch's cu128 wheels end with torch 2.11" in result.stderr


def test_cuda_128_with_torch_211_plans_and_cuda_13_with_213_too(gpuwheel, make_recipe, tmp_path):
    assert gpuwheel("plan", "rtx6000pro").exit_code == 0  # _base/cuda-12.8: torch 2.11.0
    path = make_recipe(tmp_path, extends="rtx6000pro-cu13", toolchain={"torch": "2.13.0"})
    result = gpuwheel("plan", path, "--only", "flash-attn")
    assert result.exit_code == 0, result.stderr


def test_every_problem_is_listed_at_once(gpuwheel, make_recipe, tmp_path):
    path = make_recipe(tmp_path, extends="rtx6000pro",
                       target={"torch_cuda_arch_list": "9.0a", "min_driver": "560.35.03"}, toolchain={"torch": "2.7.1"})
    result = gpuwheel("plan", path)
    assert result.exit_code == 3
    err = result.stderr
    assert "gives no native code for the target's compute capability 12.0" in err
    assert "need driver ≥ 570.26" in err
    assert "pins torch" in err
    assert len(err.strip().splitlines()) == 1  # one line, every problem on it


@pytest.mark.parametrize("base, arch_list, expected", [
    ("rtx6000pro", "12.0f", "arch 12.0f needs CUDA ≥ 12.9"),
    ("rtx6000pro", "8.8", "arch 8.8 needs CUDA ≥ 13.0 (recipe has 12.8.1)"),
    ("h100", "7.0;9.0a", "CUDA 13 cannot build arch 7.0"),
    ("b200", "10.0;10.1", "CUDA 13 cannot build arch 10.1"),  # CUDA 13 renamed sm_101 to sm_110
])
def test_archs_the_toolkit_cannot_build(make_recipe, base, arch_list, expected, tmp_path):
    path = make_recipe(tmp_path, extends=base, target={"torch_cuda_arch_list": arch_list})
    with pytest.raises(Exception) as raised:
        make_plan(load_recipe(path))
    assert expected in str(raised.value)


def test_cuda13_builds_sm_88(make_recipe, tmp_path):
    path = make_recipe(tmp_path, extends="rtx6000pro-cu13",
                       target={"compute_capability": "8.8", "torch_cuda_arch_list": "8.8"})
    plan = make_plan(load_recipe(path), only=("flash-attn",))
    assert plan.package("flash-attn").env_dict["FLASH_ATTN_CUDA_ARCHS"] == "80"


def test_vllm_0251_is_in_the_pin_table(gpuwheel, make_recipe, tmp_path):
    # the serving profile's patches are 0.26.0's
    path = make_recipe(tmp_path, extends="rtx6000pro",
                       package=[{"name": "vllm", "version": "0.25.1", "profile": "full"}])
    result = gpuwheel("plan", path, "--json")
    assert result.exit_code == 0, result.stderr
    assert not [note for note in result.json()["notes"] if "0.25.1" in note and "pin table" in note]


# ---- bad input: one line, file:line, the nearest valid name, its own exit code ---------------
# Literal texts: each is a recipe laid out by hand, and the point is the line its error names.
@pytest.mark.parametrize("text, expected", [
    ('extends = "h100"\n[toolchain]\ncuda_version = "13.0"\n',
     "recipe.toml:3: unknown key [toolchain] 'cuda_version' (did you mean 'cuda'?)"),
    ('extends = "h100"\n[targte]\nname = "x"\n', "recipe.toml:2: unknown key 'targte' (did you mean 'target'?)"),
    # A typo in a dotted key is reported where it is, not at line 1.
    ('extends = "h100"\n\n[[package]]\nname = "flash-attn"\nversion = "2.8.3"\n\n\n\nsource.shaa256 = "0"\n',
     "recipe.toml:9: unknown key [package.source] 'shaa256' (did you mean 'sha256'?)"),
    # A key after a multi-line string is on its own line, not inside the string.
    ('extends = "h100"\n[target]\ndescription = """\nracks in hall B, where\ngpux = "H100" was a typo\n"""\ngpux = "H100"\n',
     "recipe.toml:7: unknown key [target] 'gpux' (did you mean 'gpu'?)"),
    ('extends = "h10"\n', "unknown target 'h10' (did you mean 'h100'?)"),
    ('extends = "h100"\n[toolchain]\ncuda = 13.0\n',
     "recipe.toml:3: [toolchain] 'cuda' must be a string, got a number"),
    ('extends = "h100"\n[toolchain]\ntorch = "two.nine"\n', "toolchain.torch 'two.nine' is not a version"),
    ('extends = "h100"\n[target]\nmin_driver = "latest"\n', "'latest' is not a driver version"),
    ('extends = "h100"\n[target]\ncompute_capability = "sm_90"\n', "'sm_90' is not an arch"),
    ('[target]\nname = "x"\n', "missing [target] compute_capability"),
    ('[toolchain]\ncuda = "12.8"\n', "missing [target] table"),
    ('extends = "h100"\n[toolchain\n', "not valid TOML"),
    ('extends = "h100"\n[[package]]\nname = "flash-attn"\nprofile = "inferance"\n',
     "unknown profile 'inferance' (did you mean 'inference'?)"),
    ('extends = "h100"\n[[package]]\nname = "flash-attn"\nsource = { sdist = "x.tar.gz" }\n',
     "a sdist source needs its sha256"),
])
def test_bad_recipe_is_one_clear_line_with_exit_code_2(gpuwheel, make_recipe, text, expected, tmp_path):
    path = make_recipe(tmp_path, text=text)
    result = gpuwheel("plan", path)
    assert result.exit_code == 2, result.stderr
    assert expected in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_unknown_target_suggests_the_nearest(gpuwheel):
    result = gpuwheel("plan", "rtx6000")
    assert result.exit_code == 2
    assert "unknown target 'rtx6000' (did you mean 'rtx6000pro'?)" in result.stderr


def test_extends_cycle_is_named(gpuwheel, make_recipe, tmp_path):
    make_recipe(tmp_path, extends="b.toml", name="a.toml")
    b = make_recipe(tmp_path, extends="a.toml", name="b.toml")
    result = gpuwheel("plan", b)
    assert result.exit_code == 2
    assert "extends cycle: " in result.stderr and "a.toml" in result.stderr


# ---- merging ---------------------------------------------------------------------------------
def test_packages_merge_by_name_and_new_names_append(make_recipe, tmp_path):
    path = make_recipe(tmp_path, extends="h100",
                       package=[{"name": "flash-attn", "profile": "inference", "inference": {"head_dims": [128]}},
                                {"name": "xformers", "version": "0.0.30", "source": {"path": "/src/xformers"}}])
    recipe = load_recipe(path)
    names = [p.name for p in recipe.packages]
    assert names == ["flash-attn", "vllm", "xformers"]
    fa = recipe.package("flash-attn")
    assert fa.version == load_recipe("h100").package("flash-attn").version  # kept from the base
    assert fa.inference.head_dims == (128,)


# ---- the content hash -------------------------------------------------------------------------
def test_hash_is_stable_and_machine_independent(tmp_path, monkeypatch):
    first = make_plan(load_recipe("rtx6000pro"), jobs=1).hash
    assert make_plan(load_recipe("rtx6000pro"), jobs=7).hash == first  # parallelism is not an input
    copy = tmp_path / "elsewhere"
    shutil.copytree(PROJECT_ROOT / "recipes", copy / "recipes")
    shutil.copytree(PROJECT_ROOT / "patches", copy / "patches")
    monkeypatch.setenv("GPUWHEEL_RECIPES", str(copy / "recipes"))
    assert make_plan(load_recipe("rtx6000pro")).hash == first


@pytest.mark.parametrize("change", [
    {"toolchain": {"cuda": "12.8.0"}},
    {"package": [{"name": "flash-attn", "env": {"FLASH_ATTN_EXTRA": "1"}}]},
    {"package": [{"name": "vllm", "source": {"sdist": "vllm-0.26.0.tar.gz", "sha256": "0" * 64}}]},
    {"target": {"min_driver": "575.64"}},
])
def test_changing_any_pin_or_env_changes_the_hash(make_recipe, tmp_path, change):
    base = make_plan(load_recipe("rtx6000pro")).hash
    path = make_recipe(tmp_path, extends="rtx6000pro", **change)
    assert make_plan(load_recipe(path)).hash != base


def test_changing_a_patch_file_changes_the_hash(tmp_path, monkeypatch):
    copy = tmp_path / "tree"
    shutil.copytree(PROJECT_ROOT / "recipes", copy / "recipes")
    shutil.copytree(PROJECT_ROOT / "patches", copy / "patches")
    monkeypatch.setenv("GPUWHEEL_RECIPES", str(copy / "recipes"))
    patch_dir = load_recipe("rtx6000pro").package("flash-attn").patches
    patch = patch_dir / "9999-test.patch"
    patch.write_text("--- a/setup.py\n+++ b/setup.py\n@@ -1 +1 @@\n-a\n+b\n", encoding="utf-8")
    with open(patch_dir / "series", "a", encoding="utf-8") as series:
        series.write("9999-test.patch\n")
    before = make_plan(load_recipe("rtx6000pro")).hash
    patch.write_text(patch.read_text().replace("+b", "+c"), encoding="utf-8")
    assert make_plan(load_recipe("rtx6000pro")).hash != before


# ---- fuzz: whatever the text, only a RecipeError escapes --------------------------------------
VALID = (PROJECT_ROOT / "recipes" / "rtx6000pro.toml")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_recipes_raise_only_recipe_errors(tmp_path, data, make_recipe):
    text = VALID.read_text(encoding="utf-8")
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(text)))
        cut = data.draw(st.integers(0, 8))
        insert = data.draw(st.text(alphabet=string.printable + "é[]{}=\"'", max_size=12))
        text = text[:at] + insert + text[at + cut:]
    path = make_recipe(tmp_path, name="fuzz.toml", text=text)  # literal: the fuzzed text is the input
    try:
        load_recipe(path)
    except RecipeError as error:
        assert "\n" not in str(error)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.text(max_size=10),
                       st.lists(st.integers(), max_size=3)),
       table=st.sampled_from(["target", "toolchain", "build"]),
       key=st.sampled_from(["name", "cuda", "torch", "python", "jobs", "min_driver", "compute_capability",
                            "torch_cuda_arch_list", "nvcc_threads", "base_image", "bogus"]))
def test_fuzzed_values_raise_only_recipe_errors(tmp_path, value, table, key, make_recipe):
    import json
    literal = json.dumps(value) if not isinstance(value, bool) else str(value).lower()
    # literal: JSON's spelling of the value (Infinity, escapes) is part of the input
    path = make_recipe(tmp_path, name="values.toml",
                       text=f'extends = "rtx6000pro"\n[{table}]\n{key} = {literal}\n')
    try:
        load_recipe(path)
    except RecipeError:
        pass


def test_only_plans_and_checks_just_the_chosen_package(gpuwheel, make_recipe, tmp_path):
    # The GPU machine's torch (2.11.0) with the h100 recipe: vLLM 0.33.0 pins 2.14.0,
    # but a flash-attn-only build does not depend on that pin.
    path = make_recipe(tmp_path, extends="h100", toolchain={"torch": "2.11.0"})
    assert gpuwheel("plan", path).exit_code == 3
    result = gpuwheel("plan", path, "--only", "flash-attn", "--json")
    assert result.exit_code == 0, result.stderr
    assert [p["name"] for p in result.json()["packages"]] == ["flash-attn"]
    assert result.json()["packages"][0]["env"]["FLASH_ATTN_CUDA_ARCHS"] == "90"
    wrong = gpuwheel("plan", path, "--only", "flash_attn")
    assert wrong.exit_code == 2 and "did you mean 'flash-attn'?" in wrong.stderr


# ---- the JSON Schema editors read ------------------------------------------------------------------
def test_the_json_schema_accepts_every_shipped_recipe_and_rejects_a_typo(gpuwheel):
    printed = gpuwheel("schema")
    assert printed.exit_code == 0, printed.stderr
    validator = jsonschema.Draft7Validator(printed.json())
    shipped = sorted((PROJECT_ROOT / "recipes").rglob("*.toml"))
    assert shipped
    for path in shipped:
        assert list(validator.iter_errors(tomllib.loads(path.read_text()))) == [], path
    typo = tomllib.loads('[[package]]\nname = "vllm"\nsource = { sdist = "x.tar.gz", shaa256 = "0" }\n')
    [error] = validator.iter_errors(typo)
    assert "'shaa256' was unexpected" in error.message and list(error.path) == ["package", 0, "source"]

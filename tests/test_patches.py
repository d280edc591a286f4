"""Patch sets on real trees: exact application, precise failures, `gpuwheel patches check`."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpuwheel.errors import PatchError
from gpuwheel.patches import APPLIED, FAILED, SKIPPED, UPSTREAM, check_patches, prepare_trees
from gpuwheel.plan import make_plan
from gpuwheel.recipe import load_recipe
from gpuwheel.sources import fetch_sources
from sources_helpers import demo_package, make_repos, unified_diff, write_patch_set


# ---- on the real flash-attn 2.8.3 sdist ------------------------------------------------------------
@pytest.fixture
def flash_attn_tree(real_cache) -> Path:
    """The pristine flash-attn 2.8.3 tree from PyPI (fetched once, kept between runs)."""
    plan = make_plan(load_recipe("h100"), only=("flash-attn",))
    return fetch_sources(plan, progress=False).package("flash-attn").tree


def _flash_attn_recipe(make_recipe, tmp_path: Path, patches: dict[str, str]) -> Path:
    write_patch_set(tmp_path / "fa-patches", patches)
    return make_recipe(tmp_path, extends="h100", package=[{"name": "flash-attn", "patches": "fa-patches"}])


def _version_patch(tree: Path) -> str:
    init = (tree / "flash_attn/__init__.py").read_text()
    return unified_diff("flash_attn/__init__.py", init,
                        init.replace('__version__ = "2.8.3"', '__version__ = "2.8.3+gpuwheel"'))


def _upstream_patch(tree: Path) -> str:
    """A fix the tree already has: its new side is what the sdist holds."""
    setup = (tree / "setup.py").read_text()
    return unified_diff("setup.py", setup.replace("import functools\n", "import  functools\n"), setup)


def _stale_patch(tree: Path) -> str:
    """Written against a setup.py whose second hunk's context has since changed."""
    setup = (tree / "setup.py").read_text()
    then = setup.replace('    "-U__CUDA_NO_HALF_OPERATORS__",\n', '    "-U__CUDA_NO_HALF_OPERATORS__",  # old\n', 1)
    return unified_diff("setup.py", then, then.replace("import warnings\n", "import warnings  # gpuwheel\n")
                        .replace('"-std=c++17",\n    "-U', '"-std=c++20",\n    "-U', 1))


def test_patches_check_reports_applied_upstream_and_failed_with_file_and_hunk(
        gpuwheel, make_recipe, tmp_path, flash_attn_tree):
    recipe = _flash_attn_recipe(make_recipe, tmp_path, {
        "0001-version-suffix.patch": _version_patch(flash_attn_tree),
        "0002-already-upstream.patch": _upstream_patch(flash_attn_tree),
        "0003-cxx20.patch": _stale_patch(flash_attn_tree),
    })
    assert gpuwheel("fetch", recipe, "--only", "flash-attn").exit_code == 0

    result = gpuwheel("patches", "check", recipe, "--offline", "--only", "flash-attn", "--json")
    assert result.exit_code == 6
    statuses = {p["patch"]: (p["status"], p["detail"]) for p in result.json()["patches"]}
    assert statuses["0001-version-suffix.patch"] == (APPLIED, "")
    assert statuses["0002-already-upstream.patch"] == (UPSTREAM, "")
    status, detail = statuses["0003-cxx20.patch"]
    assert status == FAILED
    assert detail.startswith("setup.py hunk #2 FAILED at line 198")
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("gpuwheel: error: 1 of 3 patches do not apply; first: flash-attn 0003-cxx20.patch: "
                            "setup.py hunk #2 FAILED at line 198")
    # The cached tree is never touched by a check.
    assert '__version__ = "2.8.3"\n' in (flash_attn_tree / "flash_attn/__init__.py").read_text()


def test_prepare_trees_applies_the_series_to_fresh_copies(make_recipe, tmp_path, flash_attn_tree):
    recipe = _flash_attn_recipe(make_recipe, tmp_path, {"0001-version-suffix.patch": _version_patch(flash_attn_tree)})
    plan = make_plan(load_recipe(recipe), only=("flash-attn",))  # h100 also holds vLLM, not fetched here
    sources = fetch_sources(plan, offline=True, progress=False)
    work = tmp_path / "work"
    (work / "flash-attn" / "src").mkdir(parents=True)
    (work / "flash-attn" / "src" / "stale-build-output.o").write_text("left from a previous build")

    trees = prepare_trees(plan, sources, work)
    prepared = trees.package("flash-attn")
    assert prepared.tree == work / "flash-attn" / "src"
    assert not (prepared.tree / "stale-build-output.o").exists()  # fresh, every time
    assert '__version__ = "2.8.3+gpuwheel"' in (prepared.tree / "flash_attn/__init__.py").read_text()
    assert [(o.patch, o.status) for o in prepared.applied] == [("0001-version-suffix.patch", APPLIED)]
    assert '__version__ = "2.8.3"\n' in (flash_attn_tree / "flash_attn/__init__.py").read_text()


def test_a_patch_that_does_not_apply_stops_the_build_naming_package_patch_file_and_hunk(
        make_recipe, tmp_path, flash_attn_tree):
    recipe = _flash_attn_recipe(make_recipe, tmp_path, {
        "0001-version-suffix.patch": _version_patch(flash_attn_tree),
        "0002-cxx20.patch": _stale_patch(flash_attn_tree),
    })
    plan = make_plan(load_recipe(recipe), only=("flash-attn",))  # h100 also holds vLLM, not fetched here
    sources = fetch_sources(plan, offline=True, progress=False)
    with pytest.raises(PatchError) as raised:
        prepare_trees(plan, sources, tmp_path / "work")
    message = str(raised.value)
    assert message.startswith("flash-attn 2.8.3: 0002-cxx20.patch does not apply: setup.py hunk #2 FAILED at "
                              "line 198 (exact context, no fuzz); nothing built")
    assert "nothing built" in message and "\n" not in message
    assert raised.value.exit_code == 6
    # The dry run kept the failing patch's first hunk out of the tree as well.
    setup = (tmp_path / "work" / "flash-attn" / "src" / "setup.py").read_text()
    assert "import warnings  # gpuwheel" not in setup
    assert not list((tmp_path / "work").rglob("*.rej")) and not list((tmp_path / "work").rglob("*.orig"))


def test_a_patch_for_a_file_the_tree_lacks(gpuwheel, make_recipe, tmp_path, flash_attn_tree):
    recipe = _flash_attn_recipe(make_recipe, tmp_path, {
        "0001-gone.patch": unified_diff("csrc/removed_upstream.cpp", "int x;\n", "int y;\n")})
    result = gpuwheel("patches", "check", recipe, "--offline", "--only", "flash-attn")
    assert result.exit_code == 6
    assert "0001-gone.patch: csrc/removed_upstream.cpp does not exist in the tree" in result.stderr


def test_shipped_flash_attn_patches_apply_to_the_pinned_sdist(gpuwheel, real_cache):
    """Every shipped flash-attn patch set applies to the sdist its recipes pin (fetch, then offline)."""
    for target in ("h100", "rtx6000pro"):
        assert gpuwheel("fetch", target, "--only", "flash-attn").exit_code == 0
        result = gpuwheel("patches", "check", target, "--offline", "--only", "flash-attn", "--json")
        assert result.exit_code == 0, result.stderr
        assert all(p["status"] == APPLIED for p in result.json()["patches"]), result.json()


# ---- dependency trees ------------------------------------------------------------------------------
def test_patches_for_dependency_trees_apply_there_or_are_reported_skipped(make_recipe, cache, tmp_path):
    repos = make_repos(tmp_path / "repos")
    (tmp_path / "demo-src").mkdir()
    (tmp_path / "demo-src" / "setup.py").write_text("print('demo')\n")
    write_patch_set(tmp_path / "demo-patches", {
        "0001-lib-kernel.patch": unified_diff("kernel.cu", "// lib v1\n", "// lib v1, patched\n"),
        "0002-faraway.patch": unified_diff("x.cu", "a\n", "b\n"),
        "0003-setup.patch": unified_diff("setup.py", "print('demo')\n", "print('patched')\n"),
    }, options={"0001-lib-kernel.patch": "tree=lib", "0002-faraway.patch": "tree=faraway"})
    recipe = make_recipe(tmp_path, package=[demo_package({"path": "demo-src"}, patches="demo-patches", dependency=[
        {"name": "lib", "git": repos["lib"], "rev": "v1.0", "src_dir_env": "LIB_SRC_DIR"},
        {"name": "faraway", "git": "https://gpuwheel-test.invalid/faraway.git", "rev": "v9.9",
         "src_dir_env": "FARAWAY_SRC_DIR"}])])
    plan = make_plan(load_recipe(recipe))
    sources = fetch_sources(plan, progress=False)

    report = check_patches(plan, sources)
    assert [(o.patch, o.where, o.status) for o in report.outcomes] == [
        ("0001-lib-kernel.patch", "lib", APPLIED),
        ("0002-faraway.patch", "faraway", SKIPPED),
        ("0003-setup.patch", "(package)", APPLIED)]

    trees = prepare_trees(plan, sources, tmp_path / "work").package("demo")
    assert (trees.deps_dir / "lib" / "kernel.cu").read_text() == "// lib v1, patched\n"
    assert not (trees.deps_dir / "lib" / ".git").exists()
    assert not (trees.deps_dir / "faraway").exists()
    assert (trees.tree / "setup.py").read_text() == "print('patched')\n"
    assert (tmp_path / "demo-src" / "setup.py").read_text() == "print('demo')\n"  # the local source untouched
    assert [o.status for o in trees.applied] == [APPLIED, SKIPPED, APPLIED]


# ---- vLLM: the shipped recipes' real sdists (38 MB and 47 MB; ~20 s cold here, cached after) ----------
@pytest.mark.parametrize("target, version", [("rtx6000pro", "0.26.0"), ("rtx6000pro-cu13", "0.33.0")])
def test_shipped_vllm_patches_apply_to_the_pinned_sdist(gpuwheel, real_cache, target, version):
    fetched = gpuwheel("fetch", target, "--only", "vllm", "--json")
    assert fetched.exit_code == 0, fetched.stderr
    package = fetched.json()["packages"][0]
    assert Path(package["tree"]).name == f"vllm-{version}"
    assert (Path(package["tree"]) / "cmake" / "external_projects").is_dir()
    # GitHub is out of reach here: every FetchContent dependency is pinned and reported, not fetched.
    assert {d["status"] for d in package["dependencies"]} <= {"needs network", "cached", "imported", "stand-in"}
    assert all(d["fetch_command"].startswith("git clone https://github.com/") for d in package["dependencies"]
               if d["status"] != "stand-in")

    result = gpuwheel("patches", "check", target, "--offline", "--only", "vllm", "--json")
    assert result.exit_code == 0, result.stderr
    for patch in result.json()["patches"]:
        expected = SKIPPED if patch["tree"] and patch["tree"] not in {
            d["name"] for d in package["dependencies"] if d["tree"]} else APPLIED
        assert patch["status"] == expected, patch

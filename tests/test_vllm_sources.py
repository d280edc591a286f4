"""A vLLM build's sources as an air-gapped site brings them: git mirrors (bare repositories, some
incomplete) with their submodules' mirrors beside them, and stand-in trees for the dependencies the
recipe's archs never compile, made from vLLM's published wheel. Real git repositories throughout."""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path

from sources_helpers import demo_package, git, leftovers

# ---- mirrors --------------------------------------------------------------------------------------


def _commit_all(repo: Path, message: str) -> str:
    git("add", "-A", cwd=repo)
    git("commit", "-qm", message, cwd=repo)
    return git("rev-parse", "HEAD", cwd=repo)


def _mirrors(root: Path) -> dict[str, str]:
    """Upstream repos (a kernel library with a submodule, the submodule's repo) and their bare mirrors
    under root/mirrors. Pushed into, the mirrors hold loose objects, so a test can delete one."""
    sub, lib = root / "upstream" / "cutlass", root / "upstream" / "flash-attention"
    sub.mkdir(parents=True)
    git("init", "-q", "-b", "main", cwd=sub)
    (sub / "include").mkdir()
    (sub / "include" / "gemm.h").write_text("// gemm v1\n")
    sub_commit = _commit_all(sub, "gemm v1")
    lib.mkdir()
    git("init", "-q", "-b", "main", cwd=lib)
    (lib / "CMakeLists.txt").write_text("project(fa)\n")
    (lib / "assets").mkdir()
    (lib / "assets" / "paper.pdf").write_bytes(b"%PDF big and never read by a build\n")
    git("submodule", "add", "-q", f"file://{sub}", "csrc/cutlass", cwd=lib)
    lib_commit = _commit_all(lib, "fa with cutlass")
    mirrors = root / "mirrors"
    for name, upstream in (("vllm-flash-attn", lib), ("cutlass.git", sub)):
        git("init", "-q", "--bare", str(mirrors / name), cwd=root)
        git("push", "-q", str(mirrors / name), "main", cwd=upstream)
    blob = git("rev-parse", f"{lib_commit}:assets/paper.pdf", cwd=lib)
    return {"lib_commit": lib_commit, "sub_commit": sub_commit, "mirrors": str(mirrors), "blob": blob}


def _mirror_recipe(make_recipe, tmp_path: Path, rev: str, **more) -> Path:
    """The demo package with a dependency on vLLM's flash-attention fork at rev (and `more` of its fields)."""
    (tmp_path / "src").mkdir(exist_ok=True)
    (tmp_path / "src" / "setup.py").write_text("print('demo')\n")
    return make_recipe(tmp_path, package=[demo_package({"path": "src"}, dependency=[{
        "name": "vllm-flash-attn", "git": "https://github.com/vllm-project/flash-attention.git",
        "rev": rev, "src_dir_env": "VLLM_FLASH_ATTN_SRC_DIR", "submodules": ["csrc/cutlass"], **more}])])


def test_a_mirror_gives_the_pinned_commit_and_its_submodule_from_the_mirror_beside_it(
        gpuwheel, make_recipe, cache, tmp_path):
    pins = _mirrors(tmp_path)
    recipe = _mirror_recipe(make_recipe, tmp_path, pins["lib_commit"])

    fetched = gpuwheel("fetch", recipe, "--offline", "--dependency-dir", pins["mirrors"], "--json")

    assert fetched.exit_code == 0, fetched.stderr
    dep = fetched.json()["packages"][0]["dependencies"][0]
    assert (dep["status"], dep["commit"]) == ("imported", pins["lib_commit"])
    tree = Path(dep["tree"])
    assert (tree / "csrc/cutlass/include/gemm.h").read_text() == "// gemm v1\n"
    assert git("rev-parse", "HEAD", cwd=tree / "csrc/cutlass") == pins["sub_commit"]
    assert leftovers(cache) == []


def test_an_incomplete_mirror_is_refused_naming_the_file_unless_the_recipe_excludes_it(
        gpuwheel, make_recipe, cache, tmp_path):
    pins = _mirrors(tmp_path)
    blob = Path(pins["mirrors"]) / "vllm-flash-attn" / "objects" / pins["blob"][:2] / pins["blob"][2:]
    blob.unlink()  # the mirror lacks the paper's content, as the snapshots this project gets do
    recipe = _mirror_recipe(make_recipe, tmp_path, pins["lib_commit"])

    refused = gpuwheel("fetch", recipe, "--offline", "--dependency-dir", pins["mirrors"])

    assert refused.exit_code == 4
    assert ("demo 1.0 dependency vllm-flash-attn: the mirror " in refused.stderr
            and "lacks the content of assets/paper.pdf at " in refused.stderr
            and "add the path to the dependency's exclude if no build reads it" in refused.stderr)
    assert leftovers(cache) == []

    recipe = _mirror_recipe(make_recipe, tmp_path, pins["lib_commit"], exclude=["assets/"])
    fetched = gpuwheel("fetch", recipe, "--offline", "--dependency-dir", pins["mirrors"], "--json")
    assert fetched.exit_code == 0, fetched.stderr
    tree = Path(fetched.json()["packages"][0]["dependencies"][0]["tree"])
    assert (tree / "CMakeLists.txt").is_file() and not (tree / "assets").exists()


def test_a_submodule_without_a_mirror_is_refused_with_where_to_put_one(gpuwheel, make_recipe, cache, tmp_path):
    pins = _mirrors(tmp_path)
    os.rename(Path(pins["mirrors"]) / "cutlass.git", tmp_path / "elsewhere.git")
    recipe = _mirror_recipe(make_recipe, tmp_path, pins["lib_commit"])

    refused = gpuwheel("fetch", recipe, "--offline", "--dependency-dir", pins["mirrors"])

    assert refused.exit_code == 4
    assert "submodule csrc/cutlass needs file://" in refused.stderr
    assert f"add a mirror of it as {pins['mirrors']}/cutlass" in refused.stderr.replace("\n", "")
    assert leftovers(cache) == []


def test_a_mirror_without_the_pinned_rev_is_refused(gpuwheel, make_recipe, cache, tmp_path):
    pins = _mirrors(tmp_path)
    recipe = _mirror_recipe(make_recipe, tmp_path, "v9.9")

    refused = gpuwheel("fetch", recipe, "--offline", "--dependency-dir", pins["mirrors"])

    assert refused.exit_code == 4
    assert "has no v9.9; refused" in refused.stderr
    assert leftovers(cache) == []


# ---- stand-ins ------------------------------------------------------------------------------------
WHEEL_NAME = "vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl"
INTERFACE = "import torch\nflash_mla_cuda = torch.ops._flashmla_C\n"
FA4 = "from flash_attn.cute.mask import Mask\n"


def _published_wheel(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return buffer.getvalue()


def _vllm_recipe(make_recipe, tmp_path: Path, wheel: bytes, cache_root: Path, arch: str = "12.0") -> Path:
    """vLLM 0.26.0 for `arch` whose published wheel is already in the cache (an air-gapped copy)."""
    digest = hashlib.sha256(wheel).hexdigest()
    (cache_root / "sources" / "archives" / digest).mkdir(parents=True)
    (cache_root / "sources" / "archives" / digest / WHEEL_NAME).write_bytes(wheel)
    (tmp_path / "vllm-src").mkdir(exist_ok=True)
    dependencies = [{"name": name, "git": f"https://gpuwheel-test.invalid/{name}.git", "rev": "a" * 40,
                     "src_dir_env": f"{name.upper()}_SRC_DIR"} for name in ("flashmla", "tml_fa4")]
    return make_recipe(tmp_path, target={"compute_capability": arch, "torch_cuda_arch_list": arch}, package=[{
        "name": "vllm", "version": "0.26.0", "source": {"path": "vllm-src"},
        "stand_in": {"wheel": WHEEL_NAME, "sha256": digest}, "dependency": dependencies}])


def test_dependencies_the_archs_never_compile_stand_in_as_the_wheels_files_restored(
        gpuwheel, make_recipe, cache, tmp_path):
    wheel = _published_wheel({
        "vllm/third_party/flashmla/flash_mla_interface.py":
            INTERFACE.replace("flash_mla_cuda =", "import vllm._flashmla_C\nflash_mla_cuda ="),
        "vllm/third_party/tml_fa4/flash_fwd.py": FA4.replace("flash_attn.cute", "vllm.third_party.tml_fa4"),
        "vllm/third_party/tml_fa4/README.md": "not a .py: not installed by tml_fa4.cmake\n",
        "vllm/_C.abi3.so": "",
    })
    recipe = _vllm_recipe(make_recipe, tmp_path, wheel, cache)

    plan = gpuwheel("plan", recipe, "--json").json()
    assert plan["packages"][0]["stand_ins"] == ["flashmla", "tml_fa4"]
    fetched = gpuwheel("fetch", recipe, "--offline", "--json")

    assert fetched.exit_code == 0, fetched.stderr
    flashmla, tml = fetched.json()["packages"][0]["dependencies"]
    assert flashmla["status"] == tml["status"] == "stand-in"
    assert (Path(flashmla["tree"]) / "flash_mla/flash_mla_interface.py").read_text() == INTERFACE
    assert (Path(tml["tree"]) / "flash_attn/cute/flash_fwd.py").read_text() == FA4
    assert not (Path(tml["tree"]) / "flash_attn/cute/README.md").exists()
    assert leftovers(cache) == []


def test_a_hopper_build_compiles_flashmla_so_it_needs_its_sources(gpuwheel, make_recipe, cache, tmp_path):
    recipe = _vllm_recipe(make_recipe, tmp_path, _published_wheel({"vllm/x.py": ""}), cache, arch="9.0")

    plan = gpuwheel("plan", recipe, "--json").json()

    assert plan["packages"][0]["stand_ins"] == ["tml_fa4"]  # FlashMLA compiles for 9.0a
    assert "fetch vllm dependency flashmla" in " ".join(plan["steps"])


def test_a_stand_in_that_cannot_be_restored_exactly_is_refused(gpuwheel, make_recipe, cache, tmp_path):
    # The installed file holds the upstream name unrewritten: undoing the rewrite would change it.
    wheel = _published_wheel({
        "vllm/third_party/flashmla/flash_mla_interface.py": "import vllm._flashmla_C\nflash_mla_cuda = 1\n",
        "vllm/third_party/tml_fa4/flash_fwd.py": "import flash_attn.cute\nimport vllm.third_party.tml_fa4\n"})
    recipe = _vllm_recipe(make_recipe, tmp_path, wheel, cache)

    refused = gpuwheel("fetch", recipe, "--offline")

    assert refused.exit_code == 4
    assert ("vllm 0.26.0 dependency tml_fa4: vllm/third_party/tml_fa4/flash_fwd.py in " in refused.stderr
            and "cannot be restored exactly" in refused.stderr)
    assert leftovers(cache) == []

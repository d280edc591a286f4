"""flash-attn 2.8.3 inference profile: gpuwheel's patches on the real sdist, the TUs and macros they
select, the restricted switches under a real C++ compiler, and (slow) a real build that imports."""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from gpuwheel import facts
from gpuwheel.audit.report import AuditTarget, audit
from gpuwheel.patches import prepare_trees
from gpuwheel.plan import make_plan
from gpuwheel.recipe import load_recipe
from gpuwheel.sources import fetch_sources

REPO = Path(__file__).resolve().parents[1]
PATCHES = REPO / "patches" / "flash-attn" / "2.8.3"
HEAD_DIMS = (32, 64, 96, 128, 192, 256)
# A deployment that serves head dim 128 only and needs none of the optional features.
NARROW_INFERENCE = {"head_dims": [128], "disable": ["alibi", "softcap", "local", "uneven_k"]}
# Three head dims and two features off: what the fast tests check the selection against.
WIDE_INFERENCE = {"head_dims": [64, 128, 256], "disable": ["alibi", "softcap"]}


def _profile_recipe(make_recipe, directory: Path, inference: dict, name: str = "recipe.toml") -> Path:
    """A target extending rtx6000pro-cu13 whose flash-attn builds this inference profile."""
    return make_recipe(directory, extends="rtx6000pro-cu13", name=name,
                       package=[{"name": "flash-attn", "inference": inference}])


def _test_cache() -> Path:
    """Real PyPI sdists kept between runs ($GPUWHEEL_TEST_CACHE), as the sources tests keep them."""
    return Path(os.environ.get("GPUWHEEL_TEST_CACHE") or Path.home() / ".cache" / "gpuwheel-test-sources")


def _patched_tree(recipe: str | Path, workdir: Path):
    """(plan, tree): the recipe's flash-attn sdist, fetched (cached) and patched as a build prepares it."""
    plan = make_plan(load_recipe(recipe), only=("flash-attn",))
    sources = fetch_sources(plan, cache=_test_cache(), progress=False)
    return plan, prepare_trees(plan, sources, workdir).package("flash-attn").tree


def _profile_module(tree: Path):
    spec = importlib.util.spec_from_file_location(f"gpuwheel_fa_profile_{id(tree)}", tree / "gpuwheel_fa_profile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _setup_sources(tree: Path) -> list[str]:
    """The TU list the patched setup.py hands to gpuwheel_fa_profile.sources()."""
    for node in ast.walk(ast.parse((tree / "setup.py").read_text())):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "gpuwheel_fa_profile.sources":
            return ast.literal_eval(node.args[0])
    raise AssertionError("setup.py does not pass its sources through gpuwheel_fa_profile.sources()")


def _expected_tus(dims, dtypes=("fp16", "bf16")) -> set[str]:
    return {f"csrc/flash_attn/src/flash_fwd_{split}hdim{d}_{t}{causal}_sm80.cu"
            for split in ("", "split_") for d in dims for t in dtypes for causal in ("", "_causal")}


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, make_recipe):
    """The plan of a recipe extending rtx6000pro-cu13 (head dims 64/128/256) and its patched flash-attn tree."""
    root = tmp_path_factory.mktemp("fa")
    recipe = _profile_recipe(make_recipe, root, WIDE_INFERENCE, name="wide.toml")
    return _patched_tree(recipe, root / "work")


def test_patches_apply_exactly_to_the_pristine_sdist(shipped, tmp_path):
    plan, tree = shipped
    archive = next((_test_cache() / "sources").rglob("flash_attn-2.8.3.tar.gz"))
    subprocess.run(["tar", "-xzf", archive, "-C", tmp_path], check=True)
    pristine = tmp_path / "flash_attn-2.8.3"
    names = [line.split()[0] for line in (PATCHES / "series").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert names == ["0001-build-with-cxx20-for-torch-2.14.patch", "0002-inference-profile.patch"]
    for name in names:
        patch = (PATCHES / name).read_text()
        assert patch.index("\n--- ") > 200, f"{name}: needs a header (what, why, versions) before the diff"
        dry = subprocess.run(["patch", "-p1", "--fuzz=0", "--forward", "--dry-run"], input=patch, text=True,
                             cwd=pristine, capture_output=True)
        assert dry.returncode == 0 and "offset" not in dry.stdout and "fuzz" not in dry.stdout, dry.stdout
        subprocess.run(["patch", "-p1", "--fuzz=0", "--forward", "--quiet"], input=patch, text=True,
                       cwd=pristine, check=True)
    # What the gpuwheel pipeline prepared is exactly the pristine sdist plus the two patches.
    diff = subprocess.run(["diff", "-r", "-x", "__pycache__", pristine, tree], capture_output=True, text=True)
    assert diff.returncode == 0, diff.stdout[:2000]


def test_patched_lines(shipped):
    _, tree = shipped
    setup = (tree / "setup.py").read_text()
    assert 'cxx_std = "c++20" if parse(torch.__version__).release[:2] >= (2, 14) else "c++17"' in setup
    assert '"-std=c++17"' not in setup.split("elif not SKIP_CUDA_BUILD and IS_ROCM")[0]
    assert 'compiler_c17_flag=["-O3", f"-std={cxx_std}"]' in setup
    assert '"nvcc": append_nvcc_threads(nvcc_flags + cc_flag + gpuwheel_fa_profile.flags()),' in setup
    api = (tree / "csrc/flash_attn/flash_api.cpp").read_text()
    bwd = api[api.index("void run_mha_bwd("):api.index("std::vector<at::Tensor>\nmha_bwd(")]
    assert bwd.index("#ifdef FLASHATTENTION_DISABLE_BACKWARD") < bwd.index("run_mha_bwd_<") < bwd.index("#endif")
    switch = (tree / "csrc/flash_attn/src/static_switch.h").read_text()
    assert "#ifdef FLASHATTENTION_HEADDIMS_RESTRICTED" in switch and "#ifdef FLASHATTENTION_DTYPES_RESTRICTED" in switch


def test_plan_env_selects_forward_tus_of_chosen_head_dims(shipped):
    plan, tree = shipped
    env = plan.package("flash-attn").env_dict
    assert env["GPUWHEEL_FA_HEAD_DIMS"] == "64;128;256"
    profile = _profile_module(tree)
    upstream = _setup_sources(tree)
    assert len(upstream) == 73  # flash_api.cpp + 24 fwd + 24 bwd + 24 split

    selected = profile.sources(upstream, env)
    assert selected[0] == "csrc/flash_attn/flash_api.cpp"
    assert set(selected[1:]) == _expected_tus((64, 128, 256)) and len(selected) == 25
    assert profile.flags(env) == [
        "-DFLASHATTENTION_DISABLE_BACKWARD", "-DFLASHATTENTION_DISABLE_DROPOUT", "-DFLASHATTENTION_DISABLE_ALIBI",
        "-DFLASHATTENTION_DISABLE_SOFTCAP", "-DFLASHATTENTION_HEADDIMS_RESTRICTED", "-DFLASHATTENTION_HEADDIM_64",
        "-DFLASHATTENTION_HEADDIM_128", "-DFLASHATTENTION_HEADDIM_256", "-DFLASHATTENTION_DTYPES_RESTRICTED",
        "-DFLASHATTENTION_DTYPE_FP16", "-DFLASHATTENTION_DTYPE_BF16"]

    narrow = {**env, "GPUWHEEL_FA_HEAD_DIMS": "128", "GPUWHEEL_FA_DTYPES": "bf16"}
    assert set(profile.sources(upstream, narrow)[1:]) == _expected_tus((128,), ("bf16",))
    every_dim = {"GPUWHEEL_FA_INFERENCE": "1"}  # no head dims named: all six, still no backward
    assert set(profile.sources(upstream, every_dim)[1:]) == _expected_tus(HEAD_DIMS)
    assert profile.flags(every_dim)[:2] == ["-DFLASHATTENTION_DISABLE_BACKWARD", "-DFLASHATTENTION_HEADDIMS_RESTRICTED"]


def test_without_the_profile_the_build_is_upstreams(shipped):
    _, tree = shipped
    profile = _profile_module(tree)
    upstream = _setup_sources(tree)
    env = {"FLASH_ATTN_CUDA_ARCHS": "120", "GPUWHEEL_FA_HEAD_DIMS": "128"}  # no GPUWHEEL_FA_INFERENCE
    assert profile.sources(upstream, env) == upstream
    assert profile.flags(env) == []


@pytest.mark.parametrize("name, value, message", [
    ("GPUWHEEL_FA_HEAD_DIMS", "128;100", "GPUWHEEL_FA_HEAD_DIMS: '100' is not a flash-attn kernel head dim "
                                         "(one of 32;64;96;128;192;256)"),
    ("GPUWHEEL_FA_DISABLE", "DROPOUT;PAGED", "GPUWHEEL_FA_DISABLE: 'PAGED' is not one of "
                                             "BACKWARD;DROPOUT;ALIBI;SOFTCAP;LOCAL;UNEVEN_K"),
    ("GPUWHEEL_FA_DTYPES", "fp8", "GPUWHEEL_FA_DTYPES: 'fp8' is not one of fp16;bf16"),
])
def test_bad_profile_env_is_one_clear_error(shipped, name, value, message):
    _, tree = shipped
    profile = _profile_module(tree)
    with pytest.raises(ValueError) as error:
        profile.flags({"GPUWHEEL_FA_INFERENCE": "1", name: value})
    assert str(error.value) == message


SWITCH_PROGRAM = textwrap.dedent("""\
    #include <cstdio>
    #include <cstdlib>
    #include <sstream>
    #include <stdexcept>
    #include <string>
    namespace cutlass { struct half_t {}; struct bfloat16_t {}; }
    template <typename... Args> std::string cat(const Args&... a) { std::ostringstream s; (s << ... << a); return s.str(); }
    #define TORCH_CHECK(COND, ...) if (!(COND)) { throw std::runtime_error(cat(__VA_ARGS__)); }
    #include "static_switch.h"
    // Declared for every head dim, defined only for the built ones: a reference to any other fails to link.
    template <typename T, int D> void kernel();
    template <> void kernel<cutlass::half_t, 128>() { std::puts("fp16 kHeadDim=128"); }
    template <> void kernel<cutlass::bfloat16_t, 128>() { std::puts("bf16 kHeadDim=128"); }
    int main(int argc, char** argv) {
      const int d = std::atoi(argv[1]);
      const bool fp16 = std::string(argv[2]) == "fp16";
      try {
        FP16_SWITCH(fp16, [&] { HEADDIM_SWITCH(d, [&] { kernel<elem_type, kHeadDim>(); }); });
      } catch (const std::runtime_error& e) {
        std::printf("error: %s\\n", e.what());
        return 1;
      }
      return 0;
    }
    """)


def test_restricted_switches_reference_only_built_kernels(shipped, tmp_path):
    """The patched static_switch.h, with the flags the profile passes, under g++: links against
    head-dim-128 kernels alone, dispatches head dims 97..128 to them, and rejects the rest."""
    _, tree = shipped
    flags = _profile_module(tree).flags({"GPUWHEEL_FA_INFERENCE": "1", "GPUWHEEL_FA_HEAD_DIMS": "128"})
    source = tmp_path / "switch.cpp"
    source.write_text(SWITCH_PROGRAM)
    binary = tmp_path / "switch"
    subprocess.run(["c++", "-std=c++17", *flags, f"-I{tree}/csrc/flash_attn/src", source, "-o", binary], check=True)

    def call(d: int, dtype: str) -> tuple[int, str]:
        result = subprocess.run([binary, str(d), dtype], capture_output=True, text=True)
        return result.returncode, result.stdout.strip()

    assert call(128, "fp16") == (0, "fp16 kHeadDim=128")
    assert call(104, "bf16") == (0, "bf16 kHeadDim=128")
    assert call(64, "fp16") == (1, "error: This flash attention build has no kernels for head dim 64 (it needs the "
                                   "head dim 64 kernels, left out of this inference build).")
    assert call(160, "bf16") == (1, "error: This flash attention build has no kernels for head dim 160 (it needs "
                                    "the head dim 192 kernels, left out of this inference build).")

    # Without the profile's macros the same switch references every head dim: it cannot link.
    upstream = subprocess.run(["c++", "-std=c++17", f"-I{tree}/csrc/flash_attn/src", source, "-o", tmp_path / "up"],
                              capture_output=True, text=True)
    assert upstream.returncode != 0 and "kernel<cutlass::half_t, 64>" in upstream.stderr

    bf16_only = [f for f in flags if f != "-DFLASHATTENTION_DTYPE_FP16"]
    subprocess.run(["c++", "-std=c++17", *bf16_only, f"-I{tree}/csrc/flash_attn/src", source, "-o", binary], check=True)
    assert call(128, "fp16") == (1, "error: This flash attention build has no fp16 kernels (left out of this "
                                    "inference build).")


# ---- slow: a real build -------------------------------------------------------------------------
TORCH_PIN = "2.14.1"  # the CUDA 13.0 build of torch that installs here (ENVIRONMENT.md)


def _torch_python() -> Path:
    """An interpreter with the CUDA torch, flash-attn's build requirements and cuobjdump: $GPUWHEEL_TEST_TORCH_PYTHON,
    or a venv made once under the test cache."""
    if os.environ.get("GPUWHEEL_TEST_TORCH_PYTHON"):
        return Path(os.environ["GPUWHEEL_TEST_TORCH_PYTHON"])
    venv = _test_cache().parent / "gpuwheel-test-venvs" / f"torch-{TORCH_PIN}"
    python = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", f"torch=={TORCH_PIN}", "ninja", "psutil", "einops",
                        "packaging", "setuptools", "wheel"], check=True)
        (venv / ".complete").touch()
    return python


@pytest.mark.slow
def test_inference_profile_builds_imports_and_carries_only_sm120(tmp_path, make_recipe):
    """Head dim 128, every optional feature off, sm_120, against torch 2.14.1: 4-10 min on 2 cores."""
    plan, tree = _patched_tree(_profile_recipe(make_recipe, tmp_path, NARROW_INFERENCE), tmp_path / "work")
    package = plan.package("flash-attn")
    python = _torch_python()
    env = {**os.environ, **package.env_dict, "MAX_JOBS": "2", "NVCC_THREADS": "1",
           "CUDA_HOME": os.environ.get("CUDA_HOME", "/usr/local/cuda")}
    env["PATH"] = f"{python.parent}{os.pathsep}{env['CUDA_HOME']}/bin{os.pathsep}{env['PATH']}"
    wheels = tmp_path / "wheels"
    build = subprocess.run([python, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-v",
                            "--wheel-dir", wheels, "."], cwd=tree, env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert "[9/9]" in build.stdout + build.stderr  # flash_api.cpp + 2 dtypes x (fwd, fwd causal, split, split causal)
    (wheel,) = wheels.glob("flash_attn-2.8.3-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert not any(name.startswith("gpuwheel_fa_profile") for name in archive.namelist())

    report = audit(wheel, AuditTarget(facts.parse_arch("12.0"), "580.65.06"))
    (so,) = [so for so in report.sos if so.has_gpu_code]
    assert report.passed and so.sass_archs == ("sm_120",) and so.ptx_archs == ()

    # Installed into the torch venv, the extension loads: no undefined symbol from left-out kernels.
    site = tmp_path / "site"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--target", site, wheel], check=True)
    probe = subprocess.run([python, "-c", "import torch, flash_attn_2_cuda as m; print(sorted(n for n in dir(m) "
                            "if not n.startswith('_')))"], env={**env, "PYTHONPATH": str(site)},
                           capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert "'fwd'" in probe.stdout and "'fwd_kvcache'" in probe.stdout and "'varlen_fwd'" in probe.stdout

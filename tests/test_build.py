"""`gpuwheel build` with the local backend: a real CUDA extension for sm_90a + sm_120, the compile
cache on a rebuild, and every way a build can be refused or fail — each one line, nothing left behind."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest

from build_helpers import SHARED_CACHE, files_under, fixture_recipe, sass_archs
from gpuwheel.build.local import LocalBackend
from gpuwheel.recipe import Toolchain

FIXTURE_TOOLCHAIN = Toolchain(cuda="13.0.2", python="3.11", torch="2.14.1")


@pytest.fixture(autouse=True)
def shared_cache(monkeypatch):
    monkeypatch.setenv("GPUWHEEL_CACHE", str(SHARED_CACHE))


@pytest.fixture(scope="module")
def fixture_toolchain():
    """The pinned torch 2.14.1 (CUDA 13.0) venv, made once and kept in the shared test cache."""
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on PATH: the local build tests need the CUDA 13.0 toolkit")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GPUWHEEL_CACHE", str(SHARED_CACHE))
        return LocalBackend().prepare(FIXTURE_TOOLCHAIN, recipe_name="fixture.toml")


def test_local_build_gives_a_wheel_with_sm90a_and_sm120_sass_and_a_rebuild_hits_the_compile_cache(
        gpuwheel, tmp_path, fixture_toolchain):
    recipe = fixture_recipe(tmp_path)
    out = tmp_path / "staging"

    first = gpuwheel("build", recipe, "--backend", "local", "--out", out, "--json")

    assert first.exit_code == 0, first.stderr
    [wheel] = out.glob("*.whl")
    assert wheel.name.startswith("gwfixture-0.1.0+cu130.sm90a.sm120.torch214-cp311-cp311-")
    assert set(sass_archs(wheel)) == {"sm_90a", "sm_120"}
    with zipfile.ZipFile(wheel) as archive:
        assert "gwfixture/__init__.py" in archive.namelist()
    built = first.json()["raw"]
    assert built["toolchain"]["nvcc"].startswith("13.0.")
    assert built["toolchain"]["torch"].startswith("2.14.1")
    assert Path(built["wheels"][0]["log"]).read_text().count("sccache nvcc") >= 1
    assert "gwfixture: built" in first.stderr and "compile-cache hits" in first.stderr

    again = gpuwheel("build", recipe, "--backend", "local", "--out", out, "--json")

    assert again.exit_code == 0, again.stderr
    rebuilt = again.json()["raw"]["wheels"][0]
    assert rebuilt["cache_hits"] > 0 and rebuilt["cache_misses"] == 0
    assert "(100%)" in again.stderr


def test_toolkit_mismatch_stops_before_compiling(gpuwheel, tmp_path):
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on PATH")
    recipe = fixture_recipe(tmp_path, cuda="12.8.1", torch="2.11.0")
    out = tmp_path / "staging"

    result = gpuwheel("build", recipe, "--backend", "local", "--out", out)

    assert result.exit_code == 7
    [line] = [l for l in result.stderr.splitlines() if l.startswith("gpuwheel: error:")]
    assert "toolkit mismatch:" in line and "is CUDA 13.0" in line and "cuda = 12.8.1" in line
    assert "set CUDA_HOME to a CUDA 12.8 toolkit, or use --backend docker" in line
    assert files_under(out) == []


def test_torch_that_differs_from_the_recipe_is_refused(gpuwheel, tmp_path, fixture_toolchain):
    recipe = fixture_recipe(tmp_path, torch="2.13.0")
    out = tmp_path / "staging"

    result = gpuwheel("build", recipe, "--backend", "local", "--python", fixture_toolchain.location, "--out", out)

    assert result.exit_code == 7
    assert "torch mismatch: the toolchain has torch 2.14.1+cu130, fixture.toml pins [toolchain] torch = 2.13.0" \
        in result.stderr
    assert files_under(out) == []


def test_missing_nvcc_for_a_toolkit_pypi_does_not_ship(gpuwheel, tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    recipe = fixture_recipe(tmp_path, cuda="12.8.1", torch="2.11.0")

    result = gpuwheel("build", recipe, "--backend", "local", "--out", tmp_path / "staging")

    assert result.exit_code == 7
    assert ("no nvcc: CUDA_HOME is unset and none is on PATH, and CUDA 12.8 has no complete toolkit on PyPI "
            "(set CUDA_HOME to a CUDA 12.8 toolkit, or use --backend docker)") in result.stderr


def test_cuda_home_without_nvcc_is_named(gpuwheel, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "not-cuda"))

    result = gpuwheel("build", fixture_recipe(tmp_path), "--backend", "local", "--out", tmp_path / "staging")

    assert result.exit_code == 7
    assert f"CUDA_HOME={tmp_path / 'not-cuda'} has no bin/nvcc" in result.stderr


def test_a_compiler_killed_by_sigkill_is_reported_as_out_of_memory_with_the_jobs(gpuwheel, tmp_path,
                                                                                 fixture_toolchain):
    # kill_cicc.py runs the real nvcc and SIGKILLs its cicc, as the kernel's OOM killer does.
    recipe = fixture_recipe(tmp_path, env={"PYTORCH_NVCC": "python $GPUWHEEL_TREE/kill_cicc.py"})
    out = tmp_path / "staging"

    result = gpuwheel("build", recipe, "--backend", "local", "--jobs", "3", "--out", out)

    assert result.exit_code == 9, result.stderr
    [line] = [l for l in result.stderr.splitlines() if l.startswith("gpuwheel: error:")]
    assert "gwfixture: a compiler was killed by SIGKILL (out of memory) at MAX_JOBS=3 × NVCC_THREADS=" in line
    assert "lower the jobs: --jobs 1, or [build] jobs = 1 in fixture.toml" in line
    log = Path(line.split("log: ")[1].split(" (")[0])
    assert "Killed" in log.read_text()  # the shell under nvcc reports cicc's SIGKILL
    assert files_under(out) == []


def test_a_failed_compile_shows_the_last_lines_and_the_log(gpuwheel, tmp_path, fixture_toolchain):
    recipe = fixture_recipe(tmp_path, env={"NVCC_APPEND_FLAGS": "--no-such-nvcc-option"})
    out = tmp_path / "staging"

    result = gpuwheel("build", recipe, "--backend", "local", "--out", out)

    assert result.exit_code == 8, result.stderr
    [line] = [l for l in result.stderr.splitlines() if l.startswith("gpuwheel: error:")]
    assert line.startswith("gpuwheel: error: gwfixture: build failed (exit 1) after ")
    log = Path(line.split("log: ")[1])
    assert "--no-such-nvcc-option" in log.read_text()
    assert "Failed to build" in result.stderr  # pip's last lines, shown above the error
    assert files_under(out) == []


def test_docker_backend_without_an_engine_is_one_line(gpuwheel, tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")

    result = gpuwheel("build", fixture_recipe(tmp_path), "--backend", "docker", "--out", tmp_path / "staging")

    assert result.exit_code == 7
    [line] = [l for l in result.stderr.splitlines() if l.startswith("gpuwheel: error:")]
    assert line.startswith(f"gpuwheel: error: no Docker engine at unix://{tmp_path}/no-docker.sock (")
    assert line.endswith("(start dockerd or use --backend local)")


def test_auto_picks_local_when_no_engine_answers(monkeypatch, tmp_path):
    from gpuwheel.build.packages import select_backend

    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    assert select_backend("auto").name == "local"


def test_plain_progress_lines_follow_ninja_steps(capsys):
    from gpuwheel.build.progress import BuildProgress

    with BuildProgress().package("flash-attn 2.8.3") as on_line:
        for step in range(1, 21):
            on_line(f"  [{step}/20] sccache nvcc ... flash_fwd_hdim128_bf16_sm80.cu")  # as pip -v shows it
        on_line("not a ninja line")
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("flash-attn")]
    assert lines[0].startswith("flash-attn 2.8.3: 1/20 build steps") and lines[-1].startswith("flash-attn 2.8.3: 20/20")
    assert len(lines) == 11  # one per tenth, not one per step


def test_the_recorded_compiler_is_the_one_the_build_uses(tmp_path, monkeypatch, fixture_toolchain):
    """torch and CMake compile with $CXX when set (the GPU machine's image sets it): provenance must say so."""
    wrapper = tmp_path / "fleet-g++"
    wrapper.write_text('#!/bin/sh\nexec g++ "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CXX", str(wrapper))
    info = LocalBackend(python=fixture_toolchain.location).prepare(FIXTURE_TOOLCHAIN, recipe_name="fixture.toml")
    assert info.cc.startswith(f"{wrapper}: g++")

"""`gpuwheel build` with the local backend: a real CUDA extension for sm_90a + sm_120, the compile
cache on a rebuild, and every way a build can be refused or fail — each one line, nothing left behind."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest

from build_helpers import FIXTURE_TOOLCHAIN, files_under, fixture_recipe, fixture_wheel
from gpuwheel.backends.local import LocalBackend

pytestmark = pytest.mark.usefixtures("shared_cache")


def test_local_build_gives_a_wheel_with_sm90a_and_sm120_sass_and_a_rebuild_hits_the_compile_cache(
        gpuwheel, tmp_path, fixture_toolchain, make_recipe):
    recipe = make_recipe(tmp_path, **fixture_recipe())
    out = tmp_path / "staging"

    first = gpuwheel("build", recipe, "--backend", "local", "--out", out, "--json")

    assert first.exit_code == 0, first.stderr
    wheel = fixture_wheel(out)
    with zipfile.ZipFile(wheel) as archive:
        assert "gwfixture/__init__.py" in archive.namelist()
    built = first.json()["raw"]
    assert built["toolchain"]["nvcc"].startswith("13.0.")
    assert built["toolchain"]["torch"].startswith("2.14.1")
    assert Path(built["wheels"][0]["log"]).read_text().count("sccache nvcc") >= 1
    assert "gwfixture: built" in first.stderr and "compile-cache hits" in first.stderr
    # Where the time went: the build's own milestones, in order, within its seconds; each stage's seconds.
    milestones = built["wheels"][0]["milestones"]
    assert list(milestones) == ["first compile step done", "last compile step done", "wheel written"]  # no cmake
    assert 0 < milestones["first compile step done"] <= milestones["wheel written"] <= built["wheels"][0]["seconds"]
    assert list(first.json()["timings"]) == ["toolchain", "fetch", "patch", "build gwfixture", "finish + audit"]

    again = gpuwheel("build", recipe, "--backend", "local", "--out", out, "--json", "--rebuild")

    assert again.exit_code == 0, again.stderr
    rebuilt = again.json()["raw"]["wheels"][0]
    assert rebuilt["cache_hits"] > 0 and rebuilt["cache_misses"] == 0
    assert "(100%)" in again.stderr


def test_a_build_of_an_unchanged_plan_reuses_its_finished_wheel_and_a_changed_input_rebuilds(
        gpuwheel, tmp_path, fixture_toolchain, caplog, make_recipe):
    recipe = make_recipe(tmp_path, **fixture_recipe())
    out = tmp_path / "staging"
    first = gpuwheel("build", recipe, "--backend", "local", "--out", out, "--json")
    assert first.exit_code == 0, first.stderr
    [built] = first.json()["finished"]["wheels"]
    assert first.json()["reused"] is False

    noop = gpuwheel("build", recipe, "--backend", "local", "--out", out, "--json")

    assert noop.exit_code == 0, noop.stderr
    assert noop.json()["reused"] is True and noop.json()["raw"] is None
    assert noop.json()["finished"]["wheels"] == [built]  # same path, sha256, label, audit verdict
    plan_hash = gpuwheel("plan", recipe, "--json").json()["hash"]
    assert f"gwfixture: reusing {built['path']}, finished for plan {plan_hash[:16]}" in noop.stderr
    assert "compile-cache" not in noop.stderr  # nothing was built

    # A wheel whose bytes no longer match its RECORD is rebuilt, not reused.
    with zipfile.ZipFile(built["path"], "a") as archive:
        archive.writestr("gwfixture/added.py", "print('not in RECORD')\n")
    tampered = gpuwheel("build", recipe, "--backend", "local", "--out", out, "--json")
    assert tampered.exit_code == 0, tampered.stderr
    assert tampered.json()["reused"] is False
    assert any("not reusing" in r.getMessage() and "RECORD mismatch: gwfixture/added.py" in r.getMessage()
               for r in caplog.records)

    # A changed input is a new plan: built, and the old wheel is not taken for it.
    changed = make_recipe(tmp_path, **fixture_recipe(env={"GWFIXTURE_NOTE": "changed"}))
    rebuilt = gpuwheel("build", changed, "--backend", "local", "--out", out, "--json")
    assert rebuilt.exit_code == 0, rebuilt.stderr
    assert rebuilt.json()["reused"] is False and rebuilt.json()["raw"]["plan_hash"] != plan_hash


def test_toolkit_mismatch_stops_before_compiling(gpuwheel, tmp_path, make_recipe):
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on PATH")
    recipe = make_recipe(tmp_path, **fixture_recipe(cuda="12.8.1", torch="2.11.0"))
    out = tmp_path / "staging"

    result = gpuwheel("build", recipe, "--backend", "local", "--out", out)

    assert result.exit_code == 7
    [line] = [l for l in result.stderr.splitlines() if l.startswith("gpuwheel: error:")]
    assert "toolkit mismatch:" in line and "is CUDA 13.0" in line and "cuda = 12.8.1" in line
    assert "set CUDA_HOME to a CUDA 12.8 toolkit, or use --backend container" in line
    assert files_under(out) == []


def test_torch_that_differs_from_the_recipe_is_refused(gpuwheel, tmp_path, fixture_toolchain, make_recipe):
    recipe = make_recipe(tmp_path, **fixture_recipe(torch="2.13.0"))
    out = tmp_path / "staging"

    result = gpuwheel("build", recipe, "--backend", "local", "--python", fixture_toolchain.location, "--out", out)

    assert result.exit_code == 7
    assert "torch mismatch: the toolchain has torch 2.14.1+cu130, fixture.toml pins [toolchain] torch = 2.13.0" \
        in result.stderr
    assert files_under(out) == []


def test_missing_nvcc_for_a_toolkit_pypi_does_not_ship(gpuwheel, tmp_path, monkeypatch, make_recipe):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    recipe = make_recipe(tmp_path, **fixture_recipe(cuda="12.8.1", torch="2.11.0"))

    result = gpuwheel("build", recipe, "--backend", "local", "--out", tmp_path / "staging")

    assert result.exit_code == 7
    assert ("no nvcc: CUDA_HOME is unset and none is on PATH, and CUDA 12.8 has no complete toolkit on PyPI "
            "(set CUDA_HOME to a CUDA 12.8 toolkit, or use --backend container)") in result.stderr


def test_cuda_home_without_nvcc_is_named(gpuwheel, tmp_path, monkeypatch, make_recipe):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "not-cuda"))

    result = gpuwheel("build", make_recipe(tmp_path, **fixture_recipe()), "--backend", "local", "--out",
                      tmp_path / "staging")

    assert result.exit_code == 7
    assert f"CUDA_HOME={tmp_path / 'not-cuda'} has no bin/nvcc" in result.stderr


def test_a_compiler_killed_by_sigkill_is_reported_as_out_of_memory_with_the_jobs(gpuwheel, tmp_path,
                                                                                 fixture_toolchain, make_recipe):
    # kill_cicc.py runs the real nvcc and SIGKILLs its cicc, as the kernel's OOM killer does.
    recipe = make_recipe(tmp_path, **fixture_recipe(env={"PYTORCH_NVCC": "python $GPUWHEEL_TREE/kill_cicc.py"}))
    out = tmp_path / "staging"

    result = gpuwheel("build", recipe, "--backend", "local", "--jobs", "3", "--out", out)

    assert result.exit_code == 9, result.stderr
    [line] = [l for l in result.stderr.splitlines() if l.startswith("gpuwheel: error:")]
    assert "gwfixture: a compiler was killed by SIGKILL (out of memory) at MAX_JOBS=3 × NVCC_THREADS=" in line
    assert "lower the jobs: --jobs 1, or [build] jobs = 1 in fixture.toml" in line
    log = Path(line.split("log: ")[1].split(" (")[0])
    assert "Killed" in log.read_text()  # the shell under nvcc reports cicc's SIGKILL
    assert files_under(out) == []


def test_a_failed_compile_shows_the_last_lines_and_the_log(gpuwheel, tmp_path, fixture_toolchain, make_recipe):
    recipe = make_recipe(tmp_path, **fixture_recipe(env={"NVCC_APPEND_FLAGS": "--no-such-nvcc-option"}))
    out = tmp_path / "staging"

    result = gpuwheel("build", recipe, "--backend", "local", "--out", out)

    assert result.exit_code == 8, result.stderr
    [line] = [l for l in result.stderr.splitlines() if l.startswith("gpuwheel: error:")]
    assert line.startswith("gpuwheel: error: gwfixture: build failed (exit 1) after ")
    log = Path(line.split("log: ")[1])
    assert "--no-such-nvcc-option" in log.read_text()
    assert "Failed to build" in result.stderr  # pip's last lines, shown above the error
    assert files_under(out) == []


def error_line(result) -> str:
    [line] = [l for l in result.stderr.splitlines() if l.startswith("gpuwheel: error:")]
    assert "Traceback" not in result.stderr
    return line


def test_container_backend_without_a_docker_engine_is_one_line(gpuwheel, tmp_path, monkeypatch, make_recipe):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    monkeypatch.delenv("GPUWHEEL_ENGINE", raising=False)

    result = gpuwheel("build", make_recipe(tmp_path, **fixture_recipe()), "--backend", "container", "--out",
                      tmp_path / "staging")

    assert result.exit_code == 7
    line = error_line(result)
    assert line == (f"gpuwheel: error: no docker engine at unix://{tmp_path}/no-docker.sock (No such file or "
                    f"directory; the default engine) (start that engine, see docs/build.md 'Container engines', "
                    f"or use --backend local)")


def test_podman_that_is_not_installed_is_one_line(gpuwheel, tmp_path, monkeypatch, make_recipe):
    monkeypatch.setenv("PATH", str(tmp_path))  # a host without podman
    monkeypatch.delenv("CONTAINER_HOST", raising=False)

    result = gpuwheel("build", make_recipe(tmp_path, **fixture_recipe()), "--engine", "podman", "--out",
                      tmp_path / "staging")

    assert result.exit_code == 7
    assert error_line(result) == ("gpuwheel: error: podman is not installed (engine chosen by --engine) "
                                  "(apt-get install -y podman, or choose docker with --engine docker, "
                                  "or use --backend local)")


@pytest.mark.parametrize("flag, variable, recipe_engine, chosen, chosen_by", [
    ((), None, "podman", "podman", "fixture.toml [build] engine"),
    ((), "docker", "podman", "docker", "GPUWHEEL_ENGINE"),
    (("--engine", "podman"), "docker", "docker", "podman", "--engine"),
])
def test_the_engine_comes_from_the_flag_then_the_environment_then_the_recipe(
        gpuwheel, tmp_path, monkeypatch, flag, variable, recipe_engine, chosen, chosen_by, make_recipe):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    monkeypatch.setenv("CONTAINER_HOST", f"unix://{tmp_path}/no-podman.sock")
    if variable:
        monkeypatch.setenv("GPUWHEEL_ENGINE", variable)
    else:
        monkeypatch.delenv("GPUWHEEL_ENGINE", raising=False)
    recipe = make_recipe(tmp_path, **fixture_recipe(base_image="gpuwheel-base:bookworm"))
    recipe.write_text(recipe.read_text() + f'\n[build]\nengine = "{recipe_engine}"\n')

    result = gpuwheel("build", recipe, "--backend", "container", *flag, "--out", tmp_path / "staging")

    assert result.exit_code == 7
    line = error_line(result)
    assert line.startswith(f"gpuwheel: error: no {chosen} {'engine' if chosen == 'docker' else 'service'} at ")
    assert f"; engine chosen by {chosen_by})" in line


@pytest.mark.parametrize("value, problem", [
    ("Bad_Image!:x", "it is not NAME[:TAG][@DIGEST]"),
    ("", "it is empty"),
    ("Gpuwheel-Base:bookworm", "repository names are lowercase"),
])
def test_a_malformed_base_image_is_one_line_before_any_engine_is_asked(
        gpuwheel, tmp_path, monkeypatch, value, problem, make_recipe):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")  # never reached

    result = gpuwheel("build", make_recipe(tmp_path, **fixture_recipe()), "--base-image", value, "--out",
                      tmp_path / "staging")

    assert result.exit_code == 7
    line = error_line(result)
    assert line.startswith(f"gpuwheel: error: --base-image {value!r} names no image: {problem}")
    assert line.endswith("(e.g. --base-image gpuwheel-base:bookworm; leave it out for the recipe's base_image)")


def test_a_recipe_with_a_malformed_base_image_or_an_unknown_engine_names_the_line(gpuwheel, tmp_path, make_recipe):
    recipe = make_recipe(tmp_path, **fixture_recipe(base_image="nvidia/CUDA:13.0.2"))

    result = gpuwheel("build", recipe, "--out", tmp_path / "staging")

    assert result.exit_code == 2
    line = make_recipe.line(recipe, "base_image = ")
    assert error_line(result).endswith(f"fixture.toml:{line}: base_image 'nvidia/CUDA:13.0.2' names no image: "
                                       "repository names are lowercase")

    recipe = make_recipe(tmp_path, **fixture_recipe(), build={"engine": "podmn"})

    result = gpuwheel("build", recipe, "--out", tmp_path / "staging")

    assert result.exit_code == 2
    assert error_line(result).endswith("unknown engine 'podmn' (did you mean 'podman'?)")


@pytest.mark.parametrize("value, hint", [("dokcer", "did you mean docker? "), ("", "")])
def test_an_unknown_or_empty_engine_variable_is_one_line(gpuwheel, tmp_path, monkeypatch, value, hint, make_recipe):
    monkeypatch.setenv("GPUWHEEL_ENGINE", value)

    result = gpuwheel("build", make_recipe(tmp_path, **fixture_recipe()), "--backend", "container", "--out",
                      tmp_path / "staging")

    assert result.exit_code == 7
    assert error_line(result) == (f"gpuwheel: error: GPUWHEEL_ENGINE={value!r} names no container engine "
                                  f"({hint}set it to docker or podman, or unset it)")


def test_container_options_with_the_local_backend_are_refused(gpuwheel, tmp_path, make_recipe):
    result = gpuwheel("build", make_recipe(tmp_path, **fixture_recipe()), "--backend", "local", "--engine", "podman",
                      "--out", tmp_path / "staging")

    assert result.exit_code == 7
    assert error_line(result) == ("gpuwheel: error: --engine applies to --backend container only "
                                  "(drop --engine or use --backend container)")


@pytest.mark.skipif(not shutil.which("debootstrap"), reason="needs debootstrap, which base-image checks for before "
                    "the engine (apt-get install debootstrap; .ci/run installs it)")
def test_making_a_base_image_without_an_engine_says_how_to_start_one(gpuwheel, tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    monkeypatch.delenv("GPUWHEEL_ENGINE", raising=False)

    result = gpuwheel("toolchain", "base-image")

    assert result.exit_code == 7
    line = error_line(result)
    assert line.endswith("(start that engine, see docs/build.md 'Container engines')")  # no --backend: it has none


def test_a_base_image_tag_that_cannot_name_an_image_is_refused_before_any_engine_is_asked(gpuwheel, tmp_path,
                                                                                           monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")

    result = gpuwheel("toolchain", "base-image", "--tag", "Base:Bookworm")

    assert result.exit_code == 7
    assert error_line(result) == ("gpuwheel: error: --tag 'Base:Bookworm' cannot name the new image: repository "
                                  "names are lowercase (e.g. --tag gpuwheel-base:bookworm)")


def test_auto_picks_local_when_no_engine_answers(monkeypatch, tmp_path):
    from gpuwheel.backends.engine import choose_engine
    from gpuwheel.backends.packages import open_backend

    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    monkeypatch.delenv("GPUWHEEL_ENGINE", raising=False)
    with open_backend("auto", engine=choose_engine(None, None)) as backend:
        assert backend.name == "local"


def test_plain_progress_lines_follow_ninja_steps(capsys):
    from gpuwheel.backends.progress import BuildProgress

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
    info = LocalBackend(python=fixture_toolchain.location).prepare(FIXTURE_TOOLCHAIN, recipe_name="fixture.toml").info
    assert info.cc.startswith(f"{wrapper}: g++")


def test_a_toolkit_without_what_vllm_links_is_refused_before_the_build(tmp_path):
    """vLLM's CMake needs nvrtc, the driver's link stub and cuBLAS's headers; a toolkit lacking them
    failed half a minute into configure. The local backend names what is missing before it starts."""
    from gpuwheel.backends.base import BuildToolchain, PackageBuild, ToolchainInfo
    from gpuwheel.backends.local import _toolkit_has
    from gpuwheel.errors import ToolchainError
    from gpuwheel.kinds.vllm import TOOLKIT_FILES

    complete, partial = tmp_path / "complete", tmp_path / "partial"
    (complete / "lib64").mkdir(parents=True)
    (complete / "lib64" / "libnvrtc.so").touch()
    target = complete / "targets" / "x86_64-linux"
    (target / "lib" / "stubs").mkdir(parents=True)
    (target / "lib" / "stubs" / "libcuda.so").touch()
    (target / "include").mkdir()
    (target / "include" / "cublas_v2.h").touch()
    (partial / "lib").mkdir(parents=True)
    (partial / "lib" / "libnvrtc.so").touch()
    assert all(_toolkit_has(complete, name) for name in TOOLKIT_FILES)
    missing = [name for name in TOOLKIT_FILES if not _toolkit_has(partial, name)]
    assert "cublas_v2.h" in missing and "libnvrtc.so" not in missing  # libcuda.so: also the host's driver's

    info = ToolchainInfo(backend="local", python="3.11.7", torch="2.14.1+cu130", torch_cuda="13.0", nvcc="13.0.88",
                         cc="c++ (Debian 12.2.0-14) 12.2.0")
    # As prepare() returns it for that toolkit.
    toolchain = BuildToolchain(info, python=shutil.which("python3"), sccache=None, env={"CUDA_HOME": str(partial)})
    job = PackageBuild(name="vllm", tree=tmp_path, deps_dir=tmp_path, command=("python", "-c", "pass"), env={},
                       out_dir=tmp_path / "out", log_path=tmp_path / "log", cache_dir=tmp_path / "cache",
                       toolkit_files=TOOLKIT_FILES)
    with pytest.raises(ToolchainError, match=rf"lacks {', '.join(missing)}, which vllm's build links"):
        LocalBackend().build(toolchain, job, lambda line: None)
    assert not (tmp_path / "out").exists()

"""`gpuwheel build --backend docker` against a real dockerd this module starts (and stops by PID),
with a base image made locally (debootstrap + docker import) and the CUDA 13.0 toolkit from PyPI."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import docker
import pytest
from docker.errors import DockerException, ImageNotFound

from build_helpers import SHARED_CACHE, files_under, fixture_recipe, sass_archs

pytestmark = pytest.mark.docker
BASE_IMAGE = "gpuwheel-base:bookworm"


@pytest.fixture(scope="module")
def docker_host():
    """A dockerd of our own: vfs storage kept in the shared test cache (images survive runs), no networking
    set-up (no iptables, no bridge), a socket in a short temp dir. Skips only if it cannot start."""
    binary = shutil.which("dockerd")
    if binary is None:
        pytest.skip("dockerd is not installed (apt-get install -y docker.io)")
    run_dir = Path(tempfile.mkdtemp(prefix="gwd-", dir="/tmp"))
    host = f"unix://{run_dir}/docker.sock"
    log_path = run_dir / "dockerd.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [binary, "--storage-driver=vfs", "--iptables=false", "--ip6tables=false", "--bridge=none",
             f"--data-root={SHARED_CACHE / 'docker'}", f"--exec-root={run_dir / 'exec'}",
             f"--pidfile={run_dir / 'docker.pid'}", "-H", host], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.skip(f"dockerd could not start (exit {process.returncode}): "
                            f"{log_path.read_text()[-300:].strip()}")
            try:
                docker.DockerClient(base_url=host, timeout=5).ping()
                break
            except DockerException:
                if time.monotonic() > deadline:
                    pytest.skip(f"dockerd did not answer within 60 s: {log_path.read_text()[-300:].strip()}")
                time.sleep(0.5)
        yield host
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        netns = run_dir / "exec" / "netns" / "default"  # dockerd leaves its network namespace mounted
        if netns.is_mount():
            subprocess.run(["umount", str(netns)], check=False)
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture
def engine_env(docker_host, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", docker_host)
    monkeypatch.setenv("GPUWHEEL_CACHE", str(SHARED_CACHE))
    return docker_host


@pytest.fixture
def base_image(engine_env, gpuwheel):
    """The debootstrapped base image, made once (~2.5 min) and kept by the shared dockerd data root."""
    try:
        docker.DockerClient(base_url=engine_env).images.get(BASE_IMAGE)
    except ImageNotFound:
        made = gpuwheel("toolchain", "base-image", "--tag", BASE_IMAGE)
        assert made.exit_code == 0, made.stderr
    return BASE_IMAGE


@pytest.mark.slow
def test_docker_build_gives_a_wheel_with_sm90a_and_sm120_sass_and_a_rebuild_hits_the_compile_cache(
        gpuwheel, tmp_path, base_image):
    recipe = fixture_recipe(tmp_path, base_image=base_image)
    out = tmp_path / "staging"

    first = gpuwheel("build", recipe, "--backend", "docker", "--out", out, "--json")

    assert first.exit_code == 0, first.stderr
    [wheel] = out.glob("*.whl")
    assert wheel.name.startswith("gwfixture-0.1.0+cu130.sm90a.sm120.torch214-cp311-cp311-")
    assert set(sass_archs(wheel)) == {"sm_90a", "sm_120"}
    toolchain = first.json()["raw"]["toolchain"]
    assert toolchain["backend"] == "docker" and toolchain["image"].startswith("gpuwheel-toolchain:")
    assert toolchain["nvcc"] == "13.0.88" and toolchain["torch"].startswith("2.14.1")
    assert toolchain["base_image"] == base_image

    again = gpuwheel("build", recipe, "--backend", "docker", "--out", out, "--json")

    assert again.exit_code == 0, again.stderr
    assert "building toolchain image" not in again.stderr  # same pins: the image is reused
    rebuilt = again.json()["raw"]["wheels"][0]
    assert rebuilt["cache_hits"] > 0 and rebuilt["cache_misses"] == 0


def test_a_base_image_the_engine_lacks_and_cannot_pull_is_one_line(gpuwheel, tmp_path, engine_env):
    recipe = fixture_recipe(tmp_path, base_image="gpuwheel-test/no-such-image:1")
    out = tmp_path / "staging"

    result = gpuwheel("build", recipe, "--backend", "docker", "--out", out)

    assert result.exit_code == 7
    [line] = [l for l in result.stderr.splitlines() if l.startswith("gpuwheel: error:")]
    assert line.startswith(f"gpuwheel: error: base image gpuwheel-test/no-such-image:1 is not in the engine at "
                           f"{engine_env} and cannot be pulled (")
    assert line.endswith("(make one with `gpuwheel toolchain base-image`, then pass --base-image "
                         "gpuwheel-base:bookworm)")
    assert files_under(out) == []


def test_recipe_without_a_base_image_names_the_flag(gpuwheel, tmp_path, engine_env):
    result = gpuwheel("build", fixture_recipe(tmp_path), "--backend", "docker", "--out", tmp_path / "staging")

    assert result.exit_code == 7
    assert "fixture.toml names no [toolchain] base_image (set one, or pass --base-image" in result.stderr


@pytest.mark.slow
def test_a_compiler_killed_in_the_container_is_reported_as_out_of_memory(gpuwheel, tmp_path, base_image):
    recipe = fixture_recipe(tmp_path, base_image=base_image,
                            env={"PYTORCH_NVCC": "python $GPUWHEEL_TREE/kill_cicc.py"})
    out = tmp_path / "staging"

    result = gpuwheel("build", recipe, "--backend", "docker", "--jobs", "2", "--out", out)

    assert result.exit_code == 9, result.stderr
    assert ("gwfixture: a compiler was killed by SIGKILL (out of memory) at MAX_JOBS=2 × NVCC_THREADS="
            in result.stderr)
    assert "(lower the jobs: --jobs 1, or [build] jobs = 1 in fixture.toml)" in result.stderr
    assert files_under(out) == []

"""`gpuwheel build --backend container` on both engines, for real: a dockerd this module starts (and
stops by PID), and podman, whose API service gpuwheel starts by itself as it does for a user. Base
images are made locally (debootstrap + import), the CUDA 13.0 toolkit comes from PyPI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import docker
import pytest
from docker.errors import DockerException, ImageNotFound

from build_helpers import SHARED_CACHE, files_under, fixture_recipe, fixture_wheel
from dist_helpers import local_cluster, missing_prerequisites
from gpuwheel.run import background
from gpuwheel.shipped import CHECKOUT

pytestmark = pytest.mark.docker
BASE_IMAGE = "gpuwheel-base:bookworm"
ENGINES = ("docker", "podman")


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
    try:
        with background([binary, "--storage-driver=vfs", "--iptables=false", "--ip6tables=false", "--bridge=none",
                         f"--data-root={SHARED_CACHE / 'docker'}", f"--exec-root={run_dir / 'exec'}",
                         f"--pidfile={run_dir / 'docker.pid'}", "-H", host],
                        log_path=log_path, stop_seconds=60) as process:
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
        # dockerd leaves its network namespace mounted on a file, which Path.is_mount() never reports.
        netns = run_dir / "exec" / "netns" / "default"
        if netns.exists():
            subprocess.run(["umount", str(netns)], check=False, capture_output=True)
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def podman_storage():
    """podman's storage for these tests, kept in the shared test cache: the storage.conf a user would
    have in /etc/containers. No service is started here: gpuwheel starts podman's itself."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (apt-get install -y podman)")
    root = SHARED_CACHE / "podman"
    root.mkdir(parents=True, exist_ok=True)
    conf = root / "storage.conf"
    conf.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{root / "storage"}"\nrunroot = "{root / "run"}"\n')
    return conf


@pytest.fixture(params=ENGINES)
def engine(request, monkeypatch) -> str:
    """The engine a user picked with GPUWHEEL_ENGINE, reachable the way that engine is on a fresh host."""
    name = request.param
    if name == "docker":
        monkeypatch.setenv("DOCKER_HOST", request.getfixturevalue("docker_host"))
    else:
        monkeypatch.setenv("CONTAINERS_STORAGE_CONF", str(request.getfixturevalue("podman_storage")))
        monkeypatch.delenv("CONTAINER_HOST", raising=False)
    monkeypatch.setenv("GPUWHEEL_ENGINE", name)
    monkeypatch.setenv("GPUWHEEL_CACHE", str(SHARED_CACHE))
    return name


def image_id(engine: str, ref: str) -> str | None:
    """The engine's own answer, asked without gpuwheel: the ID of the image under ref, if it holds one."""
    if engine == "docker":
        try:
            return docker.DockerClient(base_url=os.environ["DOCKER_HOST"]).images.get(ref).id
        except ImageNotFound:
            return None
    found = subprocess.run(["podman", "image", "inspect", "--format", "{{.Id}}", ref], capture_output=True, text=True)
    return f"sha256:{found.stdout.strip()}" if found.returncode == 0 else None


@pytest.fixture
def base_image(engine, gpuwheel):
    """The debootstrapped base image, made once per engine (~3 min) and kept in the shared test cache."""
    if image_id(engine, BASE_IMAGE) is None:
        made = gpuwheel("toolchain", "base-image", "--tag", BASE_IMAGE)
        assert made.exit_code == 0, made.stderr
        assert f"use it with --base-image {BASE_IMAGE}" in made.stdout  # the result goes to stdout, progress to stderr
    return BASE_IMAGE


def gpuwheel_podman_services() -> list[str]:
    found = subprocess.run(["pgrep", "-af", "system service --time=0 unix:///tmp/gpuwheel-podman-"],
                           capture_output=True, text=True)
    return found.stdout.splitlines()


@pytest.mark.slow
def test_a_container_build_gives_a_wheel_with_sm90a_and_sm120_sass_pinned_to_its_images_and_a_rebuild_hits_the_cache(
        gpuwheel, tmp_path, engine, base_image, make_recipe):
    # report_sandbox.py stands in front of nvcc and prints what the compile can reach.
    recipe = make_recipe(tmp_path, **fixture_recipe(
        base_image=base_image, env={"PYTORCH_NVCC": "python $GPUWHEEL_TREE/report_sandbox.py sccache nvcc"}))
    out = tmp_path / "staging"

    first = gpuwheel("build", recipe, "--backend", "container", "--out", out, "--json")

    assert first.exit_code == 0, first.stderr
    wheel = fixture_wheel(out)
    built = first.json()["raw"]
    toolchain = built["toolchain"]
    assert toolchain["backend"] == "container" and toolchain["engine"].startswith(f"{engine} ")
    assert toolchain["nvcc"] == "13.0.88" and toolchain["torch"].startswith("2.14.1")
    assert toolchain["image"].startswith("gpuwheel-toolchain:")
    assert toolchain["image_id"] == image_id(engine, toolchain["image"])
    assert toolchain["base_image"] == base_image and toolchain["base_image_id"] == image_id(engine, base_image)
    # The same guarantees on both engines: no network but loopback, the sources read-only.
    log = Path(built["wheels"][0]["log"]).read_text()
    assert "gwsandbox: interfaces=lo read_only=/gpuwheel/deps-src,/gpuwheel/src" in log
    # What the container does before the first compile step is said, not silent.
    assert f"gwfixture 0.1.0: starting a {engine} container of {toolchain['image']}" in first.stderr
    assert "gwfixture 0.1.0: copying the source tree" in first.stderr

    shown = gpuwheel("show-wheel", wheel)

    assert shown.exit_code == 0, shown.stderr
    for key in ("image_id", "base_image_id"):
        [row] = [line for line in shown.stdout.splitlines() if f"toolchain {key} " in line]
        assert toolchain[key] in row

    again = gpuwheel("build", recipe, "--backend", "container", "--out", out, "--rebuild", "--json")

    assert again.exit_code == 0, again.stderr
    assert "toolchain image gpuwheel-toolchain" not in again.stderr  # same pins: the image is reused
    rebuilt = again.json()["raw"]["wheels"][0]
    assert rebuilt["cache_hits"] > 0 and rebuilt["cache_misses"] == 0
    assert gpuwheel_podman_services() == []  # the service gpuwheel started for podman is gone


def test_a_base_image_the_engine_lacks_and_cannot_pull_is_one_line(gpuwheel, tmp_path, engine, make_recipe):
    recipe = make_recipe(tmp_path, **fixture_recipe(base_image="gpuwheel-test/no-such-image:1"))
    out = tmp_path / "staging"

    result = gpuwheel("build", recipe, "--backend", "container", "--out", out)

    assert result.exit_code == 7
    [line] = [l for l in result.stderr.splitlines() if l.startswith("gpuwheel: error:")]
    assert line.startswith(f"gpuwheel: error: image gpuwheel-test/no-such-image:1 is not in the {engine} engine at ")
    assert "cannot be pulled (" in line
    assert line.endswith("(where no registry is reachable, make a base image with `gpuwheel toolchain base-image` "
                         "and pass --base-image gpuwheel-base:bookworm)")
    assert "Traceback" not in result.stderr
    assert files_under(out) == []


def test_recipe_without_a_base_image_names_the_flag(gpuwheel, tmp_path, engine, make_recipe):
    result = gpuwheel("build", make_recipe(tmp_path, **fixture_recipe()), "--backend", "container", "--out",
                      tmp_path / "staging")

    assert result.exit_code == 7
    assert "fixture.toml names no [toolchain] base_image (set one, or pass --base-image" in result.stderr


def test_a_podman_service_that_stopped_is_one_line(gpuwheel, tmp_path, podman_storage, monkeypatch, make_recipe):
    """A user's own service (CONTAINER_HOST) that is down: gpuwheel says so and starts no other."""
    socket = tmp_path / "podman.sock"
    monkeypatch.setenv("CONTAINERS_STORAGE_CONF", str(podman_storage))
    service = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{socket}"])
    deadline = time.monotonic() + 30
    while not socket.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    service.terminate()
    service.wait(timeout=30)
    monkeypatch.setenv("CONTAINER_HOST", f"unix://{socket}")

    result = gpuwheel("build", make_recipe(tmp_path, **fixture_recipe(base_image=BASE_IMAGE)), "--engine",
                      "podman", "--out", tmp_path / "staging")

    assert result.exit_code == 7
    [line] = [l for l in result.stderr.splitlines() if l.startswith("gpuwheel: error:")]
    assert line.startswith(f"gpuwheel: error: no podman service at unix://{socket} (CONTAINER_HOST) (")
    assert line.endswith("(start `podman system service` there, or unset CONTAINER_HOST so gpuwheel starts one, "
                         "or use --backend local)")
    assert gpuwheel_podman_services() == []


@pytest.mark.slow
def test_a_compiler_killed_in_the_container_is_reported_as_out_of_memory(
        gpuwheel, tmp_path, engine, base_image, make_recipe):
    recipe = make_recipe(tmp_path, **fixture_recipe(
        base_image=base_image, env={"PYTORCH_NVCC": "python $GPUWHEEL_TREE/kill_cicc.py"}))
    out = tmp_path / "staging"

    result = gpuwheel("build", recipe, "--backend", "container", "--jobs", "2", "--out", out)

    assert result.exit_code == 9, result.stderr
    assert ("gwfixture: a compiler was killed by SIGKILL (out of memory) at MAX_JOBS=2 × NVCC_THREADS="
            in result.stderr)
    assert "(lower the jobs: --jobs 1, or [build] jobs = 1 in fixture.toml)" in result.stderr
    assert files_under(out) == []


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["docker"], indirect=True)
def test_the_gpuwheel_image_installs_the_wheel_and_lists_the_shipped_targets(engine, base_image, dist, tmp_path):
    """dockerfiles/gpuwheel.Dockerfile: gpuwheel in a container for CI, from its wheel alone."""
    context = tmp_path / "context"
    context.mkdir()
    shutil.copy2(dist["wheel"], context)
    shutil.copy2(CHECKOUT / "dockerfiles" / "gpuwheel.Dockerfile", context / "Dockerfile")
    # The image's pip runs offline from these wheels: the host's index and TLS settings stay out of it.
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", "3.11",
                    "-d", str(context), str(dist["wheel"])], check=True, capture_output=True, text=True, timeout=600)
    client = docker.DockerClient(base_url=os.environ["DOCKER_HOST"], timeout=900)
    tag = "gpuwheel-test:latest"
    errors = [chunk["error"] for chunk in client.api.build(
        path=str(context), tag=tag, rm=True, forcerm=True, decode=True, network_mode="host",
        buildargs={"BASE": base_image, "PIP_ARGS": "--no-index"}) if "error" in chunk]
    assert errors == []
    try:
        listed = client.containers.run(tag, ["targets", "--json"], network_mode="none", remove=True)
        names = sorted(t["name"] for t in json.loads(listed)["targets"])
        assert names == sorted(p.stem for p in (CHECKOUT / "recipes").glob("*.toml"))
        helped = client.containers.run(tag, network_mode="none", remove=True).decode()
        assert helped.startswith("Usage: gpuwheel")
    finally:
        client.images.remove(tag, force=True)


SCCACHE_DIST = shutil.which("sccache-dist", path=str(Path(sys.executable).parent)) or shutil.which("sccache-dist")


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["docker"], indirect=True)  # podman's host network: not installed here to try
def test_a_distributed_container_build_compiles_on_the_cluster_with_the_images_compilers_and_gives_the_same_wheel(
        gpuwheel, tmp_path, engine, base_image, monkeypatch, make_recipe):
    if missing := missing_prerequisites(SCCACHE_DIST):
        pytest.skip(f"local sccache-dist cluster: {missing}")
    # Recache inside the container (the plan's env reaches it, the host's does not): a cache hit never
    # leaves the container, and both builds compile everything.
    recipe = make_recipe(tmp_path, **fixture_recipe(base_image=base_image, env={
        "SCCACHE_RECACHE": "1", "PYTORCH_NVCC": "python $GPUWHEEL_TREE/report_sandbox.py sccache nvcc"}))
    packed = SHARED_CACHE / "compile" / "dist-client-container"
    shutil.rmtree(packed, ignore_errors=True)  # the compilers this build packs, not an earlier run's
    here = gpuwheel("build", recipe, "--backend", "container", "--out", tmp_path / "here", "--json")
    assert here.exit_code == 0, here.stderr

    # The scheduler and servers in network namespaces behind a bridge of the host: the container, on the
    # host's network, reaches them at the addresses the host does.
    (tmp_path / "cluster").mkdir()
    with local_cluster(SCCACHE_DIST, tmp_path / "cluster") as cluster:
        monkeypatch.setenv("GPUWHEEL_DIST_TOKEN", cluster.token)
        spread = gpuwheel("build", recipe, "--backend", "container", "--dist", cluster.url, "--out", tmp_path / "dist",
                          "--json")
        completed = cluster.completed_jobs()
        shipped = [tmp_path / "cluster" / f"server{i}" / "toolchains" for i in range(1, len(cluster.servers) + 1)]

    assert spread.exit_code == 0, spread.stderr
    assert f"distributing compiles to {cluster.url}: 2 build servers" in spread.stderr
    [built] = spread.json()["raw"]["wheels"]
    assert built["dist"]["fallbacks"] == 0 and sum(built["dist"]["remote"].values()) >= 4
    # The scheduler's side: the same number of jobs assigned to the servers and reported complete.
    assert sum(completed.values()) == sum(built["dist"]["remote"].values())
    # The compilers the servers ran are the image's (its c++, the PyPI toolkit's cicc and ptxas under
    # /opt/toolchain), packed inside the container by its sccache server and shipped to the servers.
    log = Path(built["log"]).read_text()
    assert "gpuwheel: starting sccache as a client of the sccache-dist scheduler" in log
    # What nvcc's wrapper saw: the host's interfaces, and the token in no process's environment or file.
    assert "gwsandbox: interfaces=lo " not in log and "gwsandbox: interfaces=" in log
    seen = [line for line in log.splitlines() if "process environments" in line]
    assert seen and all(line.endswith(" 0 holding the sccache client config; config file left: False") for line in seen)
    compilers = json.loads((packed / "client" / "weak_map.json").read_text())
    assert any(c.startswith("/usr/bin/c++-") for c in compilers)
    assert {"cicc", "ptxas"} <= {Path(c).name.split("-")[0] for c in compilers if c.startswith("/opt/toolchain/")}
    assert any(files_under(folder) for folder in shipped)
    assert all(p.stat().st_uid == os.getuid() for p in packed.rglob("*"))  # handed back to the caller
    # The token: in no output, log or wheel, and gone from the image and the engine's containers.
    dist_wheel, here_wheel = fixture_wheel(tmp_path / "dist"), fixture_wheel(tmp_path / "here")
    assert cluster.token not in log + spread.stderr + spread.stdout
    with zipfile.ZipFile(dist_wheel) as wheel:
        assert [n for n in wheel.namelist() if cluster.token.encode() in wheel.read(n)] == []
    client = docker.DockerClient(base_url=os.environ["DOCKER_HOST"])
    image = client.images.get(spread.json()["raw"]["toolchain"]["image"])
    assert cluster.token not in json.dumps(image.attrs) + json.dumps(image.history())
    assert client.containers.list(all=True, filters={"label": "gpuwheel.package"}) == []
    # Compiled on the servers from the same image's compilers: the container's local build's bytes.
    assert dist_wheel.read_bytes() == here_wheel.read_bytes()

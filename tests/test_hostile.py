"""Hostile or careless recipes (issue 11): a recipe is untrusted input. Names that become paths or
command arguments are refused at load with file:line (exit 2); nothing outside gpuwheel's own roots
is written or deleted; no recipe value reaches git as an option; secrets are masked."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from gpuwheel.errors import SourceError
from sources_helpers import demo_package, file_member, leftovers, make_repos, sha256, stored, tarball


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---- data loss outside the cache ------------------------------------------------------------------
@pytest.mark.parametrize("spelling", ["absolute", "dotdot"])
def test_an_sdist_named_by_a_path_is_refused_and_the_folder_it_points_at_survives(
        gpuwheel, make_recipe, cache, tmp_path, spelling):
    # A user's downloads folder holding a file of the sdist's name, and a recipe whose pin is stale.
    downloads = tmp_path / "Downloads"
    downloads.mkdir()
    (downloads / "demo-1.0.tar.gz").write_bytes(b"an old download")
    (downloads / "thesis.pdf").write_bytes(b"years of work")
    before = _snapshot(downloads)
    name = (str(downloads / "demo-1.0.tar.gz") if spelling == "absolute"
            else "../../../../Downloads/demo-1.0.tar.gz")  # from cache/sources/archives/<sha256>/
    recipe = make_recipe(tmp_path, package=[demo_package({"sdist": name, "sha256": "0" * 64})])

    for args in (("--offline",), ()):
        result = gpuwheel("fetch", recipe, *args)
        assert result.exit_code == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert f"recipe.toml:{make_recipe.line(recipe, 'sdist = ')}: sdist '{name}' must be a bare file name" \
            in result.stderr
        assert "set the index with index = " in result.stderr
    assert _snapshot(downloads) == before
    assert stored(cache) == [] and leftovers(cache) == []


@pytest.mark.parametrize("body, line, expected", [
    ('[target]\nname = "../../etc"', 3, "target name '../../etc' must be"),
    ('[[package]]\nname = "../.."\nversion = "1.0"\nsource = { path = "src" }', 3,
     "package name '../..' is not a valid package name"),
    ('[[package]]\nname = "demo"\nversion = "1.0"\nsource = { url = "http://example.com/x/%2e%2e", '
     'sha256 = "' + "0" * 64 + '" }', 5, "url 'http://example.com/x/%2e%2e' must end in a bare file name"),
    ('[[package]]\nname = "demo"\nversion = "1.0"\nsource = { path = "src" }\n[package.stand_in]\n'
     'wheel = "../../demo-1.0-py3-none-any.whl"\nsha256 = "' + "0" * 64 + '"', 7,
     "stand_in wheel '../../demo-1.0-py3-none-any.whl' must be a bare file name"),
    ('[[package]]\nname = "demo"\nversion = "1.0"\nsource = { path = "src" }\n[[package.dependency]]\n'
     'name = "../lib"\ngit = "https://example.com/lib.git"\nrev = "v1"\nsrc_dir_env = "LIB_SRC_DIR"', 7,
     "dependency name '../lib' must be"),
    ('[[package]]\nname = "demo"\nversion = "1.0"\nsource = { path = "src" }\n[[package.dependency]]\n'
     'name = "lib"\ngit = "https://example.com/lib.git"\nrev = "v1"\nsrc_dir_env = "LIB SRC;rm"', 10,
     "src_dir_env 'LIB SRC;rm' must be an environment variable name"),
    ('[[package]]\nname = "demo"\nversion = "1.0"\nsource = { path = "src" }\n[package.env]\n"A=B" = "1"', 6,
     "env name 'A=B' must be an environment variable name"),
], ids=["target", "package", "url", "stand-in", "dependency", "src-dir-env", "env-key"])
def test_names_that_become_paths_are_refused_at_load_with_file_and_line(
        gpuwheel, make_recipe, tmp_path, body, line, expected):
    # Literal text: the point is the file:line each refusal names in a recipe laid out by hand.
    recipe = make_recipe(tmp_path, text='extends = "h100"\n' + body + "\n")
    result = gpuwheel("plan", recipe)
    assert result.exit_code == 2, result.stderr
    assert f"recipe.toml:{line}: {expected}" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_a_patch_series_naming_a_file_outside_its_set_is_refused(gpuwheel, make_recipe, tmp_path):
    secret = tmp_path / "elsewhere.patch"
    secret.write_text("not a patch of this set\n")
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "series").write_text("../elsewhere.patch\n")
    recipe = make_recipe(tmp_path, package=[demo_package({"path": "src"}, patches="patches")])
    result = gpuwheel("plan", recipe)
    assert result.exit_code == 6, result.stderr
    assert "series:1: '../elsewhere.patch' must be a file name in the patch set" in result.stderr
    assert result.stderr.count("\n") == 1


# ---- command injection ----------------------------------------------------------------------------
@pytest.mark.parametrize("key, value, expected", [
    ("rev", "--upload-pack=touch {pwned}", "rev '--upload-pack=touch {pwned}' must be a tag or a commit"),
    ("git", "--upload-pack=touch {pwned}", "git '--upload-pack=touch {pwned}' must be a repository URL"),
    ("git", "ext::sh -c touch% {pwned}", "git 'ext::sh -c touch% {pwned}' must be a repository URL"),
    ("commit", "-c", "commit '-c' must be the full 40-hex commit"),
])
def test_a_dependency_pin_that_looks_like_an_option_is_refused_before_git_runs(
        gpuwheel, make_recipe, cache, tmp_path, key, value, expected):
    pwned = tmp_path / "pwned"
    fields = {"name": "lib", "git": "https://example.com/lib.git", "rev": "v1.0", "src_dir_env": "LIB_SRC_DIR",
              key: value.format(pwned=pwned)}
    (tmp_path / "src").mkdir()
    recipe = make_recipe(tmp_path, package=[demo_package({"path": "src"}, dependency=[fields])])
    result = gpuwheel("fetch", recipe)
    assert result.exit_code == 2, result.stderr
    assert expected.format(pwned=pwned) in result.stderr
    assert not pwned.exists()
    assert stored(cache) == []


def test_git_never_reads_a_rev_as_an_option_even_past_the_recipe_checks(tmp_path):
    # Defence in depth: the fetch itself puts revs after --end-of-options.
    from gpuwheel.sources import _checkout
    repos = make_repos(tmp_path / "repos")
    work, pwned = tmp_path / "work", tmp_path / "pwned"
    work.mkdir()
    with pytest.raises(SourceError):
        _checkout(work, repos["lib"], f"--upload-pack=touch {pwned}", False, "lib")
    assert not pwned.exists()


def test_the_connected_machine_command_quotes_what_it_prints(gpuwheel, make_recipe, cache, tmp_path):
    (tmp_path / "src").mkdir()
    recipe = make_recipe(tmp_path, package=[demo_package({"path": "src"}, dependency=[{
        "name": "lib", "git": "https://gpuwheel-test.invalid/a b.git", "rev": "v1.0+local",
        "src_dir_env": "LIB_SRC_DIR"}])])
    result = gpuwheel("fetch", recipe, "--offline", "--json")
    assert result.exit_code == 0, result.stderr
    command = result.json()["packages"][0]["dependencies"][0]["fetch_command"]
    assert command.startswith("git clone 'https://gpuwheel-test.invalid/a b.git' deps/lib && ")
    assert subprocess.run(["bash", "-n", "-c", command]).returncode == 0


def test_a_cache_entry_linked_elsewhere_is_unlinked_not_followed(gpuwheel, make_recipe, cache, tmp_path,
                                                                 http_server):
    # Someone made the cache's archive folder a link to their own folder, whose copy then differs.
    good = tarball([file_member("demo-1.0/setup.py", b"print('demo')\n")])
    server = http_server({"demo-1.0.tar.gz": good})
    recipe = make_recipe(tmp_path, package=[demo_package({"url": server.url("demo-1.0.tar.gz"),
                                                          "sha256": sha256(good)})])
    assert gpuwheel("fetch", recipe).exit_code == 0
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "demo-1.0.tar.gz").write_bytes(b"their own file")
    (theirs / "notes.txt").write_text("keep me\n")
    linked = cache / "sources" / "archives" / sha256(good)
    for entry in linked.iterdir():
        entry.unlink()
    linked.rmdir()
    linked.symlink_to(theirs)
    before = _snapshot(theirs)

    result = gpuwheel("fetch", recipe, "--offline")
    assert result.exit_code == 4, result.stderr
    assert "cached demo-1.0.tar.gz was altered" in result.stderr
    assert _snapshot(theirs) == before
    assert not linked.is_symlink()


# ---- secrets --------------------------------------------------------------------------------------
SECRET_ENV = {"HF_TOKEN": "hf_sEcReT1", "PIP_INDEX_URL": "https://alice:sEcReT2@pypi.example.com/simple/",
              "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
SECRET_DEPENDENCY = {"name": "lib", "git": "https://oauth2:sEcReT3@git.example.com/lib.git", "rev": "v1.0",
                     "src_dir_env": "LIB_SRC_DIR"}
SECRET_PACKAGE = demo_package({"path": "src"}, env=SECRET_ENV, dependency=[SECRET_DEPENDENCY])


def test_secrets_in_a_recipe_are_masked_in_plans_but_reach_the_build(gpuwheel, make_recipe, tmp_path):
    from gpuwheel.plan import make_plan
    from gpuwheel.recipe import load_recipe
    recipe = make_recipe(tmp_path, package=[SECRET_PACKAGE])
    for args in (("--json",), ()):
        result = gpuwheel("plan", recipe, *args)
        assert result.exit_code == 0, result.stderr
        shown = result.stdout + result.stderr
        assert "sEcReT" not in shown
    plan = gpuwheel("plan", recipe, "--json").json()
    env = plan["packages"][0]["env"]
    assert env["HF_TOKEN"] == "****" and env["CMAKE_BUILD_PARALLEL_LEVEL"] == "2"
    assert env["PIP_INDEX_URL"] == "https://alice:****@pypi.example.com/simple/"
    assert plan["packages"][0]["dependencies"][0]["git"] == "https://oauth2:****@git.example.com/lib.git"
    # The build itself gets the real values, and the hash depends on them.
    real = make_plan(load_recipe(recipe))
    assert real.packages[0].env_dict["HF_TOKEN"] == "hf_sEcReT1"
    other = make_recipe(tmp_path, name="other.toml",
                        package=[{**SECRET_PACKAGE, "env": {**SECRET_ENV, "HF_TOKEN": "hf_other"}}])
    assert make_plan(load_recipe(other)).hash != real.hash


def test_an_index_password_never_appears_in_an_error(gpuwheel, make_recipe, cache, tmp_path):
    recipe = make_recipe(tmp_path, package=[demo_package({
        "sdist": "demo-1.0.tar.gz", "sha256": "0" * 64, "index": "http://bob:sEcReT4@127.0.0.1:9/simple/"})])
    result = gpuwheel("fetch", recipe)
    assert result.exit_code == 4, result.stderr
    assert "cannot read index http://bob:****@127.0.0.1:9/simple/" in result.stderr
    assert "sEcReT" not in result.stderr


def test_a_password_in_the_repository_url_is_refused_with_where_it_belongs(gpuwheel, tmp_path):
    result = gpuwheel("publish", "--wheels", tmp_path, "--repository", "https://me:sEcReT5@pypi.example.com/legacy/")
    assert result.exit_code == 13, result.stderr
    assert "sEcReT" not in result.stderr
    assert "--repository https://me:****@pypi.example.com/legacy/ carries a password" in result.stderr
    assert "TWINE_USERNAME" in result.stderr and "keyring" in result.stderr


def test_a_wheels_provenance_records_no_secret(make_recipe, tmp_path):
    from gpuwheel.plan import make_plan
    from gpuwheel.recipe import load_recipe
    from gpuwheel.wheelfile import read_wheel
    from gpuwheel.wheels import finish_wheels
    from wheels_helpers import compile_plain_library, raw_wheel
    plan = make_plan(load_recipe(make_recipe(tmp_path, package=[SECRET_PACKAGE])))
    raw = raw_wheel(tmp_path, "demo", "1.0", "demo", {"libdemo.so": compile_plain_library(tmp_path, "libdemo.so")})
    # A host-only .so: no GPU code, so the audit fails, and the wheel is finished marked failed.
    [wheel] = finish_wheels(plan, [("demo", raw)], toolchain=None, out_dir=tmp_path / "staging",
                            allow_audit_failure=True).wheels
    provenance = read_wheel(wheel.path).provenance  # what the wheel itself carries
    text = json.dumps(provenance.to_json())
    assert "sEcReT" not in text
    assert provenance.build.env["HF_TOKEN"] == "****"
    assert "https://oauth2:****@git.example.com/lib.git" in text
    assert provenance == wheel.provenance


# ---- interrupted runs -----------------------------------------------------------------------------
STOPPED_RUN = """
import sys
from pathlib import Path
from gpuwheel.run import stop_on_signals, run
stop_on_signals()
pidfile = Path(sys.argv[1])
try:
    # A build's compiler: a grandchild in the command's process group, as nvcc under ninja is.
    run(["bash", "-c", f"sleep 300 & echo $! > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; wait"])
finally:
    Path(sys.argv[2]).write_text("cleaned up")
"""


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGHUP"])
def test_a_signal_to_gpuwheel_stops_the_compilers_it_started_and_runs_its_cleanup(tmp_path, signal_name):
    import signal
    import sys
    import time
    pidfile, cleaned = tmp_path / "compiler.pid", tmp_path / "cleaned"
    gpuwheel = subprocess.Popen([sys.executable, "-c", STOPPED_RUN, str(pidfile), str(cleaned)])
    deadline = time.monotonic() + 30
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    compiler = int(pidfile.read_text())
    gpuwheel.send_signal(getattr(signal, signal_name))
    assert gpuwheel.wait(timeout=30) == 128 + getattr(signal, signal_name)
    assert cleaned.read_text() == "cleaned up"
    assert not _running(compiler)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for a reaper that a container may lack)."""
    import time
    for _ in range(50):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        if state in ("Z", "X"):
            return False
        time.sleep(0.1)
    return True

"""`gpuwheel fetch`: every source fetched once, verified, cached; hostile input refused, cache clean."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest

from sources_helpers import (FLASH_ATTN_SHA256, demo_package, file_member, git, leftovers, link_member, make_repos,
                             sha256, stored, tarball)


def _url_recipe(make_recipe, directory: Path, url: str, digest: str) -> Path:
    return make_recipe(directory, package=[demo_package({"url": url, "sha256": digest})])


GOOD = tarball([file_member("demo-1.0/setup.py", b"print('demo')\n"),
                file_member("demo-1.0/src/kernel.cu", b"// kernel\n"),
                link_member("demo-1.0/src/alias.cu", "kernel.cu")])


# ---- archives over HTTP ---------------------------------------------------------------------------
def test_url_source_is_downloaded_verified_extracted_and_then_served_from_the_cache(
        gpuwheel, make_recipe, cache, http_server, tmp_path):
    server = http_server({"demo-1.0.tar.gz": GOOD})
    recipe = _url_recipe(make_recipe, tmp_path, server.url("demo-1.0.tar.gz"), sha256(GOOD))

    first = gpuwheel("fetch", recipe, "--json")
    assert first.exit_code == 0, first.stderr
    package = first.json()["packages"][0]
    assert package["status"] == "fetched"
    tree = Path(package["tree"])
    assert tree == cache / "sources" / "trees" / sha256(GOOD) / "demo-1.0"
    assert (tree / "src" / "kernel.cu").read_text() == "// kernel\n"
    assert os.readlink(tree / "src" / "alias.cu") == "kernel.cu"  # a link inside the tree is kept
    assert Path(package["archive"]).read_bytes() == GOOD

    server.files.clear()  # the second fetch must not need the server
    again = gpuwheel("fetch", recipe, "--json")
    assert again.exit_code == 0, again.stderr
    assert again.json()["packages"][0]["status"] == "cached"
    assert leftovers(cache) == []


def test_wrong_sha256_is_refused_and_nothing_is_kept(gpuwheel, make_recipe, cache, http_server, tmp_path):
    tampered = GOOD[:-1] + bytes([GOOD[-1] ^ 1])
    server = http_server({"demo-1.0.tar.gz": tampered})
    result = gpuwheel("fetch", _url_recipe(make_recipe, tmp_path, server.url("demo-1.0.tar.gz"), sha256(GOOD)))
    assert result.exit_code == 4
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("gpuwheel: error: demo 1.0: demo-1.0.tar.gz from http://127.0.0.1")
    assert f"has sha256 {sha256(tampered)}, the recipe pins {sha256(GOOD)}; refused and kept nothing" in line
    assert stored(cache) == [] and leftovers(cache) == []


def test_interrupted_download_leaves_no_half_file(gpuwheel, make_recipe, cache, http_server, tmp_path):
    server = http_server({"demo-1.0.tar.gz": GOOD})
    result = gpuwheel("fetch",
                      _url_recipe(make_recipe, tmp_path, server.url("demo-1.0.tar.gz", kind="cut"), sha256(GOOD)))
    assert result.exit_code == 4
    assert "demo 1.0: download of http://127.0.0.1" in result.stderr
    assert f"failed after {len(GOOD) // 2} bytes" in result.stderr and "kept nothing" in result.stderr
    assert stored(cache) == [] and leftovers(cache) == []


def test_http_error_names_the_url_and_status(gpuwheel, make_recipe, cache, http_server, tmp_path):
    server = http_server({})
    result = gpuwheel("fetch", _url_recipe(make_recipe, tmp_path, server.url("gone.tar.gz"), sha256(GOOD)))
    assert result.exit_code == 4
    assert "demo 1.0: " in result.stderr and "gone.tar.gz answered HTTP 404" in result.stderr
    assert stored(cache) == [] and leftovers(cache) == []


@pytest.mark.parametrize("member, why", [
    (file_member("demo-1.0/../../escaped.txt"), "outside the destination"),
    (file_member("/tmp/gpuwheel-absolute.txt"), "absolute path"),
    (link_member("demo-1.0/etc", "../../../etc"), "outside the destination"),
    (link_member("demo-1.0/passwd", "/etc/passwd"), "absolute path"),
    (link_member("demo-1.0/hard", "../../outside", kind=tarfile.LNKTYPE), "outside the destination"),
    (link_member("demo-1.0/tty", "", kind=tarfile.CHRTYPE), "special file"),
], ids=["dotdot", "absolute", "symlink-escape", "absolute-symlink", "hardlink-escape", "device"])
def test_unsafe_tar_member_is_refused_before_anything_is_extracted(
        gpuwheel, make_recipe, cache, http_server, tmp_path, member, why):
    hostile = tarball([file_member("demo-1.0/setup.py"), member])
    server = http_server({"demo-1.0.tar.gz": hostile})
    result = gpuwheel("fetch", _url_recipe(make_recipe, tmp_path, server.url("demo-1.0.tar.gz"), sha256(hostile)))
    assert result.exit_code == 4, result.stderr
    assert "demo 1.0: demo-1.0.tar.gz holds an unsafe member: " in result.stderr
    assert why in result.stderr and "refused, nothing extracted" in result.stderr
    # The verified archive is dropped too: an archive that cannot be extracted safely is kept nowhere.
    assert stored(cache) == [] and leftovers(cache) == []
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/gpuwheel-absolute.txt").exists()


@pytest.mark.parametrize("name, why", [("demo-1.0/../../escaped.txt", "leaves the tree (..)"),
                                       ("/abs.txt", "is an absolute path")])
def test_unsafe_zip_member_is_refused(gpuwheel, make_recipe, cache, http_server, name, why, tmp_path):
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("demo-1.0/setup.py", "print()\n")
        zf.writestr(name, "x")
    data = out.getvalue()
    server = http_server({"demo-1.0.zip": data})
    result = gpuwheel("fetch", _url_recipe(make_recipe, tmp_path, server.url("demo-1.0.zip"), sha256(data)))
    assert result.exit_code == 4
    assert f"demo-1.0.zip holds an unsafe member: '{name}' {why}; refused, nothing extracted" in result.stderr
    assert stored(cache) == [] and leftovers(cache) == []


def test_archive_altered_in_the_cache_is_removed_with_its_tree(gpuwheel, make_recipe, cache, http_server, tmp_path):
    server = http_server({"demo-1.0.tar.gz": GOOD})
    recipe = _url_recipe(make_recipe, tmp_path, server.url("demo-1.0.tar.gz"), sha256(GOOD))
    archive = Path(gpuwheel("fetch", recipe, "--json").json()["packages"][0]["archive"])
    archive.write_bytes(archive.read_bytes() + b"tampered")

    result = gpuwheel("fetch", recipe, "--offline")
    assert result.exit_code == 4
    assert "demo 1.0: cached demo-1.0.tar.gz was altered" in result.stderr
    assert "removed it and its tree (run the fetch again)" in result.stderr
    assert stored(cache) == [] and leftovers(cache) == []
    assert gpuwheel("fetch", recipe).exit_code == 0  # online, it comes back clean


# ---- offline --------------------------------------------------------------------------------------
def test_offline_fetch_of_a_missing_source_names_it_and_the_command_that_fetches_it(
        gpuwheel, make_recipe, cache, monkeypatch, tmp_path):
    recipe = _url_recipe(make_recipe, tmp_path, "http://127.0.0.1:9/demo-1.0.tar.gz", sha256(GOOD))
    for args in (("--offline",), ()):
        if not args:
            monkeypatch.setenv("GPUWHEEL_OFFLINE", "1")
        result = gpuwheel("fetch", recipe, *args)
        assert result.exit_code == 5
        assert f"demo 1.0: demo-1.0.tar.gz (sha256 {sha256(GOOD)[:12]}…) is not in the cache" in result.stderr
        assert f"(run `gpuwheel fetch {recipe}` on a connected machine and copy its" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert stored(cache) == [] and leftovers(cache) == []


# ---- git ------------------------------------------------------------------------------------------
def _git_recipe(make_recipe, directory: Path, url: str, commit: str) -> Path:
    return make_recipe(directory, package=[demo_package({"git": url, "commit": commit})])



def test_git_source_is_checked_out_at_its_commit_with_submodules_at_theirs(
        gpuwheel, make_recipe, cache, tmp_path):
    repos = make_repos(tmp_path / "repos")
    recipe = _git_recipe(make_recipe, tmp_path, repos["project"], repos["project_v1"])

    result = gpuwheel("fetch", recipe, "--json")
    assert result.exit_code == 0, result.stderr
    package = result.json()["packages"][0]
    tree = Path(package["tree"])
    assert tree == cache / "sources" / "git" / repos["project_v1"]
    assert git("rev-parse", "HEAD", cwd=tree) == repos["project_v1"]
    assert (tree / "setup.py").read_text() == "print('demo')\n"  # v1, not the branch tip
    assert (tree / "third_party/lib/kernel.cu").read_text() == "// lib v1\n"  # the recorded submodule commit
    assert gpuwheel("fetch", recipe, "--offline", "--json").json()["packages"][0]["status"] == "cached"
    assert leftovers(cache) == []


def test_git_commit_that_does_not_exist_is_refused(gpuwheel, make_recipe, cache, tmp_path):
    repos = make_repos(tmp_path / "repos")
    result = gpuwheel("fetch", _git_recipe(make_recipe, tmp_path, repos["project"], "0123456789" * 4))
    assert result.exit_code == 4
    assert f"demo 1.0: {repos['project']} has no commit or tag {'0123456789' * 4}" in result.stderr
    assert stored(cache) == [] and leftovers(cache) == []


def test_offline_git_source_missing_from_the_cache(gpuwheel, make_recipe, cache, tmp_path):
    repos = make_repos(tmp_path / "repos")
    result = gpuwheel("fetch", _git_recipe(make_recipe, tmp_path, repos["project"], repos["project_v1"]), "--offline")
    assert result.exit_code == 5
    assert f"demo 1.0: git {repos['project']} @ {repos['project_v1']} is not in the cache" in result.stderr
    assert stored(cache) == [] and leftovers(cache) == []


# ---- build-time dependencies ----------------------------------------------------------------------
def _deps_recipe(make_recipe, tmp_path: Path, dependencies: list[dict]) -> Path:
    """The demo project from the folder demo-src/, with these [[package.dependency]] entries."""
    (tmp_path / "demo-src").mkdir(exist_ok=True)
    (tmp_path / "demo-src" / "setup.py").write_text("print('demo')\n")
    return make_recipe(tmp_path, package=[demo_package({"path": "demo-src"}, dependency=dependencies)])


UNREACHABLE_DEP = {"name": "faraway", "git": "https://gpuwheel-test.invalid/faraway.git", "rev": "v9.9",
                   "src_dir_env": "FARAWAY_SRC_DIR"}


def test_dependencies_are_fetched_by_tag_and_unreachable_ones_reported_with_their_command(
        gpuwheel, make_recipe, cache, tmp_path):
    repos = make_repos(tmp_path / "repos")
    recipe = _deps_recipe(make_recipe, tmp_path, [
        {"name": "lib", "git": repos["lib"], "rev": "v1.0", "src_dir_env": "LIB_SRC_DIR"}, UNREACHABLE_DEP])

    result = gpuwheel("fetch", recipe, "--json")
    assert result.exit_code == 0, result.stderr
    lib, faraway = result.json()["packages"][0]["dependencies"]
    assert (lib["status"], lib["commit"]) == ("fetched", repos["lib_v1"])
    assert (Path(lib["tree"]) / "kernel.cu").read_text() == "// lib v1\n"
    assert faraway["status"] == "needs network" and faraway["tree"] is None
    assert faraway["fetch_command"] == ("git clone https://gpuwheel-test.invalid/faraway.git deps/faraway && "
                                        "git -C deps/faraway checkout v9.9 && "
                                        "git -C deps/faraway submodule update --init --recursive")

    table = gpuwheel("fetch", recipe, "--offline")  # the tag resolves from the cache, offline
    assert table.exit_code == 0
    assert "1 dependencies need network" in table.stderr
    assert f"gpuwheel fetch {recipe} --dependency-dir deps" in table.stderr.replace("\n", "")

    strict = gpuwheel("fetch", recipe, "--offline", "--strict")
    assert strict.exit_code == 4
    assert "gpuwheel: error: 1 dependencies need network: demo/faraway" in strict.stderr
    assert leftovers(cache) == []


def test_dependency_dir_imports_verified_checkouts(gpuwheel, make_recipe, cache, tmp_path):
    repos = make_repos(tmp_path / "repos")
    recipe = _deps_recipe(make_recipe, tmp_path, [
        {"name": "project", "git": "https://gpuwheel-test.invalid/project.git", "rev": repos["project_v1"],
         "src_dir_env": "PROJECT_SRC_DIR"}])
    deps = tmp_path / "deps"
    deps.mkdir()
    checkout = deps / "project"
    git("clone", "-q", repos["project"], str(checkout), cwd=tmp_path)  # at the tip: not the pin

    wrong = gpuwheel("fetch", recipe, "--offline", "--dependency-dir", deps)
    assert wrong.exit_code == 4
    assert f"demo 1.0 dependency project: {checkout} is at " in wrong.stderr
    assert f", {repos['project_v1']} is {repos['project_v1'][:12]}; refused" in wrong.stderr

    git("checkout", "-q", repos["project_v1"], cwd=checkout)
    unsynced = gpuwheel("fetch", recipe, "--offline", "--dependency-dir", deps)
    assert unsynced.exit_code == 4
    assert "submodule third_party/lib is not at its pinned commit" in unsynced.stderr

    git("submodule", "update", "--init", "--recursive", "-q", cwd=checkout)
    (checkout / "setup.py").write_text("print('edited')\n")
    edited = gpuwheel("fetch", recipe, "--offline", "--dependency-dir", deps)
    assert edited.exit_code == 4 and "has local changes (M setup.py); refused" in edited.stderr

    git("checkout", "-q", "setup.py", cwd=checkout)
    imported = gpuwheel("fetch", recipe, "--offline", "--dependency-dir", deps, "--json")
    assert imported.exit_code == 0, imported.stderr
    dep = imported.json()["packages"][0]["dependencies"][0]
    assert dep["status"] == "imported"
    assert (Path(dep["tree"]) / "third_party/lib/kernel.cu").read_text() == "// lib v1\n"
    later = gpuwheel("fetch", recipe, "--offline", "--json").json()["packages"][0]["dependencies"][0]
    assert later["status"] == "cached"
    assert leftovers(cache) == []


def test_dependency_dir_refuses_a_tree_that_is_not_a_git_checkout(gpuwheel, make_recipe, cache, tmp_path):
    recipe = _deps_recipe(make_recipe, tmp_path, [UNREACHABLE_DEP])
    (tmp_path / "deps" / "faraway").mkdir(parents=True)
    result = gpuwheel("fetch", recipe, "--dependency-dir", tmp_path / "deps")
    assert result.exit_code == 4
    assert (f"demo 1.0 dependency faraway: {tmp_path / 'deps' / 'faraway'} is not a git checkout, so its commit "
            f"cannot be verified (bring it as: git clone") in result.stderr
    assert stored(cache) == [] and leftovers(cache) == []


# ---- sdists from a package index ------------------------------------------------------------------
@pytest.fixture
def local_index(pypi_server):
    """A real pypiserver on 127.0.0.1 serving one hand-made sdist (PEP 503 HTML pages): its simple URL
    and the sdist's bytes."""
    sdist = tarball([file_member("demo_pkg-1.0/setup.py", b"print('from the index')\n")])
    server = pypi_server(open_uploads=True)
    (server.packages / "demo_pkg-1.0.tar.gz").write_bytes(sdist)
    return f"{server.url}simple/", sdist


def test_sdist_comes_from_the_index_pip_is_configured_with(gpuwheel, make_recipe, cache, local_index,
                                                            monkeypatch, tmp_path):
    index, sdist = local_index
    monkeypatch.setenv("PIP_INDEX_URL", index)  # pip's own setting; the recipe names no index
    recipe = make_recipe(tmp_path, package=[
        {"name": "demo-pkg", "version": "1.0", "source": {"sdist": "demo_pkg-1.0.tar.gz", "sha256": sha256(sdist)}}])
    result = gpuwheel("fetch", recipe, "--json")
    assert result.exit_code == 0, result.stderr
    assert (Path(result.json()["packages"][0]["tree"]) / "setup.py").read_text() == "print('from the index')\n"


def test_offline_extracts_a_copied_sdist_without_asking_the_index(gpuwheel, make_recipe, cache, local_index,
                                                                  monkeypatch, tmp_path):
    """An offline site copies only the archives (an sdist, not its 100 MB tree) and builds from them."""
    index, sdist = local_index
    monkeypatch.setenv("PIP_INDEX_URL", index)
    recipe = make_recipe(tmp_path, package=[
        {"name": "demo-pkg", "version": "1.0", "source": {"sdist": "demo_pkg-1.0.tar.gz", "sha256": sha256(sdist)}}])
    assert gpuwheel("fetch", recipe).exit_code == 0
    shutil.rmtree(cache / "sources" / "trees")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple/")  # no index answers now
    result = gpuwheel("fetch", recipe, "--offline", "--json")
    assert result.exit_code == 0, result.stderr
    package = result.json()["packages"][0]
    assert package["status"] == "cached"
    assert (Path(package["tree"]) / "setup.py").read_text() == "print('from the index')\n"
    assert leftovers(cache) == []


def test_sdist_the_index_lists_with_another_hash_is_refused(gpuwheel, make_recipe, cache, local_index, tmp_path):
    index, sdist = local_index
    recipe = make_recipe(tmp_path, package=[{"name": "demo-pkg", "version": "1.0", "source": {
        "sdist": "demo_pkg-1.0.tar.gz", "sha256": "ab" * 32, "index": index}}])
    result = gpuwheel("fetch", recipe)
    assert result.exit_code == 4
    assert (f"demo-pkg 1.0: index {index} lists demo_pkg-1.0.tar.gz with sha256 {sha256(sdist)}, the recipe "
            f"pins {'ab' * 32}; refused") in result.stderr
    assert stored(cache) == [] and leftovers(cache) == []


def test_sdist_missing_from_the_index_lists_what_is_there(gpuwheel, make_recipe, cache, local_index, tmp_path):
    index, _ = local_index
    recipe = make_recipe(tmp_path, package=[{"name": "demo-pkg", "version": "2.0", "source": {
        "sdist": "demo_pkg-2.0.tar.gz", "sha256": "ab" * 32, "index": index}}])
    result = gpuwheel("fetch", recipe)
    assert result.exit_code == 4
    assert f"demo-pkg 2.0: index {index} has no file demo_pkg-2.0.tar.gz (sdists there: 1.0)" in result.stderr


def test_real_flash_attn_sdist_from_pypi(gpuwheel, real_cache):
    """The shipped h100 recipe's flash-attn 2.8.3 sdist (8.4 MB), then offline from the cache."""
    result = gpuwheel("fetch", "h100", "--only", "flash-attn", "--json")
    assert result.exit_code == 0, result.stderr
    package = result.json()["packages"][0]
    assert package["sha256"] == FLASH_ATTN_SHA256
    tree = Path(package["tree"])
    assert tree.name == "flash_attn-2.8.3"
    assert '__version__ = "2.8.3"' in (tree / "flash_attn" / "__init__.py").read_text()
    assert (tree / "csrc" / "cutlass" / "include").is_dir()  # the sdist bundles cutlass
    offline = gpuwheel("fetch", "h100", "--only", "flash-attn", "--offline", "--json")
    assert offline.exit_code == 0 and offline.json()["packages"][0]["status"] == "cached"
    assert leftovers(real_cache) == []


def test_only_names_an_unknown_package(gpuwheel, real_cache):
    result = gpuwheel("fetch", "h100", "--only", "flash_attn", "--offline")
    assert result.exit_code == 2
    assert "--only flash_attn: the recipe has no package 'flash_attn' (did you mean 'flash-attn'?)" in result.stderr

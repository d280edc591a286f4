"""Hostile inputs, part three (issue 11): the tracebacks and misleading messages. Names and paths
holding rich markup are printed as written; a full disk says so; a refused read of an index says it
was refused; `patches check` and `build` agree about a patch through a symlink; no wheel with a
member outside its root is published, --force or not."""

from __future__ import annotations

import errno
import os
import re
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from publish_helpers import make_wheel
from sources_helpers import demo_package


def _flat(text: str) -> str:
    """Text without its white space: rich wraps long titles and cells at the table's width."""
    return "".join(text.split())


def _demo_recipe(make_recipe, tmp_path: Path, **more) -> Path:
    """A recipe building the local folder src/ (made empty if missing), plus `more` fields of the package."""
    (tmp_path / "src").mkdir(exist_ok=True)
    return make_recipe(tmp_path, package=[demo_package({"path": "src"}, **more)])


def _one_line(result, code: int, text: str) -> None:
    assert result.exit_code == code, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert text in result.stderr, result.stderr


@pytest.mark.parametrize("markup", ["[/x]", "[old]", "[bold]"])
def test_markup_in_paths_is_printed_as_written(gpuwheel, make_recipe, tmp_path, monkeypatch, markup):
    cache, wheels, index = tmp_path / f"cache{markup}", tmp_path / f"wheels{markup}", tmp_path / f"index{markup}"
    monkeypatch.setenv("GPUWHEEL_CACHE", str(cache))
    make_wheel(wheels, "demo")
    result = gpuwheel("publish", "h100", "--wheels", wheels, "--index-dir", index, "--force")
    assert result.exit_code == 0, result.stderr  # '[/x]' crashed here after the wheel was published
    assert _flat(f"published to {index}") in _flat(result.stdout)
    assert _flat(f"no smoke report ({wheels}/smoke.json does not exist)") in _flat(result.stderr)  # '[old]' vanished here

    result = gpuwheel("fetch", _demo_recipe(make_recipe, tmp_path))
    assert result.exit_code == 0, result.stderr
    assert _flat(f"sources ({cache}/sources)") in _flat(result.stdout)

    result = gpuwheel("cache", "list")
    assert result.exit_code == 0, result.stderr
    assert _flat(f"cache {cache}") in _flat(result.stdout)


def test_markup_in_a_wheels_own_record_is_shown_as_written(gpuwheel, tmp_path):
    # gpuwheel.json comes with the wheel, from whoever made it: its keys are text too.
    wheel = make_wheel(tmp_path, "demo", provenance={"target": "h100[/x]", "build": {"env": {"A[/x]": "[old]"}},
                                                     "toolchain": {"observed": {"nvcc[/x]": "12.8"}}})
    result = gpuwheel("show-wheel", wheel)
    assert result.exit_code == 0, result.stderr
    for text in ("h100[/x]", "A[/x]", "[old]", "toolchain nvcc[/x]"):
        assert text in result.stdout


def test_a_wheel_with_a_member_outside_its_root_is_never_published_even_forced(gpuwheel, cache, tmp_path):
    wheels, index = tmp_path / "wheels", tmp_path / "index"
    wheel = make_wheel(wheels, "demo")
    with zipfile.ZipFile(wheel, "a") as archive:
        archive.writestr("../../evil.py", "print('outside site-packages')\n")
    result = gpuwheel("publish", "h100", "--wheels", wheels, "--index-dir", index, "--force")
    _one_line(result, 10, f"{wheel}: member '../../evil.py' would land outside the install root (path traversal); "
                          "refused")
    assert not index.exists()


def test_a_full_disk_while_publishing_says_so_and_leaves_no_partial_wheel(gpuwheel, cache, tmp_path, monkeypatch):
    from gpuwheel import static_index as index_module

    wheels, index = tmp_path / "wheels", tmp_path / "index"
    make_wheel(wheels, "demo")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(index_module.os, "fsync", full)
    result = gpuwheel("publish", "h100", "--wheels", wheels, "--index-dir", index, "--force")
    _one_line(result, 15, "a write failed: No space left on device (free space in the cache")
    assert "TMPDIR" in result.stderr
    assert [p.name for p in (index / "files").iterdir()] == []  # nor a half-written .part


class _Refusing(BaseHTTPRequestHandler):
    """A private index that refuses every read without the right login."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(403, "Forbidden")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_refused_read_of_a_private_index_says_refused_not_no_index(gpuwheel, cache, tmp_path, monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        wheels = tmp_path / "wheels"
        make_wheel(wheels, "demo")
        monkeypatch.setenv("TWINE_USERNAME", "me")
        monkeypatch.setenv("TWINE_PASSWORD", "wrong")
        url = f"http://127.0.0.1:{server.server_port}/"
        result = gpuwheel("publish", "h100", "--wheels", wheels, "--repository", url, "--force")
    finally:
        server.shutdown()
        server.server_close()
    _one_line(result, 13, f"cannot read {url}simple/demo/: 403 Forbidden (check the username and password")
    assert "found no simple index" not in result.stderr


def test_patches_check_and_build_agree_on_a_patch_through_a_symlink(gpuwheel, make_recipe, cache, tmp_path):
    outside = tmp_path / "real.txt"
    outside.write_text("a\nb\n")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "link.txt").symlink_to(outside)
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "0001-link.patch").write_text("--- a/link.txt\n+++ b/link.txt\n@@ -1,2 +1,2 @@\n a\n-b\n+c\n")
    (patches / "series").write_text("0001-link.patch\n")
    recipe = _demo_recipe(make_recipe, tmp_path, patches="patches")
    result = gpuwheel("patches", "check", recipe)
    assert result.exit_code == 6, result.stderr  # it said "applied", and the build then failed on it
    refused = "link.txt is not a regular file (a symlink in the tree?): GNU patch refuses to patch through it"
    assert f"demo 0001-link.patch: {refused}" in result.stderr
    # The build's own step (it runs after the toolchain check, which this machine need not pass).
    from gpuwheel.errors import PatchError
    from gpuwheel.patches import prepare_trees
    from gpuwheel.plan import make_plan
    from gpuwheel.recipe import load_recipe
    from gpuwheel.sources import fetch_sources

    plan = make_plan(load_recipe(recipe))
    with pytest.raises(PatchError, match=re.escape(refused)):
        prepare_trees(plan, fetch_sources(plan, progress=False), cache / "trees")
    assert outside.read_text() == "a\nb\n"


def test_a_binary_series_file_is_named_not_a_traceback(gpuwheel, make_recipe, tmp_path):
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "series").write_bytes(b"\xa6\x00\xff binary")
    recipe = _demo_recipe(make_recipe, tmp_path, patches="patches")
    _one_line(gpuwheel("plan", recipe), 6, f"{patches / 'series'}: not a text file (byte 0 is not UTF-8)")


def test_a_full_disk_while_copying_a_tree_is_one_line(gpuwheel, make_recipe, cache, tmp_path, monkeypatch):
    import shutil

    from sources_helpers import git, make_repos

    repos = make_repos(tmp_path / "repos")
    recipe = _demo_recipe(make_recipe, tmp_path, dependency=[{
        "name": "lib", "git": "https://gpuwheel-test.invalid/lib.git", "rev": repos["lib_v1"],
        "src_dir_env": "LIB_SRC_DIR"}])
    deps = tmp_path / "deps"
    git("clone", "-q", repos["lib"], str(deps / "lib"), cwd=tmp_path)
    git("checkout", "-q", repos["lib_v1"], cwd=deps / "lib")

    def full(source, dest, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), dest)
    monkeypatch.setattr(shutil, "copyfile", full)  # under copytree's copy2: every file fails, as on a full disk
    result = gpuwheel("fetch", recipe, "--offline", "--dependency-dir", deps)
    _one_line(result, 15, f"copying {deps / 'lib'} to ")
    assert "failed: [Errno 28] No space left on device" in result.stderr and "more files)" in result.stderr
    assert not list((cache / "sources" / "git").iterdir())  # the half copy went with its temp dir


def test_a_full_temp_dir_while_auditing_is_not_a_corrupt_wheel(gpuwheel, tmp_path, monkeypatch):
    import subprocess

    from wheels_helpers import write_wheel
    from gpuwheel.audit import members

    (tmp_path / "f.c").write_text("int f(void) { return 1; }\n")
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(tmp_path / "libf.so"), str(tmp_path / "f.c")], check=True)
    wheel = write_wheel(tmp_path, "demo", "1.0", {"demo/libf.so": tmp_path / "libf.so"})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(members, "_inflate", full)  # the audit's readers are forked: they inherit it
    result = gpuwheel("audit", wheel, "--arch", "9.0")
    _one_line(result, 15, "a write failed: No space left on device")
    assert "corrupt" not in result.stderr


def test_contradictory_publish_options_are_a_usage_error(gpuwheel, tmp_path):
    wheels = tmp_path / "wheels"
    make_wheel(wheels, "demo")
    result = gpuwheel("publish", "h100", "--wheels", wheels, "--repository", "http://127.0.0.1:9/",
                      "--index-dir", tmp_path / "index")
    _one_line(result, 2, "give --repository or --index-dir, not both")
    _one_line(gpuwheel("publish", "h100", "--wheels", wheels, "--simple-url", "http://127.0.0.1:9/simple/"), 2,
              "--simple-url is for --repository")
    assert not (tmp_path / "index").exists()


def test_a_bug_says_so_and_exits_70(gpuwheel, tmp_path, monkeypatch):
    from gpuwheel import publish as publish_module

    def broken(*args, **kwargs):
        raise KeyError("a bug")
    monkeypatch.setattr(publish_module, "wheels_in", broken)
    result = gpuwheel("publish", "h100", "--wheels", tmp_path)
    assert result.exit_code == 70
    assert "Traceback" in result.stderr and "KeyError: 'a bug'" in result.stderr
    assert result.stderr.rstrip().endswith("gpuwheel: internal error: this is a bug in gpuwheel, not in your input; "
                                           "please report it with the traceback above")

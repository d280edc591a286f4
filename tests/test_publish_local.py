"""Publishing to the local static index: pip installs from it over file://, re-publishing is a
no-op, a different file under a published name is refused, concurrent publishers and a killed
publisher leave a whole index."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpuwheel.errors import PublishError
from gpuwheel.layout import target_paths
from gpuwheel.publish.local import publish_local
from gpuwheel.static_index import write_static_index
from publish_helpers import (TARGET, audit_record, fresh_venv, import_value, index_listing, leftovers, make_wheel,
                             passing_wheel, pip_install, sha256)



def test_published_target_installs_from_file_url(tmp_path: Path, publish_recipes: Path, gpuwheel_script):
    staging = target_paths(TARGET, tmp_path / "wheels").staging_dir
    passing_wheel(staging, "gw-alpha", value="alpha")
    passing_wheel(staging, "gw-beta", value="beta")

    result = gpuwheel_script.run("publish", TARGET, cwd=tmp_path, GPUWHEEL_RECIPES=publish_recipes)

    assert result.returncode == 0, result.stderr
    assert "published" in result.stdout
    index_dir = tmp_path / "wheels" / TARGET
    listed = index_listing(index_dir)
    assert sorted(listed) == ["gw_alpha-1.0-py3-none-any.whl", "gw_beta-1.0-py3-none-any.whl"]
    assert leftovers(index_dir) == []
    # The serving host runs the pip command the hint printed: this index beside PyPI, exact pins.
    [hint] = [line.strip() for line in result.stdout.splitlines() if line.strip().startswith("pip install")]
    assert hint == (f"pip install --extra-index-url {(index_dir / 'simple').absolute().as_uri()} "
                    "'gw-alpha==1.0' 'gw-beta==1.0'")
    python = fresh_venv(tmp_path / "venv")
    pip, install, *arguments = shlex.split(hint)
    installed = subprocess.run([sys.executable, "-m", pip, "--python", str(python), install, "--no-cache-dir",
                                *arguments], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    assert import_value(python, "gw_alpha") == "alpha"
    assert import_value(python, "gw_beta") == "beta"


def test_pages_carry_hashes_metadata_and_requires_python(tmp_path: Path):
    wheel = make_wheel(tmp_path / "in", "Gw_Gamma", "2.0")

    report = publish_local([wheel], tmp_path / "index")

    page = json.loads((tmp_path / "index/simple/gw-gamma/index.json").read_text())
    assert page["meta"]["api-version"] == "1.1"
    assert page["name"] == "gw-gamma" and page["versions"] == ["2.0"]
    [entry] = page["files"]
    assert entry["hashes"]["sha256"] == sha256(wheel) == report.wheels[0].sha256
    assert entry["requires-python"] == ">=3.8"
    assert entry["size"] == wheel.stat().st_size
    html = (tmp_path / "index/simple/gw-gamma/index.html").read_text()
    assert f'#sha256={sha256(wheel)}' in html and 'data-requires-python="&gt;=3.8"' in html
    assert "data-core-metadata=\"sha256=" in html
    root = json.loads((tmp_path / "index/simple/index.json").read_text())
    assert root["projects"] == [{"name": "gw-gamma"}]
    assert report.index_url == (tmp_path / "index/simple").absolute().as_uri()


def test_same_wheel_again_is_skipped(tmp_path: Path, publish_recipes: Path, gpuwheel_script):
    staging = target_paths(TARGET, tmp_path / "wheels").staging_dir
    wheel = passing_wheel(staging, "gw-alpha")
    assert gpuwheel_script.run("publish", TARGET, cwd=tmp_path, GPUWHEEL_RECIPES=publish_recipes).returncode == 0
    index_dir = tmp_path / "wheels" / TARGET
    before = os.readlink(index_dir / "simple")

    again = gpuwheel_script.run("publish", TARGET, "--json", cwd=tmp_path, GPUWHEEL_RECIPES=publish_recipes)

    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["wheels"] == [{"filename": wheel.name, "sha256": sha256(wheel), "action": "skipped",
                                 "warnings": []}]
    assert os.readlink(index_dir / "simple") == before  # nothing changed, nothing rewritten


def test_same_name_different_content_is_refused(tmp_path: Path):
    first = make_wheel(tmp_path / "a", "gw-alpha", value="first")
    second = make_wheel(tmp_path / "b", "gw-alpha", value="second")
    index_dir = tmp_path / "index"
    publish_local([first], index_dir)
    listing = index_listing(index_dir)

    with pytest.raises(PublishError) as refused:
        publish_local([make_wheel(tmp_path / "c", "gw-other"), second], index_dir)

    message = str(refused.value)
    assert "\n" not in message
    assert f"{second.name} is already in {index_dir} with sha256 {sha256(first)[:16]}" in message
    assert "never replaced" in message
    assert index_listing(index_dir) == listing  # gw-other was not published either
    assert leftovers(index_dir) == []


def test_refusal_through_the_cli_is_one_line_with_exit_13(tmp_path: Path, publish_recipes: Path, gpuwheel_script):
    index_dir = tmp_path / "index"
    publish_local([make_wheel(tmp_path / "a", "gw-alpha", value="first")], index_dir)
    changed = tmp_path / "b"
    passing_wheel(changed, "gw-alpha", value="second")

    result = gpuwheel_script.run("publish", TARGET, "--wheels", changed, "--index-dir", index_dir,
                                 GPUWHEEL_RECIPES=publish_recipes)

    assert result.returncode == 13
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("gpuwheel: error: gw_alpha-1.0-py3-none-any.whl is already in")


def test_eight_concurrent_publishers_leave_every_wheel_once(tmp_path: Path, publish_recipes: Path, gpuwheel_script):
    index_dir = tmp_path / "index"
    shared = make_wheel(tmp_path / "shared", "gw-shared", value="shared", provenance=audit_record())
    processes = []
    for number in range(8):
        directory = tmp_path / f"publisher{number}"
        directory.mkdir()
        (directory / shared.name).write_bytes(shared.read_bytes())  # every publisher also brings this one
        passing_wheel(directory, f"gw-p{number}", value=str(number))
        processes.append(gpuwheel_script.start("publish", TARGET, "--wheels", directory, "--index-dir", index_dir,
                                               "--json", GPUWHEEL_RECIPES=publish_recipes))

    outcomes = [(*p.communicate(timeout=300), p.returncode) for p in processes]

    assert all(code == 0 for _, _, code in outcomes), [err for _, err, _ in outcomes]
    actions = [w["action"] for out, _, _ in outcomes for w in json.loads(out)["wheels"]
               if w["filename"] == shared.name]
    assert sorted(actions) == ["published"] + ["skipped"] * 7
    listed = index_listing(index_dir)
    assert sorted(listed) == sorted([shared.name] + [f"gw_p{n}-1.0-py3-none-any.whl" for n in range(8)])
    assert leftovers(index_dir) == []
    python = fresh_venv(tmp_path / "venv")
    installed = pip_install(python, (index_dir / "simple").as_uri(), "gw-shared",
                            *[f"gw-p{n}" for n in range(8)])
    assert installed.returncode == 0, installed.stderr
    assert import_value(python, "gw_p7") == "7"


def test_publish_killed_mid_copy_leaves_the_index_valid(tmp_path: Path, publish_recipes: Path, gpuwheel_script):
    index_dir = tmp_path / "index"
    publish_local([make_wheel(tmp_path / "first", "gw-alpha", value="alpha")], index_dir)
    before = index_listing(index_dir)
    big = tmp_path / "big"
    passing_wheel(big, "gw-big", payload_bytes=300 << 20)
    process = gpuwheel_script.start("publish", TARGET, "--wheels", big, "--index-dir", index_dir,
                                    GPUWHEEL_RECIPES=publish_recipes)

    # SIGKILL the moment the wheel is being copied under its temp name
    while not any((index_dir / "files").glob(".gw_big*.part")):
        assert process.poll() is None, f"publish ended before it copied: {process.communicate()}"
        time.sleep(0.001)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()

    assert index_listing(index_dir) == before
    assert not (index_dir / "files" / "gw_big-1.0-py3-none-any.whl").exists()
    python = fresh_venv(tmp_path / "venv")
    installed = pip_install(python, (index_dir / "simple").as_uri(), "gw-alpha")
    assert installed.returncode == 0, installed.stderr
    # the next publish clears what the killed one left and completes
    retry = gpuwheel_script.run("publish", TARGET, "--wheels", big, "--index-dir", index_dir,
                                GPUWHEEL_RECIPES=publish_recipes)
    assert retry.returncode == 0, retry.stderr
    assert sorted(index_listing(index_dir)) == ["gw_alpha-1.0-py3-none-any.whl", "gw_big-1.0-py3-none-any.whl"]
    assert leftovers(index_dir) == []


def test_what_a_crash_mid_regeneration_leaves_is_cleared(tmp_path: Path):
    index_dir = tmp_path / "index"
    publish_local([make_wheel(tmp_path / "a", "gw-alpha")], index_dir)
    listing = index_listing(index_dir)
    # the state a process killed while writing the next generation leaves behind
    (index_dir / ".simple-tmp-999999" / "gw-alpha").mkdir(parents=True)
    (index_dir / ".simple-tmp-999999" / "gw-alpha" / "index.html").write_text("<html><a href=")
    os.symlink(".simple-tmp-999999", index_dir / ".simple-link-999999")
    (index_dir / "files" / ".gw_beta-1.0-py3-none-any.whl.999999.part").write_bytes(b"PK\x03\x04")
    (index_dir / "files" / "gw_beta-1.0-py3-none-any.whl.metadata").write_bytes(b"Name: gw-beta\n")
    assert index_listing(index_dir) == listing  # readers never see any of it

    url = write_static_index(index_dir)

    assert url == (index_dir / "simple").as_uri()
    assert index_listing(index_dir) == listing
    assert leftovers(index_dir) == []
    assert not (index_dir / "files" / "gw_beta-1.0-py3-none-any.whl.metadata").exists()


def test_write_static_index_lists_wheels_dropped_into_files(tmp_path: Path):
    index_dir = tmp_path / "index"
    wheel = make_wheel(index_dir / "files", "gw-dropped")

    write_static_index(index_dir)

    assert index_listing(index_dir) == {wheel.name: sha256(wheel)}


def test_a_directory_without_wheels_is_an_error(tmp_path: Path, publish_recipes: Path, gpuwheel_script):
    (tmp_path / "empty").mkdir()
    result = gpuwheel_script.run("publish", TARGET, "--wheels", tmp_path / "empty", "--index-dir", tmp_path / "index",
                                 GPUWHEEL_RECIPES=publish_recipes)
    assert result.returncode == 13
    assert result.stderr.strip().splitlines() == [f"gpuwheel: error: no wheels in {tmp_path / 'empty'} "
                                                  "(build the target first, or pass --wheels DIR)"]
    assert not (tmp_path / "index").exists()


def test_a_broken_wheel_is_refused_before_anything_is_written(tmp_path: Path, publish_recipes: Path, gpuwheel_script):
    directory = tmp_path / "in"
    passing_wheel(directory, "gw-alpha")
    (directory / "gw_broken-1.0-py3-none-any.whl").write_bytes(b"not a zip")
    result = gpuwheel_script.run("publish", TARGET, "--wheels", directory, "--index-dir", tmp_path / "index",
                                 "--force", GPUWHEEL_RECIPES=publish_recipes)
    assert result.returncode == 10
    assert "gw_broken-1.0-py3-none-any.whl: cannot read the wheel" in result.stderr
    assert not (tmp_path / "index").exists()


def test_served_over_http_pip_reads_the_json_pages(tmp_path: Path, static_index_server):
    index_dir = tmp_path / "index"
    publish_local([make_wheel(tmp_path / "in", "gw-alpha", value="over http")], index_dir)
    server = static_index_server(index_dir)
    python = fresh_venv(tmp_path / "venv")
    installed = pip_install(python, server.url + "simple/", "gw-alpha")
    assert installed.returncode == 0, installed.stderr
    assert server.served_json == ["/simple/gw-alpha/"]  # pip took the PEP 691 JSON page
    assert import_value(python, "gw_alpha") == "over http"


def test_a_simple_directory_made_by_hand_is_not_overwritten(tmp_path: Path):
    index_dir = tmp_path / "index"
    (index_dir / "simple").mkdir(parents=True)
    with pytest.raises(PublishError, match="simple is a directory gpuwheel did not make"):
        publish_local([make_wheel(tmp_path / "in", "gw-alpha")], index_dir)
    assert not any((index_dir / "files").iterdir())

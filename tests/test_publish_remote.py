"""Publishing to a remote index through twine, against a real pypiserver on loopback with htpasswd
auth: upload then pip install from it; the same file again is skipped; another file under a
published name is refused; a wrong password or a server refusal is one line without the password."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from gpuwheel.errors import PublishError
from gpuwheel.publish.local import publish_local
from gpuwheel.publish.remote import publish_remote
from publish_helpers import TARGET, fresh_venv, import_value, make_wheel, passing_wheel, pip_install, sha256


@pytest.fixture(scope="module")
def server(pypi_server):
    """One pypiserver with a login for uploads, shared by this module's tests."""
    return pypi_server()

def credentials(server, password: str | None = None) -> dict[str, str]:
    return {"TWINE_USERNAME": server.user, "TWINE_PASSWORD": password or server.password}


@pytest.fixture
def upload(server, publish_recipes: Path, gpuwheel_script):
    """`gpuwheel publish TARGET --wheels WHEELS --repository SERVER EXTRA...` with the server's login (or
    `password` instead of its own) in TWINE_*, in its own process."""
    def run(wheels: Path, *extra: str, password: str | None = None):
        return gpuwheel_script.run("publish", TARGET, "--wheels", wheels, "--repository", server.url, *extra,
                                   GPUWHEEL_RECIPES=publish_recipes, **credentials(server, password))
    return run


def test_upload_then_pip_install_from_the_server(tmp_path: Path, server, upload):
    wheel = passing_wheel(tmp_path / "in", "gw-remote-alpha", value="remote")

    result = upload(tmp_path / "in", "--json")

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["destination"] == server.url
    assert report["index_url"] == server.url + "simple/"
    assert report["wheels"] == [{"filename": wheel.name, "sha256": sha256(wheel), "action": "published",
                                 "warnings": []}]
    assert (server.packages / wheel.name).read_bytes() == wheel.read_bytes()
    python = fresh_venv(tmp_path / "venv")
    installed = pip_install(python, report["index_url"], "--no-deps", "gw-remote-alpha")
    assert installed.returncode == 0, installed.stderr
    assert import_value(python, "gw_remote_alpha") == "remote"


def test_same_wheel_again_is_skipped(tmp_path: Path, server, upload):
    wheel = passing_wheel(tmp_path / "in", "gw-remote-beta")
    assert upload(tmp_path / "in").returncode == 0

    again = upload(tmp_path / "in")

    assert again.returncode == 0, again.stderr
    assert "skipped: already there with the same sha256" in again.stdout
    assert (server.packages / wheel.name).read_bytes() == wheel.read_bytes()


def test_same_name_different_content_is_refused(tmp_path: Path, server, upload):
    first = passing_wheel(tmp_path / "a", "gw-remote-gamma", value="first")
    assert upload(tmp_path / "a").returncode == 0
    passing_wheel(tmp_path / "b", "gw-remote-gamma", value="second")

    result = upload(tmp_path / "b")

    assert result.returncode == 13
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"gpuwheel: error: {first.name} is already on {server.url} with sha256 "
                           f"{sha256(first)[:16]}")
    assert "never replaced" in line
    assert (server.packages / first.name).read_bytes() == first.read_bytes()


def test_wrong_password_is_one_clear_line_without_the_password(tmp_path: Path, server,
                                                               upload):
    wheel = passing_wheel(tmp_path / "in", "gw-remote-delta")
    wrong = "Sup3r-Secret-Wrong-Pw"

    result = upload(tmp_path / "in", password=wrong)

    assert result.returncode == 13
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"gpuwheel: error: {server.url} refused {wheel.name}: 403 Forbidden")
    assert "TWINE_PASSWORD" in line  # the hint says where the password comes from
    assert wrong not in result.stdout + result.stderr
    assert not (server.packages / wheel.name).exists()


def test_pypirc_section_names_the_repository(tmp_path: Path, server, publish_recipes: Path, gpuwheel_script):
    wheel = passing_wheel(tmp_path / "in", "gw-remote-epsilon")
    pypirc = tmp_path / "pypirc"
    pypirc.write_text(f"[distutils]\nindex-servers = internal\n\n[internal]\nrepository = {server.url}\n"
                      f"username = {server.user}\npassword = {server.password}\n")

    result = gpuwheel_script.run("publish", TARGET, "--wheels", tmp_path / "in", "--repository", "internal",
                                 "--config-file", pypirc, GPUWHEEL_RECIPES=publish_recipes)

    assert result.returncode == 0, result.stderr
    assert server.password not in result.stdout + result.stderr
    assert (server.packages / wheel.name).is_file()


def test_no_credentials_is_a_clear_error(tmp_path: Path, server, publish_recipes: Path, gpuwheel_script):
    passing_wheel(tmp_path / "in", "gw-remote-zeta")
    result = gpuwheel_script.run("publish", TARGET, "--wheels", tmp_path / "in", "--repository", server.url,
                                 "--config-file", tmp_path / "missing-pypirc", GPUWHEEL_RECIPES=publish_recipes,
                                 PYTHON_KEYRING_BACKEND="keyring.backends.null.Keyring")
    assert result.returncode == 13
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"gpuwheel: error: cannot use repository {server.url}: Credential not found for ")
    assert "TWINE_USERNAME" in line


def test_server_refusal_is_reported_with_the_servers_reason(tmp_path: Path, server,
                                                           monkeypatch: pytest.MonkeyPatch):
    wheel = make_wheel(tmp_path / "in", "gw-remote-eta")
    requests.post(server.url, auth=(server.user, server.password), files={"content": wheel.open("rb")},
                  data={":action": "file_upload"}).raise_for_status()
    monkeypatch.setenv("TWINE_USERNAME", server.user)
    monkeypatch.setenv("TWINE_PASSWORD", server.password)

    # a simple URL that lists nothing makes gpuwheel try the upload, and the server refuse it
    with pytest.raises(PublishError) as refused:
        publish_remote([wheel], server.url, simple_url=f"{server.url}nothing-here/")

    message = str(refused.value)
    assert message.startswith(f"{server.url} refused {wheel.name}: 400 Bad Request: Package "
                              f"'{wheel.name}' already exists!")
    assert "\n" not in message and server.password not in message


def test_pep691_json_simple_pages_are_read_for_the_check(tmp_path: Path, server,
                                                         monkeypatch: pytest.MonkeyPatch, static_index_server):
    wheel = make_wheel(tmp_path / "a", "gw-remote-theta", value="first")
    publish_local([wheel], tmp_path / "index")
    static = static_index_server(tmp_path / "index")
    monkeypatch.setenv("TWINE_USERNAME", server.user)
    monkeypatch.setenv("TWINE_PASSWORD", server.password)
    same = publish_remote([wheel], server.url, simple_url=static.url + "simple/")
    with pytest.raises(PublishError, match=f"{wheel.name} is already on {server.url} with sha256"):
        publish_remote([make_wheel(tmp_path / "b", "gw-remote-theta", value="second")], server.url,
                       simple_url=static.url + "simple/")
    assert [w.action for w in same.wheels] == ["skipped"]
    assert static.served_json == ["/simple/gw-remote-theta/"] * 2
    assert not (server.packages / wheel.name).exists()  # nothing was uploaded


def test_open_index_listing_only_md5(tmp_path: Path, publish_recipes: Path, gpuwheel_script, pypi_server):
    """An index without login (empty credentials) whose pages carry md5: the file is downloaded and
    hashed to decide."""
    server = pypi_server(open_uploads=True, hash_algo="md5")
    env = {"GPUWHEEL_RECIPES": publish_recipes, "TWINE_USERNAME": "", "TWINE_PASSWORD": ""}
    passing_wheel(tmp_path / "a", "gw-open", value="first")
    args = ["publish", TARGET, "--repository", server.url, "--wheels"]
    assert gpuwheel_script.run(*args, tmp_path / "a", **env).returncode == 0
    assert "#md5=" in requests.get(server.url + "simple/gw-open/").text
    again = gpuwheel_script.run(*args, tmp_path / "a", **env)
    passing_wheel(tmp_path / "b", "gw-open", value="second")
    changed = gpuwheel_script.run(*args, tmp_path / "b", **env)
    assert again.returncode == 0 and "skipped" in again.stdout, again.stderr
    assert changed.returncode == 13 and "is already on" in changed.stderr

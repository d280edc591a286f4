"""The toolchain venv, made with uv or with pip: either takes its packages from where pip's
configuration says (uv does not read pip.conf or PIP_*, so gpuwheel hands that over), and both make
a venv the build can run `python -m pip wheel` in."""

from __future__ import annotations

import ensurepip
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from gpuwheel.backends.local import LocalBackend
from gpuwheel.backends.venv import find_uv, parse_pip_config, uv_settings
from gpuwheel.errors import ToolchainError
from publish_helpers import import_value, make_wheel

# What `pip config list` printed on a machine with a config file, a user file and PIP_* variables.
PIP_CONFIG_LIST = """\
global.cert='/etc/ssl/certs/ca-certificates.crt'
global.extra-index-url='file:///opt/pypi/simple https://mirror.example/whl/cu128'
global.find-links='/opt/wheels'
install.find-links='/srv/install-wheels'
global.timeout='60'
:env:.find-links='/opt/env-wheels'
:env:.default-timeout='180'
"""


def test_pip_config_list_is_read_with_pips_precedence():
    config = parse_pip_config(PIP_CONFIG_LIST + "not a setting\nglobal.broken='unterminated\n")
    assert config == {"cert": "/etc/ssl/certs/ca-certificates.crt",
                      "extra-index-url": "file:///opt/pypi/simple https://mirror.example/whl/cu128",
                      "find-links": "/opt/env-wheels",  # PIP_FIND_LINKS over [install] over [global]
                      "timeout": "60", "default-timeout": "180"}


def test_pips_indexes_become_uvs_unless_uv_is_configured_itself():
    config = parse_pip_config(PIP_CONFIG_LIST + "global.constraint='/etc/caps.txt'\n")
    args, env = uv_settings(config, {"PATH": "/usr/bin"})
    assert args == ["--index", "file:///opt/pypi/simple", "--index", "https://mirror.example/whl/cu128",
                    "--find-links", "/opt/env-wheels", "--constraint", "/etc/caps.txt",
                    "--index-strategy", "unsafe-best-match"]
    assert env == {"PATH": "/usr/bin", "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt"}

    mine = {"UV_INDEX": "https://uv.example/simple"}
    assert uv_settings(config, mine) == ([], mine)  # the user's uv configuration stays in charge
    assert uv_settings(None, {})[0] == []  # no pip anywhere: nothing to hand over
    no_index = uv_settings({"no-index": "true", "find-links": "/w"}, {"UV_INDEX_STRATEGY": "first-index"})[0]
    assert no_index == ["--find-links", "/w", "--no-index"]


@pytest.fixture
def pip_configured_find_links(tmp_path, monkeypatch) -> Path:
    """A pip configuration (a file, as a user writes one) whose only package source is a folder holding
    a demo package and pip; the machine's own PIP_* settings are set aside."""
    bundled = sorted(Path(ensurepip.__file__).parent.glob("_bundled/pip-*.whl")) \
        or sorted(Path("/usr/share/python-wheels").glob("pip-*.whl"))
    if not bundled:
        pytest.skip("no pip wheel bundled with this Python's ensurepip")
    links = tmp_path / "links"
    make_wheel(links, "gpuwheel-venv-demo", value="from-pips-find-links")
    shutil.copy(bundled[-1], links)
    conf = tmp_path / "pip.conf"
    conf.write_text(f"[global]\nno-index = true\nfind-links = {links}\n")
    for name in [n for n in os.environ if n.startswith(("PIP_", "UV_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    monkeypatch.setenv("UV_CACHE_DIR", str(tmp_path / "uv-cache"))
    return links


@pytest.mark.parametrize("installer", ["uv", "pip"])
def test_both_installers_take_packages_from_pips_configuration(installer, pip_configured_find_links, tmp_path):
    if installer == "uv" and find_uv() is None:
        pytest.skip("no uv on PATH or beside this interpreter (pip install uv)")
    venv = tmp_path / "toolchains" / "local-demo"
    venv.parent.mkdir()
    LocalBackend(installer=installer)._make_venv(venv, Path(os.path.realpath(shutil.which("python3"))),
                                                 ("gpuwheel-venv-demo==1.0",))
    python = venv / "bin" / "python"
    assert import_value(python, "gpuwheel_venv_demo") == "from-pips-find-links"
    assert subprocess.run([python, "-m", "pip", "--version"], capture_output=True).returncode == 0  # the build's pip
    log = (venv.parent / "local-demo.log").read_text()
    assert ("Resolved " if installer == "uv" else "Successfully installed") in log
    assert (venv / ".complete").is_file()


@pytest.mark.parametrize("installer", ["uv", "pip"])
def test_a_missing_torch_variant_names_the_index_to_add(installer, pip_configured_find_links, tmp_path):
    if installer == "uv" and find_uv() is None:
        pytest.skip("no uv on PATH or beside this interpreter (pip install uv)")
    venv = tmp_path / "local-cu128"
    with pytest.raises(ToolchainError) as raised:
        LocalBackend(installer=installer)._make_venv(venv, Path(os.path.realpath(shutil.which("python3"))),
                                                     ("torch==2.11.0+cu128",))
    hint = raised.value.hint
    assert "torch's cu128 build is on PyTorch's own index" in hint and "extra-index-url" in hint
    assert ("UV_INDEX" in hint) == (installer == "uv")
    assert "\n" not in str(raised.value) and not venv.exists()

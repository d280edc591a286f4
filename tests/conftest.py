"""Shared test helpers: run the real CLI in-process and write user recipes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from gpuwheel.cli import main
from gpuwheel.shipped import CHECKOUT

# subprocess_report: a fixture's failing command shows its stderr; pytester: tests of that plugin.
pytest_plugins = ["subprocess_report", "pytester"]


class CliResult:
    def __init__(self, result):
        self.exit_code = result.exit_code
        self.stdout = result.stdout
        self.stderr = result.stderr
        self.exception = result.exception

    def json(self):
        return json.loads(self.stdout)


@pytest.fixture
def gpuwheel():
    """Call `gpuwheel ARGS...` as a user would; returns exit code, stdout and stderr."""
    def call(*args: str) -> CliResult:
        result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        return CliResult(result)
    return call


@pytest.fixture
def write_recipe(tmp_path: Path):
    """Write a user recipe (dedented TOML) and return its path."""
    def write(text: str, name: str = "recipe.toml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
        return path
    return write


@pytest.fixture(scope="session")
def dist(tmp_path_factory) -> dict[str, Path]:
    """gpuwheel's sdist, and its wheel built from that sdist, as `python -m build` makes them."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(CHECKOUT)], check=True,
                   capture_output=True, text=True, timeout=900)
    (wheel,) = out.glob("gpuwheel-*.whl")
    (sdist,) = out.glob("gpuwheel-*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}

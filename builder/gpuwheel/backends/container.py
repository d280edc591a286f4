"""The container backend: a toolchain image rendered from the recipe's pins, one container per package,
on docker or podman alike (backends/engine.py is the one interface to both).

dockerfiles/toolchain.Dockerfile is rendered with the base image's ID, Python, torch and (where the
base image has no CUDA toolkit) the pinned PyPI CUDA wheels, and tagged by the hash of the text: the
same pins on the same base image reuse the same image. Each package builds in a container with its
sources mounted read-only (copied inside to the canonical paths, which sccache keys on), the network
off, the output and compile-cache directories mounted; the build procedure (procedure.py) runs its
commands in it one by one, as the local backend runs them on this machine.

With --dist the container shares the host's network instead (the scheduler and every build server it
hands out must be reachable at the addresses the host reaches them by), and the sccache server inside
packs the image's own compilers for the servers. The client configuration, token included, enters as
an environment variable of the one command that writes it to RAM (/dev/shm) for the sccache server's
start; the file is removed before the build command runs (docs/dist.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, nullcontext, suppress
from pathlib import Path

from gpuwheel import facts
from gpuwheel.backends.base import (
    PROBE_SCRIPT,
    BuildOutcome,
    BuildToolchain,
    PackageBuild,
    Ran,
    ToolchainInfo,
    check_toolchain,
    parse_nvcc_version,
    toolchain_requirements,
)
from gpuwheel.backends.dist import Cluster
from gpuwheel.backends.engine import ContainerEngine, Image, Mount
from gpuwheel.backends.procedure import BuildLog, build_package
from gpuwheel.backends.progress import BuildProgress
from gpuwheel.cache import cache_root
from gpuwheel.errors import DistConfigError, ToolchainError
from gpuwheel.lock import Lock
from gpuwheel.recipe import Toolchain
from gpuwheel.shipped import shipped

TEMPLATE = shipped("dockerfiles") / "toolchain.Dockerfile"
IMAGE_REPOSITORY = "gpuwheel-toolchain"
# Where the container sees the host's folders: the package's tree and dependencies (read-only, staged
# from there to the canonical paths), the output folder and the compile cache.
SRC, DEPS_SRC, OUT, CACHE = "/gpuwheel/src", "/gpuwheel/deps-src", "/gpuwheel/out", "/gpuwheel/cache"
DIST_CLIENT = "/gpuwheel/dist-client"  # --dist: the compilers sccache packed for the build servers, kept across builds
# --dist: the variable that hands the client configuration (the token) to the one command writing it to RAM.
DIST_CONF_VARIABLE = "GPUWHEEL_SCCACHE_CONF"
PROBE_COMMAND = 'python -c "$0"; nvcc --version; c++ --version | head -n1; sccache --version'
# The lines of an image build worth a line of their own off a terminal: docker's and podman's steps, and
# pip's two in the long one (its downloads take minutes before it installs).
_IMAGE_STEP = re.compile(r"^(Step|STEP) \d+/\d+|^Installing collected packages|^Successfully installed")


class _Template(string.Template):
    delimiter = "@"  # the Dockerfile's own $VARIABLES stay as they are


# Where a locked build's hash-checking requirements file sits in the image (beside pip.conf).
LOCKED_REQUIREMENTS = "requirements.txt"


def render_dockerfile(toolchain: Toolchain, *, base_image: str, cuda_from_pypi: bool, lock: Lock | None = None) -> str:
    """The toolchain image's Dockerfile; with a lock, pip installs the locked files by hash and nothing else."""
    python = facts.major_minor(toolchain.python)
    cuda = facts.major_minor(toolchain.cuda)
    requirements = toolchain_requirements(toolchain, cuda_from_pypi=cuda_from_pypi)
    if cuda_from_pypi:
        layout = facts.CUDA_PYPI_TOOLCHAIN[cuda][1]
        cuda_home = f"/opt/toolchain/lib/python{python}/site-packages/{layout}"
        link = (
            f"cd {cuda_home}/lib && ln -sf $(ls libcudart.so.* | head -n1) libcudart.so "
            f"&& ln -sfn lib {cuda_home}/lib64"
        )
    else:
        cuda_home, link = "/usr/local/cuda", "true"
    template = TEMPLATE.read_text(encoding="utf-8")
    install = " ".join(f"'{r}'" for r in requirements)
    if lock is not None:
        lock.check_requirements(requirements)
        # The file's digest is in the text, so the image tag (a hash of the text) follows the lock.
        template = template.replace(
            "COPY pip.conf ca.crt /opt/gpuwheel/",
            f"COPY pip.conf ca.crt {LOCKED_REQUIREMENTS} /opt/gpuwheel/\nLABEL gpuwheel.lock={lock.environment_key}",
        )
        install = f"--require-hashes --no-deps -r /opt/gpuwheel/{LOCKED_REQUIREMENTS}"
    text = _Template(template).substitute(
        BASE_IMAGE=base_image, PYTHON=python, REQUIREMENTS=install, CUDA_HOME=cuda_home, LINK_CUDA=link, KEY="@KEY"
    )
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    return text.replace("@KEY", key)


class ContainerBackend:
    name = "container"

    def __init__(
        self,
        engine: ContainerEngine,
        *,
        base_image: str | None = None,
        lock: Lock | None = None,
        cluster: Cluster | None = None,
    ):
        self.engine = engine  # open: the caller holds it for as long as this backend builds
        self.base_image = base_image  # overrides the recipe's [toolchain] base_image
        self.lock = lock  # `build --locked`: the image's venv is installed from the lock's hashes
        self.cluster = cluster  # an sccache-dist cluster the compiles go to (build --dist), checked already

    # ---- toolchain image ----------------------------------------------------------------------
    def prepare(self, toolchain: Toolchain, *, recipe_name: str) -> BuildToolchain:
        base_name = self.base_image or toolchain.base_image
        if not base_name:
            raise ToolchainError(
                f"{recipe_name} names no [toolchain] base_image",
                hint="set one, or pass --base-image (e.g. one made by `gpuwheel toolchain base-image`)",
            )
        base = self.engine.find_image(base_name) or self._pull(base_name)
        if (
            toolchain.base_image_digest
            and not self.base_image
            and not _matches_digest(base, toolchain.base_image_digest)
        ):
            raise ToolchainError(
                f"base image {base_name} is {base.id}, {recipe_name} pins base_image_digest = "
                f"{toolchain.base_image_digest}",
                hint="pull the pinned image, or update the digest",
            )
        cuda = facts.major_minor(toolchain.cuda)
        image_has_cuda = any(e.startswith("CUDA_VERSION=") for e in base.env)
        if not image_has_cuda and cuda not in facts.CUDA_PYPI_TOOLCHAIN:
            raise ToolchainError(
                f"base image {base_name} has no CUDA toolkit and CUDA {cuda} has no complete toolkit on PyPI",
                hint=f"use a nvidia/cuda:{toolchain.cuda}-devel base image (--base-image)",
            )
        dockerfile = render_dockerfile(toolchain, base_image=base.id, cuda_from_pypi=not image_has_cuda, lock=self.lock)
        tag = f"{IMAGE_REPOSITORY}:{hashlib.sha256(dockerfile.encode()).hexdigest()[:16]}"
        image = self.engine.find_image(tag) or self._build_image(dockerfile, tag)
        info = self._observe(image, base)
        check_toolchain(
            info,
            toolchain,
            recipe_name=recipe_name,
            fix_cuda=f"use a base image with CUDA {cuda} (--base-image), or one without a toolkit "
            f"(the CUDA 13 toolkit then comes from PyPI)",
            fix_torch=f"remove image {tag} so gpuwheel rebuilds it",
        )
        if self.cluster and info.sccache is None:
            raise DistConfigError(
                f"--dist {self.cluster}: no sccache in image {image.ref} to send compiles to the cluster",
                hint=f"remove image {image.ref} so gpuwheel rebuilds it with sccache",
            )
        # The image's PATH and CUDA_HOME are the engine's to add; it compiles at the canonical paths.
        return BuildToolchain(info, python="python", sccache="sccache" if info.sccache else None, env={})

    def _pull(self, name: str) -> Image:
        BuildProgress().say(f"base image {name} is not in {self.engine.description}: pulling it")
        return self.engine.pull(
            name,
            hint="where no registry is reachable, make a base image with `gpuwheel toolchain "
            "base-image` and pass --base-image gpuwheel-base:bookworm",
        )

    def _build_image(self, dockerfile: str, tag: str) -> Image:
        log_path = cache_root() / "logs" / "images" / f"{tag.replace(':', '-')}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with (
            tempfile.TemporaryDirectory(prefix="gpuwheel-image-") as context,
            open(log_path, "w", encoding="utf-8") as log,
            BuildProgress().activity(
                f"toolchain image {tag}",
                milestones=_IMAGE_STEP,
                note=f"torch and the build tools from PyPI, on {self.engine.description}: "
                f"minutes, once; log: {log_path}",
            ) as show,
        ):
            (Path(context) / "Dockerfile").write_text(dockerfile, encoding="utf-8")
            _pip_settings(Path(context))
            if self.lock is not None:
                (Path(context) / LOCKED_REQUIREMENTS).write_text(self.lock.requirements_text, encoding="utf-8")

            def on_line(line: str) -> None:
                log.write(line + "\n")
                log.flush()  # followed with tail -f during a long image build
                show(line)

            return self.engine.build_image(Path(context), tag, on_line=on_line, hint=f"full output in {log_path}")

    def _observe(self, image: Image, base: Image) -> ToolchainInfo:
        """Run the probe once per image ID and keep its answer next to the cache."""
        record = cache_root() / "toolchains" / f"image-{image.id.split(':')[-1][:16]}.json"
        if record.is_file():
            probe = json.loads(record.read_text())
        else:
            BuildProgress().say(
                f"asking image {image.ref} what toolchain it holds (once per image; on vfs storage "
                f"a container takes a minute or more to start and to remove)"
            )
            lines: list[str] = []
            probed = self.engine.run(image, ["/bin/sh", "-c", PROBE_COMMAND, PROBE_SCRIPT], on_line=lines.append)
            if probed.code != 0:
                said = next((line for line in reversed(lines) if not line.startswith("gpuwheel: ")), "no output")
                raise ToolchainError(
                    f"the toolchain in image {image.ref} does not run (exit {probed.code}): {said}",
                    hint=f"remove image {image.ref} so gpuwheel rebuilds it",
                )
            probe = _parse_probe(lines)
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps(probe))
        return ToolchainInfo(
            backend=self.name,
            engine=self.engine.description,
            base_image=base.ref,
            base_image_digest=base.digest,
            base_image_id=base.id,
            image=image.ref,
            image_id=image.id,
            location=f"{self.engine.kind} at {self.engine.address}",
            **probe,
        )

    # ---- one package ----------------------------------------------------------------------------
    def build(self, toolchain: BuildToolchain, job: PackageBuild, on_line: Callable[[str], None]) -> BuildOutcome:
        packed = cache_root() / "compile" / "dist-client-container"
        with (
            BuildLog(job.log_path, on_line) as log,
            ContainerExecutor(
                self.engine, toolchain.info, job, log, packed_compilers=packed if self.cluster else None
            ) as executor,
        ):
            return build_package(executor, toolchain, job, log, cluster=self.cluster, packed_compilers=packed)


class ContainerExecutor:
    """A container of the toolchain image for one package: the package's folders mounted, each build
    command run in it by exec. No network, or with --dist the host's (the scheduler and every build
    server it hands out must be reachable at the addresses the host reaches them by)."""

    def __init__(
        self,
        engine: ContainerEngine,
        toolchain: ToolchainInfo,
        job: PackageBuild,
        log: BuildLog,
        *,
        packed_compilers: Path | None,
    ):
        if not (toolchain.image_id and toolchain.image):
            raise ToolchainError(f"{toolchain.location}: not a toolchain image's toolchain")  # a local one: a bug
        self.engine = engine
        self.toolchain = toolchain
        self.job = job
        self.log = log
        self.packed_compilers = packed_compilers
        self.environ: dict[str, str] = {}  # the image's variables are the engine's to add
        self._stack = ExitStack()
        self._shared: dict[Path, str] = {}
        self._writable: list[str] = []

    def __enter__(self) -> ContainerExecutor:
        with self._stack as stack:  # closed here only where the container does not start
            self._start()
            self._stack = stack.pop_all()
        return self

    def _start(self) -> None:
        job = self.job
        no_deps = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="gpuwheel-nodeps-")))
        folders = [
            (job.tree, job.tree, SRC, True),
            (job.deps_dir, job.deps_dir if job.deps_dir.is_dir() else no_deps, DEPS_SRC, True),
            (job.out_dir, job.out_dir, OUT, False),
            (job.cache_dir, job.cache_dir, CACHE, False),
        ]
        if self.packed_compilers is not None:
            folders.append((self.packed_compilers, self.packed_compilers, DIST_CLIENT, False))
        mounts = []
        for host, source, target, read_only in folders:
            source.mkdir(parents=True, exist_ok=True)
            mounts.append(Mount(source, target, read_only=read_only))
            self._shared[host] = target
            if not read_only:
                self._writable.append(target)
        self.log.line(f"gpuwheel: starting a {self.engine.kind} container of {self.toolchain.image}")
        self._container = self._stack.enter_context(
            self.engine.container(
                self.toolchain.image_id or "",
                self.toolchain.image or "",
                on_line=self.log.line,
                mounts=tuple(mounts),
                labels={"gpuwheel.package": job.name},
                network="host" if self.packed_compilers is not None else "none",
            )
        )

    def __exit__(self, kind, error, trace) -> None:
        with self._stack:
            # Files the container's root wrote, handed to the calling user.
            owner = f"{os.getuid()}:{os.getgid()}"
            with suppress(ToolchainError) if kind else nullcontext():
                self.run(["chown", "-R", owner, *self._writable], env={}, on_line=self.log.line)

    def run(
        self, argv: Sequence[str], *, env: Mapping[str, str], on_line: Callable[[str], None], cwd: str | None = None
    ) -> Ran:
        done = self._container.exec(argv, env=env, on_line=on_line, cwd=cwd or "/")
        return Ran(done.code, done.oom_killed)

    def stage(self, source: Path, canonical: str) -> str:
        lines: list[str] = []
        copied = self.run(
            ["/bin/sh", "-c", 'mkdir -p "$(dirname "$1")" && cp -a "$0" "$1"', self._shared[source], canonical],
            env={},
            on_line=lines.append,
        )
        if copied.returncode != 0:
            raise ToolchainError(f"could not copy {source} to {canonical} in the container: {' '.join(lines)[-300:]}")
        return canonical

    def sees(self, host: Path) -> str:
        return self._shared[host]

    def path_map(self) -> tuple[tuple[str, str], ...]:
        return ()  # the container compiles at the canonical paths

    @contextmanager
    def private_file(self, name: str, text: str) -> Iterator[str]:
        # /dev/shm is a tmpfs in docker's and podman's containers; printf is the shell's own (no command
        # line shows the text), and the variable lives only as long as this one shell.
        path = f"/dev/shm/{name}"
        lines: list[str] = []
        written = self.run(
            ["/bin/sh", "-c", f'umask 077 && printf "%s" "${DIST_CONF_VARIABLE}" > "$0"', path],
            env={DIST_CONF_VARIABLE: text},
            on_line=lines.append,
        )
        if written.returncode != 0:
            raise ToolchainError(f"could not write {path} in the container: {' '.join(lines)[-300:]}")
        try:
            yield path
        finally:
            self.run(["rm", "-f", path], env={}, on_line=self.log.line)


def _parse_probe(lines: list[str]) -> dict:
    """The probe's output: one JSON line from the interpreter, then nvcc, the C++ compiler and sccache."""
    probe: dict = next((json.loads(line) for line in lines if line.startswith("{")), {})
    return {
        "python": probe.get("python", ""),
        "torch": probe.get("torch") or "",
        "torch_cuda": probe.get("torch_cuda") or "",
        "nvcc": parse_nvcc_version("\n".join(lines)) or "",
        "cc": next((line for line in lines if line.startswith(("c++", "g++", "gcc"))), ""),
        "sccache": next((line.strip() for line in lines if line.startswith("sccache")), None),
    }


def _pip_settings(context: Path) -> None:
    """pip.conf and ca.crt for the image build: the host's CA bundle (TLS-intercepting proxies) if set."""
    bundle = next(
        (
            Path(v)
            for k in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")
            if (v := os.environ.get(k)) and Path(v).is_file()
        ),
        None,
    )
    (context / "ca.crt").write_bytes(bundle.read_bytes() if bundle else b"")
    (context / "pip.conf").write_text("[global]\n" + ("cert = /opt/gpuwheel/ca.crt\n" if bundle else ""))


def _matches_digest(image: Image, digest: str) -> bool:
    return image.id == digest or any(d.endswith(digest) for d in image.repo_digests)

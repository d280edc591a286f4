"""The container backend: a toolchain image rendered from the recipe's pins, one container per package,
on docker or podman alike (backends/engine.py is the one interface to both).

dockerfiles/toolchain.Dockerfile is rendered with the base image's ID, Python, torch and (where the
base image has no CUDA toolkit) the pinned PyPI CUDA wheels, and tagged by the hash of the text: the
same pins on the same base image reuse the same image. Each package builds in a container with its
sources mounted read-only (copied inside to a stable writable path, which sccache keys on), the
network off, the output and compile-cache directories mounted, and the plan's env.

With --dist the container shares the host's network instead (the scheduler and every build server it
hands out must be reachable at the addresses the host reaches them by), and the sccache server inside
packs the image's own compilers for the servers. The client configuration, token included, enters as
one environment variable that a start script writes to RAM for the sccache server's start, then
removes with the variable before it execs the build script (docs/dist.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from gpuwheel import facts
from gpuwheel.backends.base import (
    PROBE_SCRIPT,
    BuildOutcome,
    PackageBuild,
    ToolchainInfo,
    check_toolchain,
    parse_nvcc_version,
    reproducible_env,
    substitute,
    toolchain_requirements,
)
from gpuwheel.backends.dist import Cluster, client_config_text
from gpuwheel.backends.engine import ContainerEngine, Image, Mount
from gpuwheel.backends.progress import BuildProgress
from gpuwheel.backends.sccache import free_port, parse_cache_stats, parse_dist_stats
from gpuwheel.cache import cache_root
from gpuwheel.errors import DistConfigError, ToolchainError
from gpuwheel.recipe import Toolchain
from gpuwheel.shipped import shipped
from gpuwheel.wheelfile import DEFAULT_SOURCE_DATE_EPOCH

if TYPE_CHECKING:
    from gpuwheel.lock import Lock

TEMPLATE = shipped("dockerfiles") / "toolchain.Dockerfile"
IMAGE_REPOSITORY = "gpuwheel-toolchain"
# Paths inside the build container.
SRC, DEPS_SRC, WORK, OUT, CACHE, META = (
    "/gpuwheel/src",
    "/gpuwheel/deps-src",
    "/gpuwheel/work",
    "/gpuwheel/out",
    "/gpuwheel/cache",
    "/gpuwheel/meta",
)
DIST_CLIENT = "/gpuwheel/dist-client"  # --dist: the compilers sccache packed for the build servers, kept across builds
# --dist: sccache's client configuration as text (it holds the token), for the build script alone.
DIST_CONF_VARIABLE = "GPUWHEEL_SCCACHE_CONF"
# Runs in the container: copy the read-only tree to a writable stable path, build through sccache,
# save its stats, hand the outputs to the calling user. "$@" is the plan's command. The "gpuwheel:"
# lines say what the container is doing before the first compile step (progress shows them).
BUILD_SCRIPT = f"""set -e
echo "gpuwheel: copying the source tree to {WORK}/$GPUWHEEL_PACKAGE"
mkdir -p {WORK}
cp -a {SRC} {WORK}/$GPUWHEEL_PACKAGE
cp -a {DEPS_SRC} {WORK}/deps
cd {WORK}/$GPUWHEEL_PACKAGE
if [ -n "$SCCACHE_DIR" ] && [ -z "$GPUWHEEL_SCCACHE_STARTED" ]; then sccache --start-server >/dev/null; fi
echo "gpuwheel: running the build command (pip reads the build's metadata before the first compile step)"
set +e
"$@"
status=$?
if [ -n "$SCCACHE_DIR" ]; then
  sccache --show-stats --stats-format=json > {META}/sccache.json
  sccache --stop-server >/dev/null
  chown -R "$GPUWHEEL_OWNER" "$SCCACHE_DIR"
  if [ -d {DIST_CLIENT} ]; then chown -R "$GPUWHEEL_OWNER" {DIST_CLIENT}; fi
fi
chown -R "$GPUWHEEL_OWNER" {OUT} {META}
exit $status
"""
# Runs first in a --dist container, BUILD_SCRIPT as $1: the cluster's client config holds its token. printf
# (a shell builtin: no command line shows it) writes it to RAM (/dev/shm is a tmpfs in docker's and
# podman's containers); the sccache server reads it as it starts; then file and variable are gone. This
# shell's first environment (/proc/1/environ) still holds the variable, so the build goes on in a new
# process image: neither the build command nor any process it can list has the token in its environment.
DIST_START_SCRIPT = f"""set -e
echo "gpuwheel: starting sccache as a client of the sccache-dist scheduler"
conf=/dev/shm/gpuwheel-sccache.conf
(umask 077 && printf '%s' "${DIST_CONF_VARIABLE}" > $conf)
unset {DIST_CONF_VARIABLE}
SCCACHE_CONF=$conf sccache --start-server >/dev/null || {{ rm -f $conf; exit 1; }}
rm -f $conf
export GPUWHEEL_SCCACHE_STARTED=1
script=$1
shift
exec /bin/sh -c "$script" gpuwheel-build "$@"
"""
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
        self._image: Image | None = None
        self._sccache = False

    # ---- toolchain image ----------------------------------------------------------------------
    def prepare(self, toolchain: Toolchain, *, recipe_name: str) -> ToolchainInfo:
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
        self._image, self._sccache = image, info.sccache is not None
        if self.cluster and not self._sccache:
            raise DistConfigError(
                f"--dist {self.cluster}: no sccache in image {image.ref} to send compiles to the cluster",
                hint=f"remove image {image.ref} so gpuwheel rebuilds it with sccache",
            )
        return info

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
    def build(self, job: PackageBuild, on_line: Callable[[str], None]) -> BuildOutcome:
        assert self._image, "prepare() first"
        job.cache_dir.mkdir(parents=True, exist_ok=True)
        job.log_path.parent.mkdir(parents=True, exist_ok=True)
        with (
            tempfile.TemporaryDirectory(prefix="gpuwheel-meta-") as meta,
            tempfile.TemporaryDirectory(prefix="gpuwheel-nodeps-") as no_deps,
            open(job.log_path, "w", encoding="utf-8", errors="replace") as log,
        ):
            deps = job.deps_dir if job.deps_dir.is_dir() else Path(no_deps)
            places = dict(tree=f"{WORK}/{job.name}", out=OUT, deps=f"{WORK}/deps", cache=CACHE)
            env = {
                k: v
                for k, v in substitute(job.env, **places).items()
                if self._sccache or not (k.startswith("SCCACHE_") or v.startswith("sccache"))
            }
            env.update(GPUWHEEL_PACKAGE=job.name, GPUWHEEL_OWNER=f"{os.getuid()}:{os.getgid()}")
            # The container's paths are the canonical ones already (no map); the time is fixed as locally.
            env.update(reproducible_env(env, (), str(DEFAULT_SOURCE_DATE_EPOCH)))
            mounts: tuple[Mount, ...] = (
                Mount(job.tree, SRC, read_only=True),
                Mount(deps, DEPS_SRC, read_only=True),
                Mount(job.out_dir, OUT, read_only=False),
                Mount(job.cache_dir, CACHE, read_only=False),
                Mount(Path(meta), META, read_only=False),
            )
            if self.cluster:
                packed = cache_root() / "compile" / "dist-client-container"
                packed.mkdir(parents=True, exist_ok=True)
                mounts += (Mount(packed, DIST_CLIENT, read_only=False),)
                # The host's network: the sccache server's port must be free on the host, not only in here.
                env.update(
                    {
                        DIST_CONF_VARIABLE: client_config_text(self.cluster, DIST_CLIENT),
                        "SCCACHE_SERVER_PORT": str(free_port()),
                    }
                )
            tail: deque[str] = deque(maxlen=40)

            def line(text: str) -> None:
                log.write(text + "\n")
                tail.append(text)
                on_line(text)

            start = time.monotonic()
            line(f"gpuwheel: starting a {self.engine.kind} container of {self._image.ref}")
            script = (
                ["/bin/sh", "-c", DIST_START_SCRIPT, "gpuwheel-dist", BUILD_SCRIPT]
                if self.cluster
                else ["/bin/sh", "-c", BUILD_SCRIPT, "gpuwheel-build"]
            )
            finished = self.engine.run(
                self._image,
                [*script, *substitute(job.command, **places)],
                env=env,
                mounts=mounts,
                labels={"gpuwheel.package": job.name},
                on_line=line,
                network="host" if self.cluster else "none",
            )
            seconds = time.monotonic() - start
            stats_file = Path(meta) / "sccache.json"
            shown = stats_file.read_text() if stats_file.is_file() else ""
        return BuildOutcome(
            finished.code,
            seconds,
            tuple(tail),
            parse_cache_stats(shown),
            oom_killed=finished.oom_killed,
            dist=parse_dist_stats(shown) if self.cluster else None,
        )


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

"""The docker backend: a toolchain image rendered from the recipe's pins, one container per package.

dockerfiles/toolchain.Dockerfile is rendered with the base image, Python, torch and (where the
base image has no CUDA toolkit) the pinned PyPI CUDA wheels, and tagged by the hash of the text
and the base image id: the same pins reuse the same image. Each package builds in a container
with its sources mounted read-only (copied inside to a stable writable path, which sccache keys
on), the network off, the output and compile-cache directories mounted, and the plan's env.
"""

from __future__ import annotations

import hashlib
import json
import os
import string
import tempfile
import time
from pathlib import Path
from typing import Callable

import docker
from docker.errors import APIError, DockerException, ImageNotFound

from gpuwheel import facts
from gpuwheel.build.base import (BUILD_REQUIREMENTS, PROBE_SCRIPT, BuildOutcome, PackageBuild, ToolchainInfo,
                                 check_toolchain, parse_cache_stats, parse_nvcc_version, substitute)
from gpuwheel.cache import cache_root
from gpuwheel.errors import ToolchainError
from gpuwheel.log import logger
from gpuwheel.recipe import PROJECT_ROOT, Toolchain

TEMPLATE = PROJECT_ROOT / "dockerfiles" / "toolchain.Dockerfile"
IMAGE_REPOSITORY = "gpuwheel-toolchain"
# Paths inside the build container.
SRC, DEPS_SRC, WORK, OUT, CACHE, META = ("/gpuwheel/src", "/gpuwheel/deps-src", "/gpuwheel/work", "/gpuwheel/out",
                                         "/gpuwheel/cache", "/gpuwheel/meta")
# Runs in the container: copy the read-only tree to a writable stable path, build through sccache,
# save its stats, hand the outputs to the calling user. "$@" is the plan's command.
BUILD_SCRIPT = """set -e
mkdir -p {work}
cp -a {src} {work}/$GPUWHEEL_PACKAGE
cp -a {deps_src} {work}/deps
cd {work}/$GPUWHEEL_PACKAGE
if [ -n "$SCCACHE_DIR" ]; then sccache --start-server >/dev/null; fi
set +e
"$@"
status=$?
if [ -n "$SCCACHE_DIR" ]; then
  sccache --show-stats --stats-format=json > {meta}/sccache.json
  sccache --stop-server >/dev/null
  chown -R "$GPUWHEEL_OWNER" "$SCCACHE_DIR"
fi
chown -R "$GPUWHEEL_OWNER" {out} {meta}
exit $status
""".format(work=WORK, src=SRC, deps_src=DEPS_SRC, meta=META, out=OUT)
PROBE_COMMAND = ("python -c \"$0\"; nvcc --version; c++ --version | head -n1; sccache --version")


def _docker_host() -> str:
    return os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")


def engine() -> docker.DockerClient:
    """A client of an engine that answers; ToolchainError (one line) when none does."""
    try:
        client = docker.from_env(timeout=600)
        client.ping()
        return client
    except DockerException as error:
        raise ToolchainError(f"no Docker engine at {_docker_host()} ({_short(error)})",
                             hint="start dockerd or use --backend local") from None


def engine_answers() -> bool:
    try:
        docker.from_env(timeout=5).ping()
        return True
    except DockerException:
        return False


class _Template(string.Template):
    delimiter = "@"  # the Dockerfile's own $VARIABLES stay as they are


def render_dockerfile(toolchain: Toolchain, *, base_image: str, cuda_from_pypi: bool) -> str:
    python = facts.major_minor(toolchain.python)
    cuda = facts.major_minor(toolchain.cuda)
    requirements = [f"torch=={toolchain.torch}", *BUILD_REQUIREMENTS]
    if cuda_from_pypi:
        wheels, layout = facts.CUDA_PYPI_TOOLCHAIN[cuda]
        requirements.extend(wheels)
        cuda_home = f"/opt/toolchain/lib/python{python}/site-packages/{layout}"
        link = (f"cd {cuda_home}/lib && ln -sf $(ls libcudart.so.* | head -n1) libcudart.so "
                f"&& ln -sfn lib {cuda_home}/lib64")
    else:
        cuda_home, link = "/usr/local/cuda", "true"
    text = _Template(TEMPLATE.read_text(encoding="utf-8")).substitute(
        BASE_IMAGE=base_image, PYTHON=python, REQUIREMENTS=" ".join(f"'{r}'" for r in requirements),
        CUDA_HOME=cuda_home, LINK_CUDA=link, KEY="@KEY")
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    return text.replace("@KEY", key)


class DockerBackend:
    name = "docker"

    def __init__(self, base_image: str | None = None):
        self.base_image = base_image  # overrides the recipe's [toolchain] base_image
        self._client: docker.DockerClient | None = None
        self._image: str | None = None
        self._sccache = False

    # ---- toolchain image ----------------------------------------------------------------------
    def prepare(self, toolchain: Toolchain, *, recipe_name: str) -> ToolchainInfo:
        self._client = engine()
        base_name = self.base_image or toolchain.base_image
        if not base_name:
            raise ToolchainError(f"{recipe_name} names no [toolchain] base_image",
                                 hint="set one, or pass --base-image (e.g. one made by `gpuwheel toolchain base-image`)")
        base = self._base_image(base_name)
        if toolchain.base_image_digest and not self.base_image and not _matches_digest(base, toolchain.base_image_digest):
            raise ToolchainError(f"base image {base_name} is {base.id}, {recipe_name} pins base_image_digest = "
                                 f"{toolchain.base_image_digest}", hint="pull the pinned image, or update the digest")
        cuda = facts.major_minor(toolchain.cuda)
        image_has_cuda = any(e.startswith("CUDA_VERSION=") for e in base.attrs["Config"].get("Env") or ())
        if not image_has_cuda and cuda not in facts.CUDA_PYPI_TOOLCHAIN:
            raise ToolchainError(f"base image {base_name} has no CUDA toolkit and CUDA {cuda} has no complete toolkit "
                                 f"on PyPI", hint=f"use a nvidia/cuda:{toolchain.cuda}-devel base image (--base-image)")
        dockerfile = render_dockerfile(toolchain, base_image=base.id, cuda_from_pypi=not image_has_cuda)
        key = hashlib.sha256(dockerfile.encode()).hexdigest()[:16]
        self._image = f"{IMAGE_REPOSITORY}:{key}"
        try:
            image = self._client.images.get(self._image)
        except ImageNotFound:
            image = self._build_image(dockerfile, self._image)
        info = self._observe(image, base_name, base)
        check_toolchain(info, toolchain, recipe_name=recipe_name,
                        fix_cuda=f"use a base image with CUDA {cuda} (--base-image), or one without a toolkit "
                                 f"(the CUDA 13 toolkit then comes from PyPI)",
                        fix_torch=f"remove image {self._image} so gpuwheel rebuilds it")
        self._sccache = info.sccache is not None
        return info

    def _base_image(self, name: str):
        assert self._client
        try:
            return self._client.images.get(name)
        except ImageNotFound:
            pass
        logger.warning("base image %s is not in the engine: pulling it", name)
        try:
            self._client.images.pull(name)
            return self._client.images.get(name)
        except (APIError, ImageNotFound) as error:
            raise ToolchainError(f"base image {name} is not in the engine at {_docker_host()} and cannot be pulled "
                                 f"({_short(error)})",
                                 hint="make one with `gpuwheel toolchain base-image`, then pass --base-image "
                                      "gpuwheel-base:bookworm") from None

    def _build_image(self, dockerfile: str, tag: str):
        assert self._client
        log_path = cache_root() / "logs" / "images" / f"{tag.replace(':', '-')}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        logger.warning("building toolchain image %s (torch and the toolkit: a few minutes, once); log: %s",
                       tag, log_path)
        error = None
        with tempfile.TemporaryDirectory(prefix="gpuwheel-image-") as context, \
                open(log_path, "w", encoding="utf-8") as log:
            (Path(context) / "Dockerfile").write_text(dockerfile, encoding="utf-8")
            _pip_settings(Path(context))
            try:
                # pip in the build needs the network; the package builds later run without it.
                for chunk in self._client.api.build(path=context, tag=tag, network_mode="host", rm=True,
                                                    forcerm=True, decode=True):
                    text = chunk.get("stream") or chunk.get("status") or ""
                    if text:
                        log.write(text)
                        log.flush()  # followed with tail -f during a long image build
                    if "error" in chunk:
                        error = chunk["error"].strip()
            except APIError as api_error:
                error = _short(api_error)
        if error:
            raise ToolchainError(f"building toolchain image {tag} failed: {error.splitlines()[-1]}",
                                 hint=f"full output in {log_path}")
        return self._client.images.get(tag)

    def _observe(self, image, base_name: str, base) -> ToolchainInfo:
        """Run the probe once per image and keep its answer next to the cache."""
        assert self._client
        record = cache_root() / "toolchains" / f"docker-{image.id.split(':')[-1][:16]}.json"
        if record.is_file():
            return ToolchainInfo(**json.loads(record.read_text()))
        output = self._client.containers.run(image.id, ["/bin/sh", "-c", PROBE_COMMAND, PROBE_SCRIPT],
                                             network_mode="none", remove=True, stderr=True).decode()
        lines = output.splitlines()
        probe = next((json.loads(line) for line in lines if line.startswith("{")), {})
        cc = next((line for line in lines if line.startswith(("c++", "g++", "gcc"))), "")
        sccache = next((line.strip() for line in lines if line.startswith("sccache")), None)
        info = ToolchainInfo(backend=self.name, python=probe.get("python", ""), torch=probe.get("torch") or "",
                             torch_cuda=probe.get("torch_cuda") or "", nvcc=parse_nvcc_version(output) or "",
                             cc=cc, base_image=base_name, base_image_digest=(base.attrs.get("RepoDigests") or
                                                                              [base.id])[0],
                             image=self._image, location=image.id, sccache=sccache)
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(info.to_json()))
        return info

    # ---- one package ----------------------------------------------------------------------------
    def build(self, job: PackageBuild, on_line: Callable[[str], None]) -> BuildOutcome:
        assert self._client and self._image, "prepare() first"
        job.cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="gpuwheel-meta-") as meta, \
                tempfile.TemporaryDirectory(prefix="gpuwheel-nodeps-") as no_deps:
            deps = job.deps_dir if job.deps_dir.is_dir() else Path(no_deps)
            places = dict(tree=f"{WORK}/{job.name}", out=OUT, deps=f"{WORK}/deps", cache=CACHE)
            env = {k: v for k, v in substitute(job.env, **places).items()
                   if self._sccache or not (k.startswith("SCCACHE_") or v.startswith("sccache"))}
            env.update(GPUWHEEL_PACKAGE=job.name, GPUWHEEL_OWNER=f"{os.getuid()}:{os.getgid()}")
            volumes = {str(job.tree.resolve()): {"bind": SRC, "mode": "ro"},
                       str(deps.resolve()): {"bind": DEPS_SRC, "mode": "ro"},
                       str(job.out_dir.resolve()): {"bind": OUT, "mode": "rw"},
                       str(job.cache_dir.resolve()): {"bind": CACHE, "mode": "rw"},
                       meta: {"bind": META, "mode": "rw"}}
            start = time.monotonic()
            try:
                container = self._client.containers.run(
                    self._image, ["/bin/sh", "-c", BUILD_SCRIPT, "gpuwheel-build", *substitute(job.command, **places)],
                    environment=env, volumes=volumes, network_mode="none", detach=True,
                    labels={"gpuwheel.package": job.name})
            except APIError as error:
                raise ToolchainError(f"the engine refused to start the {job.name} build: {_short(error)}") from None
            try:
                tail = _stream_logs(container, job.log_path, on_line)
                status = container.wait()["StatusCode"]
                container.reload()
                oom = bool(container.attrs["State"].get("OOMKilled"))
            finally:
                container.remove(force=True)
            stats_file = Path(meta) / "sccache.json"
            stats = parse_cache_stats(stats_file.read_text() if stats_file.is_file() else "")
        return BuildOutcome(status, time.monotonic() - start, tail, stats, oom_killed=oom)


def _stream_logs(container, log_path: Path, on_line: Callable[[str], None]) -> tuple[str, ...]:
    """Write the container's output to the log file line by line; return the last lines."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: list[str] = []
    pending = ""
    with open(log_path, "w", encoding="utf-8", errors="replace") as log:
        for chunk in container.logs(stream=True, follow=True):
            pending += chunk.decode("utf-8", errors="replace")
            *lines, pending = pending.split("\n")
            for line in lines:
                log.write(line + "\n")
                on_line(line)
                tail = (tail + [line])[-40:]
        if pending:
            log.write(pending + "\n")
            tail = (tail + [pending])[-40:]
    return tuple(tail)


def _pip_settings(context: Path) -> None:
    """pip.conf and ca.crt for the image build: the host's CA bundle (TLS-intercepting proxies) if set."""
    bundle = next((Path(v) for k in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")
                   if (v := os.environ.get(k)) and Path(v).is_file()), None)
    (context / "ca.crt").write_bytes(bundle.read_bytes() if bundle else b"")
    (context / "pip.conf").write_text("[global]\n" + ("cert = /opt/gpuwheel/ca.crt\n" if bundle else ""))


def _matches_digest(image, digest: str) -> bool:
    return image.id == digest or any(d.endswith(digest) for d in image.attrs.get("RepoDigests") or ())


def _short(error: Exception) -> str:
    text = getattr(error, "explanation", None) or str(error)
    return " ".join(str(text).split())[:300]

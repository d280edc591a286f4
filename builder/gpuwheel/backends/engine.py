"""One container interface over docker and podman: the docker SDK, talking to either engine's API.

Podman serves the docker API as well (`podman system service`), so both engines go through the
same client calls: `--network none`, read-only source mounts, the OOM flag and the image IDs cannot
differ between them, and there is one code path to test. Podman has no daemon: where no podman
service answers, gpuwheel starts one for the length of the command and stops it afterwards; it
uses the storage of the `podman` command, so `podman images` lists what gpuwheel built.

Where the engines differ, this module alone knows it:
- podman's image import ignores the repository and tag it is given: images are tagged after it;
- rootful podman asks runc for 1048576 open files and processes, more than a host without
  CAP_SYS_RESOURCE (itself a container) grants, and the container fails to start: its containers
  get 1024 of each, which every host grants (root in the container is exempt from the process
  limit anyway). Docker and rootless podman hand on limits the host has granted already.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import docker
from docker.errors import DockerException, ImageNotFound
from docker.types import Ulimit
from docker.utils import parse_repository_tag
from requests import RequestException

from gpuwheel.cache import cache_root
from gpuwheel.errors import ToolchainError
from gpuwheel.recipe import ENGINE_VARIABLE, ENGINES
from gpuwheel.recipe_values import closest
from gpuwheel.run import background, last_line

DOCKER_SOCKET = "unix:///var/run/docker.sock"
ROOTFUL_PODMAN_ULIMITS = (Ulimit(name="nofile", soft=1024, hard=1024), Ulimit(name="nproc", soft=1024, hard=1024))
_ENGINE_ERRORS = (DockerException, RequestException)
_PING_SECONDS = 10
_POLL_SECONDS = 0.5  # how often a running container's output file and state are read
_OUTPUT_DIR = "/gpuwheel-output"


@dataclass(frozen=True)
class EngineChoice:
    name: str  # docker | podman
    chosen_by: str  # "--engine", "GPUWHEEL_ENGINE", "<recipe> [build] engine" or "default"

    @property
    def reason(self) -> str:
        return "the default engine" if self.chosen_by == "default" else f"engine chosen by {self.chosen_by}"


def choose_engine(flag: str | None, recipe_engine: str | None, *, recipe_name: str = "") -> EngineChoice:
    """--engine, else $GPUWHEEL_ENGINE, else the recipe's [build] engine, else docker."""
    if flag:
        return EngineChoice(flag, "--engine")
    if ENGINE_VARIABLE in os.environ:
        value = os.environ[ENGINE_VARIABLE]
        if value not in ENGINES:
            close = closest(value, ENGINES) if value else None
            raise ToolchainError(
                f"{ENGINE_VARIABLE}={value!r} names no container engine",
                hint=(f"did you mean {close}? " if close else "") + "set it to docker or podman, or unset it",
            )
        return EngineChoice(value, ENGINE_VARIABLE)
    if recipe_engine:
        return EngineChoice(recipe_engine, f"{recipe_name} [build] engine")
    return EngineChoice("docker", "default")


def engine_available(name: str) -> bool:
    """Whether containers can be had without asking the user: docker answers, or podman can be started."""
    if name == "podman":
        return bool(os.environ.get("CONTAINER_HOST") or shutil.which("podman"))
    try:
        client = docker.from_env(timeout=_PING_SECONDS)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except _ENGINE_ERRORS:
        return False


@dataclass(frozen=True)
class Image:
    ref: str  # the name it was asked for
    id: str  # sha256:… of its config: what the engine builds FROM and provenance pins
    env: tuple[str, ...]
    repo_digests: tuple[str, ...]  # from the registry it came from (podman makes one for local images too)

    @property
    def digest(self) -> str:
        return self.repo_digests[0] if self.repo_digests else self.id


@dataclass(frozen=True)
class Mount:
    source: Path
    target: str
    read_only: bool


@dataclass(frozen=True)
class Exit:
    code: int
    oom_killed: bool  # the engine says the container hit its memory limit


class ContainerEngine:
    """A connection to one engine, open inside `with`; and the podman service gpuwheel started, if it did."""

    def __init__(self, choice: EngineChoice, *, instead: str = ""):
        self.choice = choice
        self.instead = instead  # what else the user can do where no engine answers (", or use --backend local")
        self.address = ""
        self.kind = choice.name  # what answers at the address: podman may serve DOCKER_HOST, too
        self.version = ""
        self._ulimits: list[Ulimit] | None = None
        self._client: docker.DockerClient | None = None
        self._stack = ExitStack()

    def __enter__(self) -> ContainerEngine:
        try:
            self.address = self._connect()
            # No read timeout: an image build streams nothing for minutes while pip installs torch.
            self._client = self._open(self.address, timeout=None)
            self._stack.callback(self._client.close)
            version = self._call("report its version", self._client.version)
            podman = any(c.get("Name") == "Podman Engine" for c in version.get("Components") or ())
            self.kind, self.version = ("podman" if podman else "docker"), str(version.get("Version", "?"))
            rootless = any(
                "rootless" in o
                for o in self._call("report its settings", self._client.info).get("SecurityOptions") or ()
            )
            self._ulimits = list(ROOTFUL_PODMAN_ULIMITS) if podman and not rootless else None
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    @property
    def description(self) -> str:
        return f"{self.kind} {self.version}"

    # ---- connecting ------------------------------------------------------------------------------
    def _connect(self) -> str:
        if self.choice.name == "docker":
            address = os.environ.get("DOCKER_HOST") or DOCKER_SOCKET
            how = (
                "start that engine"
                if os.environ.get("DOCKER_HOST")
                else "start dockerd and set DOCKER_HOST to its socket"
            )
            self._ping(address, f"no docker engine at {address}", hint=f"{how}, see docs/build.md 'Container engines'")
            return address
        service = os.environ.get("CONTAINER_HOST")
        if service:  # the user's own service: use it or say it is down, never start another
            self._ping(
                service,
                f"no podman service at {service} (CONTAINER_HOST)",
                hint="start `podman system service` there, or unset CONTAINER_HOST so gpuwheel starts one",
            )
            return service
        address = _podman_socket()
        with suppress(ToolchainError):
            self._ping(address, "", hint="")
            return address
        return self._start_podman()

    def _open(self, address: str, *, timeout: int | None) -> docker.DockerClient:
        if self.choice.name == "docker":
            return docker.from_env(
                timeout=timeout
            )  # DOCKER_HOST and DOCKER_TLS_VERIFY/DOCKER_CERT_PATH, as docker reads them
        return docker.DockerClient(base_url=address, timeout=timeout)

    def _ping(self, address: str, failure: str, *, hint: str) -> None:
        try:
            client = self._open(address, timeout=_PING_SECONDS)
            try:
                client.ping()
            finally:
                client.close()
        except _ENGINE_ERRORS as error:
            raise ToolchainError(
                f"{failure} ({_short(error)}; {self.choice.reason})", hint=hint + self.instead
            ) from None

    def _start_podman(self) -> str:
        binary = shutil.which("podman")
        if binary is None:
            raise ToolchainError(
                f"podman is not installed ({self.choice.reason})",
                hint="apt-get install -y podman, or choose docker with --engine docker" + self.instead,
            )
        run_dir = self._stack.enter_context(tempfile.TemporaryDirectory(prefix="gpuwheel-podman-"))
        address = f"unix://{run_dir}/podman.sock"
        log_path = cache_root() / "logs" / "podman-service.log"
        # --time=0: no idle exit; the service lives exactly as long as this engine is open.
        service = self._stack.enter_context(
            background([binary, "system", "service", "--time=0", address], log_path=log_path)
        )
        deadline = time.monotonic() + 30
        while service.poll() is None:
            try:
                self._ping(address, "", hint="")
                return address
            except ToolchainError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        last = last_line(log_path.read_text(errors="replace").splitlines(), "no output")
        raise ToolchainError(f"`podman system service` did not start: {last}", hint=f"log: {log_path}")

    # ---- images ----------------------------------------------------------------------------------
    def find_image(self, ref: str) -> Image | None:
        """The image the engine holds under ref; None where it has none."""
        assert self._client, "use the engine inside `with`"
        try:
            return _image(ref, self._client.images.get(ref))
        except ImageNotFound:
            return None
        except _ENGINE_ERRORS as error:
            raise ToolchainError(f"{self.kind} could not look up image {ref}: {_short(error)}") from None

    def pull(self, ref: str, *, hint: str) -> Image:
        assert self._client, "use the engine inside `with`"
        try:
            self._client.images.pull(ref)
            return _image(ref, self._client.images.get(ref))
        except _ENGINE_ERRORS as error:
            raise ToolchainError(
                f"image {ref} is not in the {self.kind} engine at {self.address} and cannot be "
                f"pulled ({_short(error)})",
                hint=hint,
            ) from None

    def build_image(self, context: Path, tag: str, *, on_line: Callable[[str], None], hint: str) -> Image:
        """Build context/Dockerfile as tag, with the host's network (pip in the build needs it)."""
        assert self._client, "use the engine inside `with`"
        failure = None
        try:
            for chunk in self._client.api.build(
                path=str(context), tag=tag, network_mode="host", rm=True, forcerm=True, decode=True
            ):
                for line in (chunk.get("stream") or chunk.get("status") or "").splitlines():
                    on_line(line)
                if "error" in chunk:
                    failure = chunk["error"].strip()
        except _ENGINE_ERRORS as error:
            failure = _short(error)
        if failure:
            # podman's one line repeats the whole Dockerfile step before its reason, which comes last.
            last = " ".join(failure.splitlines()[-1].split())
            raise ToolchainError(
                f"building image {tag} failed: {last if len(last) <= 300 else '…' + last[-299:]}", hint=hint
            )
        return self._get(tag)

    def import_rootfs(self, archive: Path, tag: str, *, changes: Iterable[str]) -> Image:
        """A file-system tarball as an image tagged `tag` (docker import)."""
        assert self._client, "use the engine inside `with`"
        try:
            answer = self._client.api.import_image_from_file(str(archive), changes=list(changes))
            image_id = json.loads(answer.strip().splitlines()[-1])["status"]
            repository, version = parse_repository_tag(tag)
            self._client.images.get(image_id).tag(repository, version or "latest")
        except (*_ENGINE_ERRORS, ValueError, KeyError) as error:
            raise ToolchainError(f"{self.kind} could not import {archive.name} as {tag}: {_short(error)}") from None
        return self._get(tag)

    def _get(self, ref: str) -> Image:
        image = self.find_image(ref)
        if image is None:
            raise ToolchainError(f"{self.kind} made image {ref} but cannot find it")
        return image

    # ---- containers ------------------------------------------------------------------------------
    def run(
        self,
        image: Image,
        argv: list[str],
        *,
        on_line: Callable[[str], None],
        env: dict[str, str] | None = None,
        mounts: Iterable[Mount] = (),
        labels: dict[str, str] | None = None,
        network: str = "none",
    ) -> Exit:
        """Run argv in a fresh container, its output line by line; removed afterwards. No network but
        loopback, unless network is "host" (a distributed build: the sccache-dist cluster's addresses).

        The output goes to a file in a mounted directory, read here as it grows while the container's
        state is polled: podman 4.3's log stream does not end when a container exits (k8s-file logs,
        file events), and a file keeps stdout and stderr in the order they were written.
        """
        with tempfile.TemporaryDirectory(prefix="gpuwheel-output-") as output_dir:
            output = _output_file(Path(output_dir), "output")
            command = ["/bin/sh", "-c", f'exec "$@" >> {_OUTPUT_DIR}/output 2>&1', "gpuwheel-run", *argv]
            container = self._create(image.id, image.ref, command, Path(output_dir), env, mounts, labels, network)
            try:
                self._call(f"start a container of {image.ref}", container.start)

                def running() -> bool:
                    self._call("inspect a container", container.reload)
                    return bool(container.attrs["State"].get("Running"))  # podman says "stopped", docker "exited"

                _follow(output, running, on_line)
                # From the last inspection, not /wait: podman 4.3 answers that one 20 s late.
                state = container.attrs["State"]
                return Exit(int(state.get("ExitCode", -1)), bool(state.get("OOMKilled")))
            finally:
                on_line("gpuwheel: removing the container")  # minutes on vfs storage, which deletes a full copy
                with suppress(*_ENGINE_ERRORS):  # an engine that went away has taken the container with it
                    container.remove(force=True)

    @contextmanager
    def container(
        self,
        image_id: str,
        ref: str,
        *,
        on_line: Callable[[str], None],
        mounts: Iterable[Mount] = (),
        labels: dict[str, str] | None = None,
        network: str = "none",
    ) -> Iterator[Container]:
        """A container of the image that keeps running for the block, for commands run in it one after
        another (Container.exec); removed afterwards. Network as for run()."""
        with tempfile.TemporaryDirectory(prefix="gpuwheel-output-") as output_dir:
            # Nothing runs as the container's own process: it waits, its commands come by exec.
            container = self._create(
                image_id, ref, ["sleep", "infinity"], Path(output_dir), {}, mounts, labels, network
            )
            try:
                self._call(f"start a container of {ref}", container.start)
                yield Container(self, container, Path(output_dir))
            finally:
                on_line("gpuwheel: removing the container")  # minutes on vfs storage, which deletes a full copy
                with suppress(*_ENGINE_ERRORS):
                    container.remove(force=True)

    def _create(self, image_id, ref, command, output_dir, env, mounts, labels, network):
        assert self._client, "use the engine inside `with`"
        volumes = {
            str(m.source.resolve()): {"bind": m.target, "mode": "ro" if m.read_only else "rw"}
            for m in (*mounts, Mount(output_dir, _OUTPUT_DIR, read_only=False))
        }
        return self._call(
            f"create a container of {ref}",
            self._client.containers.create,
            image_id,
            command,
            environment=env or {},
            volumes=volumes,
            network_mode=network,
            labels=labels or {},
            ulimits=self._ulimits,
        )

    def _call(self, action: str, function, *args, **kwargs):
        try:
            return function(*args, **kwargs)
        except _ENGINE_ERRORS as error:
            raise ToolchainError(f"{self.kind} could not {action}: {_short(error)}") from None


class Container:
    """A running container of ContainerEngine.container: each command runs in it by exec, its output read
    from a file in a mounted folder as for ContainerEngine.run."""

    def __init__(self, engine: ContainerEngine, model, output_dir: Path):
        self._engine = engine
        self._model = model
        self._output_dir = output_dir
        self._commands = 0

    def exec(
        self, argv: Sequence[str], *, env: Mapping[str, str], on_line: Callable[[str], None], cwd: str = "/"
    ) -> Exit:
        """Run argv in the container (in cwd, with env over the image's variables), its output line by line."""
        self._commands += 1
        name = f"command-{self._commands}"
        output = _output_file(self._output_dir, name)
        command = ["/bin/sh", "-c", f'exec >> {_OUTPUT_DIR}/{name} 2>&1; cd "$0" || exit 127; exec "$@"', cwd, *argv]
        api = self._model.client.api
        started = self._engine._call(
            "run a command in a container", api.exec_create, self._model.id, command, environment=dict(env)
        )
        self._engine._call("run a command in a container", api.exec_start, started["Id"], detach=True)
        state: dict = {}

        def running() -> bool:
            state.update(self._engine._call("inspect a command in a container", api.exec_inspect, started["Id"]))
            return bool(state.get("Running")) or state.get("ExitCode") is None

        _follow(output, running, on_line)
        self._engine._call("inspect a container", self._model.reload)
        return Exit(int(state["ExitCode"]), bool(self._model.attrs["State"].get("OOMKilled")))


def _output_file(folder: Path, name: str) -> Path:
    """A file the container's root can append to, whatever host user it maps to."""
    output = folder / name
    output.touch(mode=0o666)
    output.chmod(0o666)
    return output


def _follow(output: Path, running: Callable[[], bool], on_line: Callable[[str], None]) -> None:
    """Hand on each line written to output while running() says the command runs, and those left after."""
    with open(output, encoding="utf-8", errors="replace", newline="\n") as reading:
        pending = ""
        while True:
            still = running()  # asked before reading: once it has stopped, this read gets the rest
            pending += reading.read()
            *lines, pending = pending.split("\n")
            for line in lines:
                on_line(line)
            if not still:
                break
            time.sleep(_POLL_SECONDS)
    if pending:
        on_line(pending)


def _podman_socket() -> str:
    """Where a podman service started by systemd (podman.socket) listens, for root and for a user."""
    if os.geteuid() == 0:
        return "unix:///run/podman/podman.sock"
    return f"unix://{os.environ.get('XDG_RUNTIME_DIR', f'/run/user/{os.getuid()}')}/podman/podman.sock"


def _image(ref: str, model) -> Image:
    return Image(
        ref=ref,
        id=model.id,
        env=tuple(model.attrs.get("Config", {}).get("Env") or ()),
        repo_digests=tuple(model.attrs.get("RepoDigests") or ()),
    )


def _short(error: Exception) -> str:
    """The engine's own explanation, else the system's reason a connection failed ("Connection refused")."""
    text = getattr(error, "explanation", None) or _os_reason(error) or str(error)
    return " ".join(str(text).split())[:300]


def _os_reason(error: BaseException) -> str | None:
    """The strerror of the OSError under the SDK's and requests' wrappers (in causes and arguments)."""
    stack: list[object] = [error]
    seen: set[int] = set()
    while stack:
        item = stack.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, OSError) and item.strerror:
            return item.strerror
        stack.extend((item.__cause__, item.__context__, *item.args))
    return None

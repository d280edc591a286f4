"""Distributed compilation on an existing sccache-dist cluster: where it is, whether it can work, and the
client configuration sccache reads.

gpuwheel schedules nothing itself. The sccache that already fronts every compiler (backends/sccache.py)
sends each compile it can to the cluster's scheduler, which picks a build server; sccache packages
the compiler (on Linux x86_64 it packs gcc with cc1plus/as/objcopy, and nvcc's own stages — cicc,
ptxas, cudafe++ — itself), ships it once per server and runs anything that fails remotely again
on this machine. What gpuwheel adds: the configuration (scheduler URL from --dist or $GPUWHEEL_DIST,
the client token from $GPUWHEEL_DIST_TOKEN, else from the keyring under service `gpuwheel-dist` and the
URL), a check that says in one line what is wrong, the job count sized to the cluster, and what really
ran where, read back from sccache's stats.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from gpuwheel.backends.sccache import DistStats, free_port, parse_dist_stats
from gpuwheel.errors import DistAuthRefused, DistConfigError, DistNoServers, DistToolchainMismatch, DistUnreachable
from gpuwheel.redact import has_password
from gpuwheel.run import capture

DIST_VARIABLE = "GPUWHEEL_DIST"
TOKEN_VARIABLE = "GPUWHEEL_DIST_TOKEN"
KEYRING_SERVICE = "gpuwheel-dist"  # `keyring set gpuwheel-dist http://sched:10600`: the user is the scheduler URL


@dataclass(frozen=True)
class Cluster:
    url: str  # the scheduler, http(s)://host:port, without credentials
    token: str = field(repr=False)  # the scheduler's client token: never shown, logged or put in a plan
    token_source: str = f"${TOKEN_VARIABLE}"  # where it came from, for messages: the variable or the keyring

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True)
class ClusterStatus:
    url: str
    servers: int
    cpus: int
    in_progress: int

    def __str__(self) -> str:
        return (
            f"{self.url}: {self.servers} build server{'s' if self.servers != 1 else ''}, {self.cpus} cores, "
            f"{self.in_progress} job{'s' if self.in_progress != 1 else ''} in progress"
        )


def cluster_from(url: str | None, environ: Mapping[str, str]) -> Cluster | None:
    """The cluster --dist or $GPUWHEEL_DIST names, with its token from $GPUWHEEL_DIST_TOKEN, else from the
    keyring (service gpuwheel-dist, user the URL); None when neither names one. DistConfigError names what
    is wrong and the fix."""
    url = (url or environ.get(DIST_VARIABLE) or "").strip()
    if not url:
        return None
    parts = urlsplit(url)
    if has_password(url) or parts.username:
        raise DistConfigError(
            f"--dist {parts.scheme}://{parts.hostname or ''}…: the URL carries credentials",
            hint=f"put the scheduler's client token in ${TOKEN_VARIABLE} or the keyring "
            f"(keyring set {KEYRING_SERVICE} URL), not in the URL",
        )
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/"):
        raise DistConfigError(
            f"--dist {url!r} is no scheduler URL",
            hint="give http(s)://HOST:PORT of the sccache-dist scheduler, e.g. http://10.0.0.5:10600",
        )
    url = url.rstrip("/")
    token = environ.get(TOKEN_VARIABLE, "").strip()
    if token:
        return Cluster(url, token)
    token, why_not = _keyring_token(url)
    if not token:
        raise DistConfigError(
            f"--dist {url}: no client token in ${TOKEN_VARIABLE} or the keyring ({why_not})",
            hint=f"set ${TOKEN_VARIABLE} to the token of the scheduler's [client_auth], or "
            f"store it: keyring set {KEYRING_SERVICE} {url}",
        )
    return Cluster(url, token, token_source=f"the keyring ({KEYRING_SERVICE}, {url})")


def _keyring_token(url: str) -> tuple[str, str]:
    """The token the keyring holds for this scheduler, or "" and why there is none (never the token)."""
    import keyring
    from keyring.errors import KeyringError

    backend = type(keyring.get_keyring())
    name = f"{backend.__module__}.{backend.__qualname__}"
    try:
        token = (keyring.get_password(KEYRING_SERVICE, url) or "").strip()
    except KeyringError as error:  # no usable backend, a locked one: say which, as keyring does
        return "", f"{name} could not be read: {_first_line(error)}"
    return (token, "") if token else ("", f"{name} holds none for {KEYRING_SERVICE} {url}")


def check_cluster(cluster: Cluster, *, timeout: float = 10) -> ClusterStatus:
    """Ask the scheduler for its status and whether it takes our token; one error per kind of failure."""
    import requests

    fix = f"check --dist / ${DIST_VARIABLE} and that the scheduler runs and is reachable from here"
    try:
        answer = requests.get(
            f"{cluster.url}/api/v1/scheduler/status", headers={"Accept": "application/json"}, timeout=timeout
        )
    except requests.RequestException as error:
        raise DistUnreachable(f"the scheduler {cluster.url} is unreachable: {_first_line(error)}", hint=fix) from None
    try:
        if answer.status_code != 200:
            raise ValueError(answer.status_code)
        body = answer.json()
        status = ClusterStatus(cluster.url, int(body["num_servers"]), int(body["num_cpus"]), int(body["in_progress"]))
    except (ValueError, KeyError, TypeError):
        raise DistUnreachable(
            f"{cluster.url} answered HTTP {answer.status_code} with no scheduler status: not an sccache-dist scheduler",
            hint=fix,
        ) from None
    # The status is open to anyone; allocating a job needs the token. An empty request body is refused
    # after the token was checked (400) and before any job exists, so nothing is allocated here.
    try:
        probe = requests.post(
            f"{cluster.url}/api/v1/scheduler/alloc_job",
            headers={"Authorization": f"Bearer {cluster.token}"},
            data=b"",
            timeout=timeout,
        )
    except requests.RequestException as error:
        raise DistUnreachable(
            f"the scheduler {cluster.url} stopped answering: {_first_line(error)}", hint=fix
        ) from None
    if probe.status_code == 401:
        raise DistAuthRefused(
            f"the scheduler {cluster.url} refused the client token in {cluster.token_source}",
            hint="set it to the token of the scheduler's [client_auth]",
        )
    if probe.status_code != 400:
        raise DistUnreachable(
            f"the scheduler {cluster.url} answered HTTP {probe.status_code} to a job request "
            f"without one: not the sccache-dist protocol gpuwheel knows",
            hint=fix,
        )
    if status.servers == 0:
        raise DistNoServers(
            f"the scheduler {cluster.url} has no build servers",
            hint="start sccache-dist servers with this scheduler_url (they need bubblewrap and root)",
        )
    return status


def client_config_text(cluster: Cluster, cache_dir: str) -> str:
    """sccache's client configuration for the cluster (it holds the token: never log or keep it). cache_dir
    is where sccache keeps the compilers it packed for the servers, as the sccache server sees it."""
    # rewrite_includes_only: sccache ships gcc's `-fdirectives-only` output, macros unexpanded. Fully
    # preprocessed source (the default) compiles to other DWARF columns than the source does, and
    # the wheel then differs from a local build's (seen: .debug_line of the fixture's module.cpp).
    return (
        f"[dist]\nscheduler_url = {json.dumps(cluster.url)}\ncache_dir = {json.dumps(cache_dir)}\n"
        f"toolchains = []\nrewrite_includes_only = true\n"
        f'[dist.auth]\ntype = "token"\ntoken = {json.dumps(cluster.token)}\n'
    )


@contextmanager
def client_config(cluster: Cluster, cache_dir: Path) -> Iterator[Path]:
    """client_config_text in a private file that exists only while the block runs. The packaged toolchains
    stay in cache_dir: sccache packs a compiler once (seconds to a minute for nvcc's stages) and reuses
    the archive while the compiler is unchanged."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with private_file("sccache.conf", client_config_text(cluster, str(cache_dir))) as path:
        yield Path(path)


@contextmanager
def private_file(name: str, text: str) -> Iterator[str]:
    """text in a file of this user's alone (mode 0600 in a 0700 folder), removed when the block ends: what
    holds a cluster's token on this machine, for as long as a command needs to read it."""
    folder = Path(tempfile.mkdtemp(prefix="gpuwheel-dist-"))  # mode 0700
    try:
        path = folder / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        yield str(path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def require_remote(stats: DistStats, what: str, cluster: Cluster, log: Path) -> None:
    """A trial compile that did not run on the cluster, whole: the servers cannot run our packaged compiler."""
    if stats.remote_total == 0 or stats.fallbacks:
        reason = _dist_reason(log)
        raise DistToolchainMismatch(
            f"{what} did not run on the cluster {cluster.url}: {stats.remote_total} stages "
            f"ran there, {stats.fallbacks} failed there and ran locally"
            + (f"; sccache said: {reason}" if reason else ""),
            hint="the build servers must run Linux on this machine's architecture: sccache "
            "packs this machine's compiler for them",
        )


# The smallest sources each compiler must build on the cluster: a C++ TU, and a kernel for nvcc,
# whose cicc, ptxas, cudafe++ and host-compiler stages sccache sends out one by one.
_TRIALS = {
    "cpp": "int twice(int x) { return 2 * x; }\n",
    "cu": "__global__ void twice(float *x) { x[threadIdx.x] *= 2; }\n",
}


def trial_compiles(
    cluster: Cluster, sccache: str, compilers: Mapping[str, list[str]], cache_dir: Path
) -> dict[str, DistStats]:
    """Compile a trial source per compiler (name → argv before the source, suffix by name: `nvcc` gets .cu)
    through a private sccache server on this cluster, bypassing its cache: where did each one run?
    DistToolchainMismatch when one did not run on the cluster."""
    results: dict[str, DistStats] = {}
    with tempfile.TemporaryDirectory(prefix="gpuwheel-dist-check-") as work, client_config(cluster, cache_dir) as conf:
        log = Path(work) / "sccache.log"
        env = {
            **os.environ,
            "SCCACHE_CONF": str(conf),
            "SCCACHE_DIR": str(Path(work) / "cache"),
            "SCCACHE_SERVER_PORT": str(free_port()),
            "SCCACHE_IDLE_TIMEOUT": "0",
            "SCCACHE_RECACHE": "1",
            "SCCACHE_ERROR_LOG": str(log),
            "SCCACHE_LOG": "info",
        }
        started = capture([sccache, "--start-server"], env=env)
        if started.returncode != 0:
            raise DistConfigError(f"sccache did not start: {(started.stderr or started.stdout).strip()[:200]}")
        try:
            for name, argv in compilers.items():
                suffix = "cu" if Path(argv[0]).name == "nvcc" else "cpp"
                source = Path(work) / f"{name}.{suffix}"
                source.write_text(_TRIALS[suffix], encoding="utf-8")
                before = parse_dist_stats(capture([sccache, "--show-stats", "--stats-format=json"], env=env).stdout)
                done = capture([sccache, *argv, "-c", str(source), "-o", str(source.with_suffix(".o"))], env=env)
                if done.returncode != 0:
                    raise DistToolchainMismatch(
                        f"{name} ({argv[0]}) did not compile a trial source even locally: "
                        f"{(done.stderr or done.stdout).strip()[:200]}",
                        hint="check the compiler on this machine first",
                    )
                after = parse_dist_stats(capture([sccache, "--show-stats", "--stats-format=json"], env=env).stdout)
                results[name] = _difference(after, before)
                require_remote(results[name], f"{name} ({argv[0]})", cluster, log)
        finally:
            capture([sccache, "--stop-server"], env=env)
    return results


def _difference(after: DistStats, before: DistStats) -> DistStats:
    earlier = dict(before.remote)
    return DistStats(
        tuple((s, n - earlier.get(s, 0)) for s, n in after.remote if n > earlier.get(s, 0)),
        after.fallbacks - before.fallbacks,
    )


def _dist_reason(log: Path) -> str:
    """The last line of sccache's own log that says why a compile was not distributed."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    said = [line for line in lines if "dist" in line.lower() and any(w in line.lower() for w in ("error", "fail"))]
    return said[-1].split("] ", 1)[-1][:300] if said else ""


def _first_line(error: BaseException) -> str:
    """requests' message nests urllib3's: name the cause a user can act on, where it is one we know."""
    text = str(error)
    for cause in (
        "Connection refused",
        "timed out",
        "Name or service not known",
        "No route to host",
        "Network is unreachable",
        "certificate verify failed",
        "Temporary failure in name resolution",
    ):
        if cause.lower() in text.lower():
            return cause
    return f"{type(error).__name__}: {(text.strip().splitlines() or [''])[0][:160]}"

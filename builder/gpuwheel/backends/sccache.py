"""sccache, the compile cache every build runs its compilers through: the variables that put it in
front of the compilers, a free port for a build's own server, and what its stats say (cache hits and,
with an sccache-dist cluster, the compiles each build server ran)."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int

    @property
    def requests(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    def __str__(self) -> str:
        return (
            f"{self.hits}/{self.requests} compile-cache hits ({self.hit_rate:.0%})"
            if self.requests
            else "no cacheable compiles"
        )


@dataclass(frozen=True)
class DistStats:
    """What sccache's client says ran where: compiles per build server, and those that failed there
    and ran again on this machine."""

    remote: tuple[tuple[str, int], ...]  # (server address, compiles), sorted
    fallbacks: int

    @property
    def remote_total(self) -> int:
        return sum(count for _, count in self.remote)

    def __str__(self) -> str:
        where = ", ".join(f"{server} {count}" for server, count in self.remote) or "none"
        text = f"{self.remote_total} compiles on the cluster ({where})"
        if self.fallbacks:
            text += f"; {self.fallbacks} failed there and ran locally instead (sccache's fallback)"
        return text

    def to_json(self) -> dict:
        return {"remote": dict(self.remote), "fallbacks": self.fallbacks}


def compile_cache_env(cache_dir: str) -> dict[str, str]:
    """Variables that put sccache in front of nvcc and the C++ compiler, for CMake and torch builds."""
    return {
        "SCCACHE_DIR": cache_dir,
        "SCCACHE_IDLE_TIMEOUT": "0",  # the backend stops the server itself after each package
        "SCCACHE_CACHE_SIZE": "50G",
        # vLLM (CMake)
        "CMAKE_C_COMPILER_LAUNCHER": "sccache",
        "CMAKE_CXX_COMPILER_LAUNCHER": "sccache",
        "CMAKE_CUDA_COMPILER_LAUNCHER": "sccache",
        # flash-attn: torch's BuildExtension writes ninja rules calling $PYTORCH_NVCC (and, from
        # torch 2.12, puts an sccache found on PATH before the C++ compiler by itself). CXX stays
        # the bare compiler: torch checks its name and version against the CUDA toolkit.
        "PYTORCH_NVCC": "sccache nvcc",
        # nvcc's -MD dependency output makes sccache refuse to cache the compile.
        "TORCH_EXTENSION_SKIP_NVCC_GEN_DEPENDENCIES": "1",
    }


def parse_cache_stats(text: str) -> CacheStats:
    """Hits and misses from `sccache --show-stats --stats-format=json`."""
    try:
        stats = json.loads(text)["stats"]
    except (ValueError, KeyError, TypeError):
        return CacheStats(0, 0)
    hits = sum(stats.get("cache_hits", {}).get("counts", {}).values())
    misses = sum(stats.get("cache_misses", {}).get("counts", {}).values())
    return CacheStats(hits, misses)


def parse_dist_stats(text: str) -> DistStats:
    """Compiles per server and fallbacks from `sccache --show-stats --stats-format=json`."""
    try:
        stats = json.loads(text)["stats"]
    except (ValueError, KeyError, TypeError):
        return DistStats((), 0)
    remote = stats.get("dist_compiles") or {}
    return DistStats(tuple(sorted((str(k), int(v)) for k, v in remote.items())), int(stats.get("dist_errors") or 0))


def free_port() -> int:
    """A port no one listens on now: each build's sccache server gets its own (stopping the default
    port's server would stop every other build's compile cache on this machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]

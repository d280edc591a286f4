"""Where gpuwheel keeps what it downloads and builds between runs: one root, one layout.

$GPUWHEEL_CACHE, else the user cache dir. Under it: sources/ (content-addressed downloads and
checkouts), toolchains/ (venvs per toolchain), compile/ (sccache/ccache), images/ (docker).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import platformdirs


def cache_root() -> Path:
    return Path(os.environ.get("GPUWHEEL_CACHE") or platformdirs.user_cache_dir("gpuwheel"))


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks (hashlib.file_digest needs Python 3.11)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

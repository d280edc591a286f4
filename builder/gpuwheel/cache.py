"""Where gpuwheel keeps what it downloads and builds between runs: one root, one layout.

$GPUWHEEL_CACHE, else the user cache dir (~/.cache/gpuwheel). Under it: sources/ (content-addressed
downloads and checkouts), trees/ (patched trees per plan), work/ (the local backend's build
directories), toolchains/ (venvs, and what each container image was found to hold), compile/
(sccache), raw/ (wheels before finishing), logs/ (per plan and package, images/ for image builds,
the podman service's). Container images live in the engine's own storage.
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

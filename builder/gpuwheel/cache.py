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
import shutil
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


def remove_inside(root: Path, path: Path) -> None:
    """Delete path (a tree, a file or a link), which must lie inside root: a link is removed, never
    what it points at.

    Names from recipes end up in cache paths and a cache can be tampered with: whatever a check
    upstream missed, a cleanup deletes nothing outside gpuwheel's own directories. A path outside
    root is a bug in gpuwheel, raised as such.
    """
    real_root = Path(os.path.realpath(root))
    parent = Path(os.path.realpath(Path(os.path.abspath(path)).parent))
    if parent != real_root and real_root not in parent.parents or Path(path).name in ("", ".", ".."):
        raise RuntimeError(f"refusing to delete {path}: it is not inside {root}")
    target = parent / Path(path).name
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.is_dir():
        shutil.rmtree(target, ignore_errors=True)

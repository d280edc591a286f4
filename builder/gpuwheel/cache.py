"""Where gpuwheel keeps what it downloads and builds between runs: one root, one layout.

$GPUWHEEL_CACHE, else the user cache dir (~/.cache/gpuwheel). Under it: sources/ (content-addressed
downloads and checkouts), trees/ (patched trees per plan), work/ (the local backend's build
directories), toolchains/ (venvs, and what each container image was found to hold), compile/
(sccache), raw/ (wheels before finishing), verify/ (`gpuwheel verify`'s rebuilds), locks/ (one per
target being built), logs/ (per plan and package, images/ for image builds, the podman service's).
Container images live in the engine's own storage.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import platformdirs
from filelock import FileLock, Timeout

from gpuwheel.errors import StorageError
from gpuwheel.log import say


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


def copy_tree(source: Path, dest: Path, *, ignore=None) -> None:
    """shutil.copytree, links kept as links; a failure is one line, not shutil.Error's list.

    copytree goes on past a file it cannot copy and raises at the end with every failure: on a
    full disk, thousands of them, and a traceback. The first says why.
    """
    try:
        shutil.copytree(source, dest, symlinks=True, ignore=ignore)
    except shutil.Error as error:
        failures = error.args[0] if error.args and isinstance(error.args[0], list) else []
        why = failures[0][2] if failures else str(error)
        more = f" (+{len(failures) - 1} more files)" if len(failures) > 1 else ""
        raise StorageError(
            f"copying {source} to {dest} failed: {why}{more}",
            hint="free space there, or set GPUWHEEL_CACHE to a disk with room",
        ) from None


@contextmanager
def target_lock(target: str) -> Iterator[None]:
    """Hold the target's lock: one build or finish of a target at a time on this machine.

    Two builds of one target share its patched trees, work dirs and staging folder; the second
    waits, saying for whom, rather than racing the first and dying half-way. The lock is flock's:
    a killed holder releases it, and the next holder cleans what it left (each stage sweeps its
    own temp names). `target` is a recipe's target name, checked at load to be a bare name.
    """
    locks = cache_root() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    lock, holder = FileLock(str(locks / f"target-{target}.lock")), locks / f"target-{target}.pid"
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            pid = holder.read_text().strip() or "?"
        except OSError:
            pid = "?"
        say(f"waiting for the other build of {target} on this machine (pid {pid}) to finish; lock {lock.lock_file}")
        lock.acquire()
    try:
        holder.write_text(str(os.getpid()))
        yield
    finally:
        lock.release()

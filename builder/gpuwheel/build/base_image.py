"""A base image made without any registry: debootstrap a minimal Debian and `docker import` it.

For machines that reach Debian's mirror and PyPI but no container registry. The image holds
the distribution's Python, venv and a C++ compiler; the toolchain image built on it adds torch
and the CUDA toolkit from pinned PyPI wheels (CUDA 13).
"""

from __future__ import annotations

import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gpuwheel.build.docker import engine
from gpuwheel.errors import ToolchainError
from gpuwheel.run import run

DEFAULT_TAG = "gpuwheel-base:bookworm"
# Python (with venv) and g++: what the toolchain image needs from the distribution.
PACKAGES = ("python3", "python3-venv", "python3-dev", "g++", "ca-certificates")


@dataclass(frozen=True)
class BaseImage:
    tag: str
    id: str
    suite: str
    log_path: Path


def make_base_image(*, tag: str = DEFAULT_TAG, suite: str = "bookworm", mirror: str | None = None,
                    log_path: Path) -> BaseImage:
    """debootstrap --variant=minbase SUITE with PACKAGES, imported into the engine as TAG."""
    client = engine()
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        raise ToolchainError("debootstrap is not installed", hint="apt-get install -y debootstrap")
    with tempfile.TemporaryDirectory(prefix="gpuwheel-rootfs-") as work:
        root = Path(work) / "root"
        argv = [debootstrap, "--variant=minbase", f"--include={','.join(PACKAGES)}", suite, str(root)]
        finished = run([*argv, *([mirror] if mirror else [])], log_path=log_path)
        if not finished.ok:
            last = next((line for line in reversed(finished.tail) if line.strip()), "")
            raise ToolchainError(f"debootstrap {suite} failed: {last}", hint=f"full output in {log_path}")
        (root / "var" / "cache" / "apt" / "archives").mkdir(parents=True, exist_ok=True)
        for deb in (root / "var" / "cache" / "apt" / "archives").glob("*.deb"):
            deb.unlink()  # downloaded packages: 100 MB the image does not need
        archive = Path(work) / "rootfs.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(root, arcname=".")
        repository, _, version = tag.partition(":")
        client.api.import_image_from_file(str(archive), repository=repository, tag=version or "latest",
                                          changes=["ENV LANG=C.UTF-8", 'CMD ["/bin/bash"]'])
    return BaseImage(tag=tag, id=client.images.get(tag).id, suite=suite, log_path=log_path)

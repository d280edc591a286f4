"""A base image made without any registry: debootstrap a minimal Debian and import it into the engine.

For machines that reach Debian's mirror and PyPI but no container registry. The image holds
the distribution's Python, venv and a C++ compiler; the toolchain image built on it adds torch
and the CUDA toolkit from pinned PyPI wheels (CUDA 13).
"""

from __future__ import annotations

import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gpuwheel.backends.engine import ContainerEngine, EngineChoice
from gpuwheel.backends.progress import BuildProgress
from gpuwheel.errors import ToolchainError
from gpuwheel.imageref import image_reference_problem
from gpuwheel.run import last_line, run

DEFAULT_TAG = "gpuwheel-base:bookworm"
# Python (with venv) and g++: what the toolchain image needs from the distribution.
PACKAGES = ("python3", "python3-venv", "python3-dev", "g++", "ca-certificates")
# debootstrap's stages ("I: Unpacking the base system..."), not its four lines per package (~90 packages).
_STAGES = re.compile(
    r"^I: (Retrieving InRelease|Resolving|Checking component|Installing|Unpacking (required|the base)|"
    r"Configuring (required|the base)|Base system)"
)


@dataclass(frozen=True)
class BaseImage:
    tag: str
    id: str
    suite: str
    engine: str  # e.g. "podman 4.3.1"
    log_path: Path


def make_base_image(
    engine: EngineChoice, *, tag: str = DEFAULT_TAG, suite: str = "bookworm", mirror: str | None = None, log_path: Path
) -> BaseImage:
    """debootstrap --variant=minbase SUITE with PACKAGES, imported into the engine as TAG."""
    problem = image_reference_problem(tag) or (
        "it holds a digest; give a NAME[:TAG]" if "@" in tag or tag.startswith("sha256:") else None
    )
    if problem:
        raise ToolchainError(f"--tag {tag!r} cannot name the new image: {problem}", hint=f"e.g. --tag {DEFAULT_TAG}")
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        raise ToolchainError("debootstrap is not installed", hint="apt-get install -y debootstrap")
    progress = BuildProgress()
    # The engine first: no one waits minutes for debootstrap to hear that it is not running.
    with ContainerEngine(engine) as connected, tempfile.TemporaryDirectory(prefix="gpuwheel-rootfs-") as work:
        root = Path(work) / "root"
        argv = [debootstrap, "--variant=minbase", f"--include={','.join(PACKAGES)}", suite, str(root)]
        with progress.activity(
            f"debootstrap {suite}",
            milestones=_STAGES,
            note=f"a minimal Debian with {', '.join(PACKAGES)} (a few minutes); log: {log_path}",
        ) as show:
            finished = run([*argv, *([mirror] if mirror else [])], log_path=log_path, on_line=show)
        if not finished.ok:
            raise ToolchainError(
                f"debootstrap {suite} failed: {last_line(finished.tail)}", hint=f"full output in {log_path}"
            )
        (root / "var" / "cache" / "apt" / "archives").mkdir(parents=True, exist_ok=True)
        for deb in (root / "var" / "cache" / "apt" / "archives").glob("*.deb"):
            deb.unlink()  # downloaded packages: 100 MB the image does not need
        with progress.activity(f"importing into {connected.description} as {tag}", milestones=_STAGES):
            archive = Path(work) / "rootfs.tar"
            with tarfile.open(archive, "w") as tar:
                tar.add(root, arcname=".")
            image = connected.import_rootfs(archive, tag, changes=["ENV LANG=C.UTF-8", 'CMD ["/bin/bash"]'])
    return BaseImage(tag=tag, id=image.id, suite=suite, engine=connected.description, log_path=log_path)

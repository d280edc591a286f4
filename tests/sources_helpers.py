"""Builders for the sources and patches tests: real git repositories, hand-made (and hostile) archives,
patch sets, and the demo package entry of their recipes."""

from __future__ import annotations

import difflib
import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

FLASH_ATTN_SHA256 = "1e71dd64a9e0280e0447b8a0c2541bad4bf6ac65bdeaa2f90e51a9e57de0370d"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def git(*args: str, cwd: Path) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    return subprocess.run(["git", "-c", "protocol.file.allow=always", *args], cwd=cwd, env=env, check=True,
                          capture_output=True, text=True).stdout.strip()


def make_repos(root: Path) -> dict[str, str]:
    """A library repo and a project repo holding it as a submodule (file:// URLs), two commits each."""
    lib, project = root / "lib", root / "project"
    lib.mkdir(parents=True)
    git("init", "-q", "-b", "main", cwd=lib)
    (lib / "kernel.cu").write_text("// lib v1\n")
    git("add", ".", cwd=lib)
    git("commit", "-qm", "lib v1", cwd=lib)
    git("tag", "v1.0", cwd=lib)
    lib_v1 = git("rev-parse", "HEAD", cwd=lib)
    (lib / "kernel.cu").write_text("// lib v2\n")
    git("commit", "-qam", "lib v2", cwd=lib)
    project.mkdir()
    git("init", "-q", "-b", "main", cwd=project)
    (project / "setup.py").write_text("print('demo')\n")
    git("submodule", "add", "-q", f"file://{lib}", "third_party/lib", cwd=project)
    git("-C", "third_party/lib", "checkout", "-q", lib_v1, cwd=project)
    git("add", ".", cwd=project)
    git("commit", "-qm", "project v1 with lib v1", cwd=project)
    project_v1 = git("rev-parse", "HEAD", cwd=project)
    (project / "setup.py").write_text("print('demo 2')\n")
    git("commit", "-qam", "project v2", cwd=project)
    return {"lib": f"file://{lib}", "project": f"file://{project}", "lib_v1": lib_v1,
            "lib_v2": git("rev-parse", "HEAD", cwd=lib), "project_v1": project_v1}


def tarball(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def file_member(name: str, data: bytes = b"x\n") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def link_member(name: str, target: str, kind=tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def unified_diff(relpath: str, old: str, new: str) -> str:
    """A -p1 patch turning old into new for relpath, as `diff -u a/ b/` writes it."""
    lines = difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                 f"a/{relpath}", f"b/{relpath}")
    return "".join(lines)


def write_patch_set(directory: Path, patches: dict[str, str], options: dict[str, str] | None = None) -> Path:
    """patches/series + the patch files, in the order given."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, text in patches.items():
        (directory / name).write_text(text)
        lines.append(f"{name} {(options or {}).get(name, '')}".strip())
    (directory / "series").write_text("\n".join(lines) + "\n")
    return directory


def leftovers(cache: Path) -> list[str]:
    """Anything a fetch could leave half-written: temp names, empty or partial entries."""
    found = []
    for path in (cache / "sources").rglob("*") if (cache / "sources").exists() else ():
        if path.name.startswith(".tmp-") or path.name.endswith(".part"):
            found.append(str(path))
    for sub in ("archives", "trees", "git"):
        for entry in (cache / "sources" / sub).glob("*") if (cache / "sources" / sub).exists() else ():
            if entry.is_dir() and not any(entry.iterdir()):
                found.append(str(entry))
    return found


def stored(cache: Path) -> list[str]:
    """What the cache holds as sources (locks and tag records aside)."""
    return sorted(str(p.relative_to(cache)) for sub in ("archives", "trees", "git")
                  for p in (cache / "sources" / sub).glob("*") if (cache / "sources" / sub).exists())


def demo_package(source: dict, name: str = "demo", **fields) -> dict:
    """The [[package]] entry of a demo project 1.0 from `source`, with any further fields (for make_recipe)."""
    return {"name": name, "version": "1.0", "source": source, **fields}

"""Patch sets: `patches/<package>/<version>/series` lists NNNN-title.patch files in order.

A series line is `NNNN-title.patch [-pN] [tree=<dependency>]`: `tree=` applies the patch to one
of the package's pre-fetched dependency trees (e.g. vllm-flash-attn) instead of the package.
The plan reads each package's series here (its patches, hashed, are part of the plan's hash);
patches.py applies them.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from gpuwheel.errors import PatchError


@dataclass(frozen=True)
class PatchRef:
    name: str  # file name, e.g. 0001-fix-moe-permute-scale-index.patch
    path: Path
    sha256: str
    strip: int = 1  # -pN
    tree: str = ""  # "" = the package's own tree, else a dependency name


_SERIES_LINE = re.compile(r"^(?P<name>\S+\.(?:patch|diff))(?P<opts>(?:\s+\S+)*)\s*$")


def read_series(directory: Path, dependencies: tuple[str, ...] = ()) -> tuple[PatchRef, ...]:
    """The patches of a set, in series order, each hashed; raises PatchError on a bad series."""
    series = directory / "series"
    try:
        text = series.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise PatchError(
            f"{series}: not a text file (byte {error.start} is not UTF-8)",
            hint="a series lists one patch file name a line",
        ) from None
    except OSError as error:
        raise PatchError(f"{series}: cannot read: {error.strerror}") from None
    refs = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _SERIES_LINE.match(line)
        if not match:
            raise PatchError(f"{series}:{number}: '{line}' is not 'NNNN-title.patch [-pN] [tree=NAME]'")
        strip, tree = 1, ""
        for option in match["opts"].split():
            if re.fullmatch(r"-p\d", option):
                strip = int(option[2:])
            elif option.startswith("tree="):
                tree = option[5:]
                if tree not in dependencies:
                    known = ", ".join(dependencies) or "none"
                    raise PatchError(
                        f"{series}:{number}: tree={tree} is not a dependency of this package (dependencies: {known})"
                    )
            else:
                raise PatchError(f"{series}:{number}: unknown option '{option}'", hint="use -pN or tree=NAME")
        if "/" in match["name"] or "\\" in match["name"] or match["name"].startswith((".", "-")):
            raise PatchError(
                f"{series}:{number}: '{match['name']}' must be a file name in the patch set",
                hint=f"put the patch in {directory} and name it there without a path",
            )
        path = directory / match["name"]
        if not path.is_file():
            raise PatchError(f"{series}:{number}: {match['name']} does not exist in {directory}")
        refs.append(PatchRef(match["name"], path, hashlib.sha256(path.read_bytes()).hexdigest(), strip, tree))
    return tuple(refs)

"""The output layout: where each target's wheels, smoke report and static index live (docs/publish.md).

wheels/<target>/staging/        what the finish stage wrote, and smoke.json beside it
wheels/<target>/files/, simple/ the target's published static index
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TargetPaths:
    """Where a target's wheels live: built wheels in staging/, the published index beside them."""

    index_dir: Path  # wheels/<target>/: files/, simple/
    staging_dir: Path  # wheels/<target>/staging/: what the build stage wrote

    @property
    def smoke_report(self) -> Path:
        return self.staging_dir / "smoke.json"

    @property
    def simple_dir(self) -> Path:
        return self.index_dir / "simple"

    @property
    def index_url(self) -> str:
        return simple_url(self.index_dir)


def target_paths(target: str, root: Path = Path("wheels")) -> TargetPaths:
    """The one definition of where a target's staging wheels, smoke report and index live."""
    return TargetPaths(index_dir=root / target, staging_dir=root / target / "staging")


def simple_url(index_dir: Path) -> str:
    """The file:// URL pip takes as --index-url for a static index folder."""
    # absolute but not resolved: the `simple` symlink must stay in the URL so pip follows swaps
    return Path(os.path.abspath(index_dir / "simple")).as_uri()

"""What a publish did, per wheel: the value the publish stage returns and `--json` prints."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class PublishedWheel:
    """What happened to one wheel."""

    filename: str
    sha256: str
    action: str  # "published" | "skipped" (already there with the same sha256)
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class PublishReport:
    destination: str  # the index directory, or the repository URL (never with credentials)
    index_url: str  # what pip's --index-url takes to install from it
    wheels: tuple[PublishedWheel, ...]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

"""Where the files gpuwheel ships beside its code live: recipes/, patches/, dockerfiles/.

In a checkout (and an editable install) they are the repository's top-level folders, as the
design lays them out; a built wheel carries the same folders as package data under
gpuwheel/_shipped/ (pyproject's force-include), so an installed gpuwheel needs no checkout.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
PACKAGE_DATA = _PACKAGE / "_shipped"
CHECKOUT = _PACKAGE.parents[1]  # builder/gpuwheel → the repository root


def shipped_root() -> Path:
    """The folder holding recipes/, patches/ and dockerfiles/: the wheel's package data first."""
    return PACKAGE_DATA if (PACKAGE_DATA / "recipes").is_dir() else CHECKOUT


def shipped(name: str) -> Path:
    """One shipped folder: shipped('recipes'), shipped('dockerfiles')."""
    return shipped_root() / name


def from_checkout() -> bool:
    """True when gpuwheel runs from a checkout (or an editable install of one), not a built wheel."""
    return shipped_root() == CHECKOUT

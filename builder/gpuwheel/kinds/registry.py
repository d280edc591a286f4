"""Which kind builds a recipe's package: its `kind` key, else the kind named after the package
(flash-attn, vllm), else the generic kind."""

from __future__ import annotations

from gpuwheel.kinds import flash_attn, generic, vllm
from gpuwheel.kinds.base import Kind

KINDS: dict[str, Kind] = {kind.name: kind for kind in (generic.KIND, flash_attn.KIND, vllm.KIND)}
GENERIC = generic.KIND.name


def default_kind(package: str) -> str:
    """The kind of a package whose recipe entry has no `kind` key."""
    return package if package in KINDS else GENERIC


def get(name: str) -> Kind:
    """The kind of that name; recipe.py has checked the name when it loaded the recipe."""
    return KINDS[name]

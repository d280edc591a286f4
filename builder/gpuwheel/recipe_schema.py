"""The recipe format as a JSON Schema, derived from recipe.SCHEMA so the two never drift apart.

Editors validate and complete recipes with it: taplo (Even Better TOML) reads `#:schema FILE` at
the top of a TOML file, or a taplo.toml rule; `gpuwheel schema > recipe.schema.json` writes it.
Keys may come from a file a recipe extends, so the schema requires none of them: gpuwheel still
checks, with file:line, what the merged recipe lacks.
"""

from __future__ import annotations

from typing import Any

from gpuwheel.recipe import SCHEMA

_SCALARS: dict[str, dict[str, Any]] = {
    "string": {"type": "string"},
    "integer": {"type": "integer"},
    "boolean": {"type": "boolean"},
    "list of strings": {"type": "array", "items": {"type": "string"}},
    "list of integers": {"type": "array", "items": {"type": "integer"}},
    "boolean or list of strings": {"oneOf": [{"type": "boolean"}, {"type": "array", "items": {"type": "string"}}]},
}


def recipe_json_schema() -> dict[str, Any]:
    schema = _table("")
    schema.update(
        {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "title": "gpuwheel recipe",
            "description": "A target: GPU, toolchain pins and the packages to build (docs/recipes.md).",
        }
    )
    return schema


def _table(name: str) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for key, kind in SCHEMA[name].items():
        sub = f"{name}.{key}" if name else key
        if kind in _SCALARS:
            properties[key] = dict(_SCALARS[kind])
        elif kind == "array of tables":
            properties[key] = {"type": "array", "items": _table(sub) if sub in SCHEMA else {"type": "object"}}
        elif sub in SCHEMA:
            properties[key] = _table(sub)
        else:  # a free table of strings (env)
            properties[key] = {"type": "object", "additionalProperties": {"type": "string"}}
    return {"type": "object", "properties": properties, "additionalProperties": False}

"""Byte-identical wheels: the same plan built in two different directories (cache roots of different
lengths, so every embedded build path differs) gives wheels of the same sha256, compiled .so included."""

from __future__ import annotations

import re
import shutil
import zipfile
from pathlib import Path

import pytest

from build_helpers import PROJECT_ROOT, SHARED_CACHE, fixture_recipe

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH: these build CUDA code")


def _cache_root(directory: Path) -> Path:
    """A fresh cache (compile cache, trees, work, raw wheels) sharing the test cache's toolchain venvs
    and downloads: those are made once per machine, and hold no build path."""
    root = directory / "cache"
    root.mkdir(parents=True)
    for part in ("toolchains", "sources"):
        (SHARED_CACHE / part).mkdir(parents=True, exist_ok=True)
        (root / part).symlink_to(SHARED_CACHE / part)
    return root


def _build_twice(gpuwheel, monkeypatch, tmp_path: Path, *args: str, recipes: Path | None = None) -> list[dict]:
    built = []
    search = ("--recipes", recipes) if recipes else ()
    for place in (tmp_path / "a", tmp_path / "somewhere" / "much" / "deeper"):
        monkeypatch.setenv("GPUWHEEL_CACHE", str(_cache_root(place)))
        result = gpuwheel(*search, "build", *args, "--backend", "local", "--out", place / "out", "--json")
        assert result.exit_code == 0, result.stderr
        assert result.json()["reused"] is False
        built.append(result.json())
    return built


def _embedded_paths(wheel: Path, *roots: Path) -> list[str]:
    """The build directories named anywhere in the wheel's members."""
    needles = [re.escape(str(root).encode()) for root in roots]
    with zipfile.ZipFile(wheel) as archive:
        return [name for name in archive.namelist()
                if any(re.search(needle, archive.read(name)) for needle in needles)]


def test_the_fixture_built_in_two_directories_is_the_same_bytes(gpuwheel, monkeypatch, tmp_path, make_recipe):
    recipe = make_recipe(tmp_path, **fixture_recipe())

    first, second = _build_twice(gpuwheel, monkeypatch, tmp_path, str(recipe))

    [a], [b] = first["finished"]["wheels"], second["finished"]["wheels"]
    assert a["filename"] == b["filename"]
    with zipfile.ZipFile(a["path"]) as archive:  # the fixture has what nvcc names after the source's path
        assert any(b"_INTERNAL_" in archive.read(n) for n in archive.namelist() if n.endswith(".so"))
    assert _embedded_paths(Path(a["path"]), tmp_path) == []
    assert a["sha256"] == b["sha256"]


@pytest.mark.slow
def test_the_flash_attn_profile_built_in_two_directories_from_one_lock_is_the_same_bytes(gpuwheel, monkeypatch,
                                                                                         tmp_path):
    # The shipped recipes and patch sets copied, so that the lock is written beside the copy, not into
    # the checkout; both builds then take every input from that one lock.
    for part in ("recipes", "patches"):
        shutil.copytree(PROJECT_ROOT / part, tmp_path / "shipped" / part)
    recipes = tmp_path / "shipped" / "recipes"
    monkeypatch.setenv("GPUWHEEL_CACHE", str(SHARED_CACHE))
    locked = gpuwheel("--recipes", recipes, "lock", "rtx6000pro-cu13", "--only", "flash-attn")
    assert locked.exit_code == 0, locked.stderr
    assert (recipes / "rtx6000pro-cu13.lock").is_file()

    first, second = _build_twice(gpuwheel, monkeypatch, tmp_path, "--locked", "rtx6000pro-cu13", "--only",
                                 "flash-attn", recipes=recipes)

    [a], [b] = first["finished"]["wheels"], second["finished"]["wheels"]
    assert _embedded_paths(Path(a["path"]), tmp_path) == []
    assert a["sha256"] == b["sha256"], (a["path"], b["path"])

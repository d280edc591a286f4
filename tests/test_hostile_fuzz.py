"""Random names and paths through recipe → plan → fetch → publish (issue 11): whatever a recipe or a
wheel folder names, gpuwheel writes and deletes nothing outside its own roots (the cache, the wheels
and index folders it is given), and answers with an error line, never a traceback."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from unittest import mock

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from publish_helpers import make_wheel

# Spellings that have escaped a root before, or could: parents, absolute paths, drive letters,
# backslashes, markup, shell and glob characters, percent-escapes, option-like names.
HOSTILE = ["..", "../..", "../outside", "/", "/tmp", "~", "C:\\x", "..\\..", "a/../../b", "[/x]", "[old]", "*",
           "?", "$(touch x)", "%2e%2e", "-rf", "--upload-pack=touch x", ".", "", " ", "a\nb", "outside/../../x"]
names = st.one_of(st.sampled_from(HOSTILE),
                  st.text(alphabet=st.sampled_from("ab./\\-_[]~*%$:@ \t0"), min_size=1, max_size=12))

# Exit codes of user-facing errors (docs/errors.md); anything else is a bug.
EXPECTED = {0, 2, 3, 4, 5, 6, 10, 13, 15}


def _tree(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every entry under root: its type and, for files and links, what it holds or points at."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            found[str(path)] = (0, os.readlink(path).encode())
        elif path.is_file():
            found[str(path)] = (1, path.read_bytes())
        else:
            found[str(path)] = (2, None)
    return found


def _outside(universe: Path, roots: tuple[Path, ...]) -> dict:
    return {path: entry for path, entry in _tree(universe).items()
            if not any(Path(path) == root or root in Path(path).parents for root in roots)}


DEFAULTS = {"target": "t1", "package": "demo", "sdist": "demo-1.0.tar.gz", "patches": "patches",
            "dependency": "lib", "stand_in": "demo-1.0-py3-none-any.whl", "wheel": "demo"}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chosen=st.dictionaries(st.sampled_from(sorted(DEFAULTS)), names, max_size=3))
def test_no_name_makes_gpuwheel_write_outside_its_roots(gpuwheel, make_recipe, chosen):
    # A few fields hostile at a time, the others good: each value is met at the stage that uses it.
    values = {**DEFAULTS, **chosen}
    target, package, sdist, patches, dependency, stand_in, wheel = (
        values[key] for key in ("target", "package", "sdist", "patches", "dependency", "stand_in", "wheel"))
    with tempfile.TemporaryDirectory(prefix="gpuwheel-fuzz-") as scratch:
        universe = Path(scratch)
        # Dwelling among the roots: things a stray path could hit (a sibling, a parent's files).
        home = universe / "home" / "user"
        (home / "outside").mkdir(parents=True)
        (home / "outside" / "keep.txt").write_text("keep me\n")
        (universe / "x").write_text("a file named like a stray name\n")
        work = home / "work"
        cache, wheels, index = work / "cache", work / "wheels", work / "index"
        (work / "src").mkdir(parents=True)
        (work / "patches").mkdir()
        (work / "patches" / "series").write_text("")
        recipe = make_recipe(work, target={"name": target}, package=[{
            "name": package, "version": "1.0", "source": {"sdist": sdist, "sha256": "0" * 64}, "patches": patches,
            "stand_in": {"wheel": stand_in, "sha256": "0" * 64},
            "dependency": [{"name": dependency, "git": "https://gpuwheel-test.invalid/lib.git", "rev": "v1.0",
                            "src_dir_env": "LIB_SRC_DIR"}]}])
        make_wheel(wheels, "demo")
        if "/" not in wheel and wheel not in ("", ".", ".."):
            (wheels / f"{wheel}-1.0-py3-none-any.whl").write_bytes(b"not a zip")
        roots = (cache, wheels, index)
        before = _outside(universe, roots)

        env = {"GPUWHEEL_CACHE": str(cache), "GPUWHEEL_OFFLINE": "1", "HOME": str(home)}
        with mock.patch.dict(os.environ, env):
            cwd = os.getcwd()
            os.chdir(work)  # default folders (wheels/<target>/) are relative to it
            try:
                results = [gpuwheel("plan", recipe, "--json"), gpuwheel("fetch", recipe),
                           gpuwheel("publish", recipe, "--wheels", wheels, "--index-dir", index, "--force")]
            finally:
                os.chdir(cwd)
        event(f"exit codes {[r.exit_code for r in results]}")
        for result in results:
            assert result.exit_code in EXPECTED, result.stderr
            assert "Traceback" not in result.stderr
        assert _outside(universe, roots) == before

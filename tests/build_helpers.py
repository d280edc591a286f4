"""Helpers for the build tests: the fixture recipe, a shared cache, and what a wheel carries."""

from __future__ import annotations

import os
import shutil
import textwrap
from pathlib import Path

from gpuwheel import facts
from gpuwheel.audit.report import AuditTarget, audit
from gpuwheel.recipe import PROJECT_ROOT, Toolchain

FIXTURE = Path(__file__).parent / "fixtures" / "cuda_ext"
# Toolchain venvs (5.5 GB, ~2 min to make) and docker images outlive one test run here.
SHARED_CACHE = Path(os.environ.get("GPUWHEEL_TEST_CACHE", PROJECT_ROOT / ".cache" / "tests"))


FIXTURE_TOOLCHAIN = Toolchain(cuda="13.0.2", python="3.11", torch="2.14.1")


def prepare_fixture_toolchain():
    """The pinned torch 2.14.1 (CUDA 13.0) venv, made once and kept in the shared test cache (skips
    without nvcc): for module-scoped fixtures of the build tests."""
    import pytest

    from gpuwheel.backends.local import LocalBackend

    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on PATH: the local build tests need the CUDA 13.0 toolkit")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GPUWHEEL_CACHE", str(SHARED_CACHE))
        return LocalBackend().prepare(FIXTURE_TOOLCHAIN, recipe_name="fixture.toml").info


def fixture_recipe(directory: Path, *, cuda: str = "13.0.2", torch: str = "2.14.1", archs: str = "9.0a;12.0",
                   env: dict[str, str] | None = None, base_image: str | None = None, name: str = "fixture") -> Path:
    """A recipe building tests/fixtures/cuda_ext for `archs` with the given pins."""
    env_table = "".join(f'{k} = "{v}"\n' for k, v in (env or {}).items())
    text = textwrap.dedent(f"""\
        [target]
        name = "{name}"
        compute_capability = "12.0"
        torch_cuda_arch_list = "{archs}"
        min_driver = "580.65.06"

        [toolchain]
        cuda = "{cuda}"
        python = "3.11"
        torch = "{torch}"
        """) + (f'base_image = "{base_image}"\n' if base_image else "") + textwrap.dedent(f"""
        [[package]]
        name = "gwfixture"
        version = "0.1.0"
        source = {{ path = "{FIXTURE}" }}
        """) + (f"[package.env]\n{env_table}" if env else "")
    path = directory / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


def fixture_wheel(out: Path) -> Path:
    """The one wheel a fixture build left in out, checked: its label, and SASS for both archs."""
    [wheel] = out.glob("*.whl")
    assert wheel.name.startswith("gwfixture-0.1.0+cu130.sm90a.sm120.torch214-cp311-cp311-")
    assert set(sass_archs(wheel)) == {"sm_90a", "sm_120"}
    return wheel


def sass_archs(wheel: Path) -> tuple[str, ...]:
    report = audit(wheel, AuditTarget(facts.parse_arch("12.0"), None))
    return tuple(arch for so in report.sos for arch in so.sass_archs)


def files_under(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")) if directory.exists() else []

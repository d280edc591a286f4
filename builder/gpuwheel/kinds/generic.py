"""The generic kind: any torch CUDA extension (setuptools with torch's cpp_extension, scikit-build-core
or CMake with torch's config) that compiles the archs of TORCH_CUDA_ARCH_LIST.

It knows nothing of a package: the recipe entry says the rest (its `env` for switches such as a
package's own force-build variable, a patch set where setup.py ignores TORCH_CUDA_ARCH_LIST). Its
smoke checks: every wheel's .so files load and its modules import (the runner's `wheel` group),
and a package with a check module of its own in smoke/ (smoke/probe.py PACKAGE_CHECKS) runs it.
"""

from __future__ import annotations

from pathlib import Path

from gpuwheel.kinds.base import Kind, SmokeGroup, arch_list_env
from gpuwheel.provenance import Provenance
from gpuwheel.smoke.probe import PACKAGE_CHECKS


def smoke_groups(
    project: str, provenance: Provenance | None, shared_objects: tuple[str, ...], work: Path
) -> tuple[SmokeGroup, ...]:
    if project not in PACKAGE_CHECKS:
        return ()
    return (SmokeGroup(project, {}, PACKAGE_CHECKS[project][2]),)


KIND = Kind(name="generic", build_env=arch_list_env, smoke_groups=smoke_groups)

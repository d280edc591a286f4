"""The publish stage: a target's wheels, gated by their audit and smoke report (gate.py), to the
target's static index (local.py) or to a remote index through twine (remote.py). docs/publish.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from gpuwheel.errors import PublishError, UsageError
from gpuwheel.layout import target_paths
from gpuwheel.publish.gate import PublishGate
from gpuwheel.publish.local import publish_local
from gpuwheel.publish.remote import publish_remote
from gpuwheel.publish.report import PublishReport
from gpuwheel.recipe import load_recipe
from gpuwheel.redact import has_password, safe_text
from gpuwheel.wheelfile import read_provenance, require_regular


def publish(
    target: str | None,
    *,
    wheels_dir: Path | None = None,
    repository: str | None = None,
    index_dir: Path | None = None,
    smoke_report: Path | None = None,
    force: bool = False,
    simple_url: str | None = None,
    config_file: Path | None = None,
    wheels_root: Path = Path("wheels"),
) -> PublishReport:
    """The `gpuwheel publish` stage: a target's wheels (staging/ or wheels_dir), gated by their audit
    and smoke report, to the target's static index or to `repository`.

    target is a recipe name or path; without it the wheels' gpuwheel.json must name one target.
    """
    if repository and has_password(repository):
        # A password on the command line is visible in ps and kept in shell history.
        raise PublishError(
            f"--repository {safe_text(repository)} carries a password; refused",
            hint="give the URL without it and set TWINE_USERNAME / TWINE_PASSWORD, or store "
            "the credentials in .pypirc or keyring",
        )
    if repository and index_dir is not None:
        raise UsageError("give --repository or --index-dir, not both")
    if not repository and (simple_url or config_file):
        raise UsageError(
            f"{'--simple-url' if simple_url else '--config-file'} is for --repository; the local index needs neither"
        )
    if target is None:
        if wheels_dir is None:
            raise UsageError("nothing to publish: name a TARGET or pass --wheels DIR")
        target = _target_named_by(wheels_in(wheels_dir))
    recipe = load_recipe(target)
    paths = target_paths(recipe.target.name, wheels_root)
    wheels_dir = Path(wheels_dir) if wheels_dir is not None else paths.staging_dir
    wheels = wheels_in(wheels_dir)
    gate = PublishGate(
        target=recipe.target.name,
        compute_capability=recipe.target.compute_capability,
        smoke_report=Path(smoke_report) if smoke_report else wheels_dir / "smoke.json",
        force=force,
    )
    if repository:
        return publish_remote(wheels, repository, gate=gate, simple_url=simple_url, config_file=config_file)
    return publish_local(wheels, Path(index_dir) if index_dir else paths.index_dir, gate=gate)


def wheels_in(directory: Path) -> list[Path]:
    """The wheels of a directory, sorted; an empty directory is an error, not a silent no-op."""
    found = sorted(p for p in Path(directory).glob("*.whl") if not p.name.startswith("."))
    if not found:
        raise PublishError(f"no wheels in {directory}", hint="build the target first, or pass --wheels DIR")
    for path in found:
        require_regular(path)
    return found


def _target_named_by(wheels: Sequence[Path]) -> str:
    """The one target the wheels' gpuwheel.json records name (read without hashing the wheels)."""
    named: dict[str, list[str]] = {}
    for path in wheels:
        provenance = read_provenance(path)
        target = provenance.target if provenance else None
        named.setdefault(target or "", []).append(path.name)
    if "" in named:
        raise PublishError(
            f"{named[''][0]} names no target (no readable gpuwheel.json)",
            hint="name the TARGET: gpuwheel publish TARGET --wheels DIR",
        )
    if len(named) > 1:
        raise PublishError(
            f"the wheels name {len(named)} targets ({', '.join(sorted(named))})",
            hint="publish one target at a time: gpuwheel publish TARGET --wheels DIR",
        )
    return next(iter(named))


__all__ = ["PublishGate", "PublishReport", "publish", "publish_local", "publish_remote", "wheels_in"]

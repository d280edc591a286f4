"""The publish gate: a wheel reaches a target's index only if its audit passed for the target
and its smoke report passed on a GPU of the target's compute capability.

Reads the two records the earlier stages leave, as the typed values those stages write (formats in
docs/publish.md):
- `<name>-<version>.dist-info/gpuwheel.json` inside the wheel, a `Provenance`: its target and audit;
- the smoke report (`smoke.json` beside the wheels), a `SmokeReport`: its target, the GPU it ran on,
  and each wheel's checks by file name and sha256.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gpuwheel import facts
from gpuwheel.errors import PublishError
from gpuwheel.provenance import PublishMark
from gpuwheel.smoke.report import FAIL, SmokeReport, SmokeReportFormatError, read_json
from gpuwheel.wheelfile import PROVENANCE_FILE, WheelFile, add_publish_mark, read_wheel


@dataclass(frozen=True)
class PublishGate:
    """What every wheel must have passed before it may be published for `target`."""

    target: str
    compute_capability: str  # the target GPU's, e.g. "9.0"
    smoke_report: Path | None  # None: no report exists, so nothing passed smoke
    force: bool = False  # publish anyway: a warning per wheel naming what was not checked, and a mark on it


@dataclass(frozen=True)
class Waiver:
    """What --force let through for one wheel: the gate's findings it published anyway."""

    audit: tuple[str, ...]  # why the audit check would refuse it
    smoke: tuple[str, ...]  # why the smoke check would: untested on the target GPU, or failed there

    @property
    def waived(self) -> bool:
        return bool(self.audit or self.smoke)

    def mark(self) -> PublishMark:
        """The `publish` entry of a force-published wheel's gpuwheel.json, repeated on the index pages."""
        return PublishMark(gpu_tested=not self.smoke, skipped_audit=self.audit, skipped_smoke=self.smoke)

    def warning(self, filename: str) -> str:
        """Exactly what --force let through for this wheel (or that it let nothing through)."""
        if not self.waived:
            return f"--force: {filename} passed the audit and the smoke checks; --force skipped nothing for it"
        marked = "not GPU-tested" if self.smoke else "force-published"
        return (
            f"--force: published {filename}, which the gate would have refused: "
            f"{'; '.join(self.audit + self.smoke)} (marked {marked} in its gpuwheel.json and the index)"
        )


def check_gate(wheels: Sequence[WheelFile], gate: PublishGate) -> dict[str, Waiver]:
    """Under force, what it waives per wheel filename; without, {} once every wheel passed.

    Raises PublishError naming every wheel that fails and why, unless gate.force.
    """
    smoke = _read_smoke_report(gate)
    found = {w.filename: Waiver(_audit_problems(w, gate), _smoke_problems(w, gate, smoke)) for w in wheels}
    if gate.force:
        return found
    refused = {name: waiver.audit + waiver.smoke for name, waiver in found.items() if waiver.waived}
    if refused:
        listed = " | ".join(f"{name}: {'; '.join(problems)}" for name, problems in refused.items())
        raise PublishError(
            f"refusing to publish {len(refused)} wheel(s) for target {gate.target}: {listed}",
            hint="run `gpuwheel audit` and `gpuwheel smoke` for the target, or pass --force",
        )
    return {}


def _same_arch(a: str, b: str) -> bool:
    try:
        return facts.parse_arch(a).plain == facts.parse_arch(b).plain
    except ValueError:
        return False


def _audit_problems(wheel: WheelFile, gate: PublishGate) -> tuple[str, ...]:
    record = f"{wheel.dist_info}/{PROVENANCE_FILE}"
    if wheel.provenance is None:
        return (f"not audited (no {record})",)
    audit = wheel.provenance.audit
    problems = []
    built_for = wheel.provenance.target
    if built_for != gate.target:
        problems.append(f"built for target {built_for!r}, not {gate.target!r} ({record})")
    if audit is None:
        return (*problems, f"not audited ({record} has no audit)")
    if not audit.passed:
        problems.append(f"audit failed ({record})")
    if not _same_arch(audit.arch, gate.compute_capability):
        problems.append(f"audited for arch {audit.arch or '?'}, target is {gate.compute_capability} ({record})")
    return tuple(problems)


def _read_smoke_report(gate: PublishGate) -> SmokeReport | str:
    """The report, or why there is none (a problem shared by every wheel)."""
    if gate.smoke_report is None:
        return "no smoke report"
    path = gate.smoke_report
    try:
        return read_json(path)
    except FileNotFoundError:
        return f"no smoke report ({path} does not exist)"
    except OSError as error:
        return f"smoke report {path} is unreadable ({error})"
    except SmokeReportFormatError as error:
        return str(error)  # names the file and the field


def _smoke_problems(wheel: WheelFile, gate: PublishGate, report: SmokeReport | str) -> tuple[str, ...]:
    if isinstance(report, str):
        return (report,)
    path = gate.smoke_report
    problems = []
    if report.target != gate.target:
        problems.append(f"smoke report {path} is for target {report.target!r}")
    # A smoke run without the target GPU skipped the GPU checks: untested there, which is not "failed".
    if not report.gpu_ran:
        problems.append(
            f"not smoke-tested on the target GPU ({report.gpu_skip_reason or 'GPU checks skipped'}; {path})"
        )
    elif report.gpu is None or not _same_arch(report.gpu.compute_capability, gate.compute_capability):
        name, ran_on = (report.gpu.name, report.gpu.compute_capability) if report.gpu else ("an unknown GPU", "")
        problems.append(
            f"smoke ran on {name} (compute capability {ran_on or '?'}), target is {gate.compute_capability} ({path})"
        )
    entries = [w for w in report.wheels if w.filename == wheel.filename]
    if not entries:
        return (*problems, f"not in smoke report {path}")
    tested = [w for w in entries if w.sha256 == wheel.sha256]
    if not tested:
        return (*problems, f"smoke report {path} tested another file of that name (sha256 differs)")
    if not any(report.wheel_passed(w) for w in tested):
        failed = sorted({c.name for w in tested for c in w.checks if c.status == FAIL})
        if failed or report.gpu_ran:
            problems.append(f"failed smoke{': ' + ', '.join(failed) if failed else ''} ({path})")
    return tuple(problems)


def read_all(paths: Iterable[Path]) -> list[WheelFile]:
    """Read each wheel once; the same file given twice counts once, two files of one name is an error."""
    by_name: dict[str, WheelFile] = {}
    for path in paths:
        wheel = read_wheel(path)
        seen = by_name.get(wheel.filename)
        if seen and seen.sha256 != wheel.sha256:
            raise PublishError(f"two different files named {wheel.filename}: {seen.path} and {wheel.path}")
        by_name.setdefault(wheel.filename, wheel)
    return list(by_name.values())


def admit(
    wheels: list[WheelFile], gate: PublishGate | None, scratch: Path
) -> tuple[list[WheelFile], dict[str, tuple[str, ...]]]:
    """The wheels to publish and the warnings per filename. A wheel --force lets through is published
    as a copy (written in scratch) whose gpuwheel.json says what was skipped and whether it was tested on
    the target GPU; the index pages repeat that mark."""
    waivers = check_gate(wheels, gate) if gate is not None else {}
    if not waivers:
        return wheels, {}
    published = [
        read_wheel(add_publish_mark(wheel, waivers[wheel.filename].mark(), scratch))
        if waivers[wheel.filename].waived
        else wheel
        for wheel in wheels
    ]
    return published, {name: (waiver.warning(name),) for name, waiver in waivers.items()}

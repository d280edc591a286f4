"""What a smoke run found, and the two files it leaves: smoke.json (read by the publish gate) and
JUnit XML (read by CI).

smoke.json (docs/smoke.md):
    {"target", "compute_capability", "gpu": {"name", "compute_capability"} | null, "gpu_checks": "ran" | "skipped",
     "gpu_skip_reason", "passed", "python", "torch", "index_url", "checks": [CHECK...],
     "wheels": [{"filename", "sha256", "project", "version", "passed", "checks": [CHECK...]}]}
    CHECK = {"name", "status": "pass" | "fail" | "skip", "detail", "seconds", "figures": {name: number}}

`passed` (the report's and each wheel's) means *passed on a GPU of the target's compute capability*:
a run whose GPU checks were skipped is never a pass, so the publish gate refuses its wheels.
"""

from __future__ import annotations

import json
import os
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PASS, FAIL, SKIP = "pass", "fail", "skip"


@dataclass(frozen=True)
class CheckResult:
    """One check: what ran, how it ended, why, how long, and what it measured (errors, TFLOP/s)."""

    name: str
    status: str  # pass | fail | skip
    detail: str
    seconds: float = 0.0
    figures: Mapping[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "detail": self.detail,
            "seconds": round(self.seconds, 3),
            "figures": dict(self.figures),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CheckResult:
        status = data.get("status")
        if status not in (PASS, FAIL, SKIP):
            return cls(str(data.get("name", "?")), FAIL, f"check reported status {status!r}")
        figures = {str(k): float(v) for k, v in dict(data.get("figures") or {}).items() if isinstance(v, (int, float))}
        return cls(str(data["name"]), status, str(data.get("detail", "")), float(data.get("seconds", 0.0)), figures)


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "9.0"


@dataclass(frozen=True)
class WheelSmoke:
    """The checks of one installed wheel, identified as the gate identifies it (file name + sha256)."""

    filename: str
    sha256: str
    project: str
    version: str
    checks: tuple[CheckResult, ...]

    @property
    def failed(self) -> bool:
        return any(check.status == FAIL for check in self.checks)


@dataclass(frozen=True)
class SmokeReport:
    target: str
    compute_capability: str  # the target's
    gpu: GpuInfo | None  # the GPU the checks saw; None: none
    gpu_skip_reason: str | None  # why the GPU checks did not run; None: they ran
    python: str  # the interpreter the checks ran in
    torch: str | None  # its torch version; None: not installed
    index_url: str  # where the wheels were installed from: the index, or the wheels directory
    checks: tuple[CheckResult, ...]  # about the environment (install, torch pin)
    wheels: tuple[WheelSmoke, ...]

    @property
    def gpu_ran(self) -> bool:
        return self.gpu_skip_reason is None

    @property
    def failed(self) -> bool:
        return any(check.status == FAIL for check in self.checks) or any(w.failed for w in self.wheels)

    def wheel_passed(self, wheel: WheelSmoke) -> bool:
        """Passed on the target GPU: nothing failed, in the wheel or its environment, and the GPU checks ran."""
        return self.gpu_ran and not wheel.failed and not any(c.status == FAIL for c in self.checks)

    @property
    def passed(self) -> bool:
        return bool(self.wheels) and all(self.wheel_passed(w) for w in self.wheels)

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "compute_capability": self.compute_capability,
            "gpu": {"name": self.gpu.name, "compute_capability": self.gpu.compute_capability} if self.gpu else None,
            "gpu_checks": "ran" if self.gpu_ran else "skipped",
            "gpu_skip_reason": self.gpu_skip_reason,
            "passed": self.passed,
            "python": self.python,
            "torch": self.torch,
            "index_url": self.index_url,
            "checks": [c.to_json() for c in self.checks],
            "wheels": [
                {
                    "filename": w.filename,
                    "sha256": w.sha256,
                    "project": w.project,
                    "version": w.version,
                    "passed": self.wheel_passed(w),
                    "checks": [c.to_json() for c in w.checks],
                }
                for w in self.wheels
            ],
        }


def write_json(report: SmokeReport, path: Path) -> None:
    _write_atomic(Path(path), (json.dumps(report.to_json(), indent=1) + "\n").encode())


def write_junit(report: SmokeReport, path: Path) -> None:
    """One <testsuite> for the environment and one per wheel; skip and failure carry their reason."""
    suites = ET.Element("testsuites", name=f"gpuwheel smoke {report.target}")
    groups = [("environment", report.checks)] + [(w.filename, w.checks) for w in report.wheels]
    for suite_name, checks in groups:
        suite = ET.SubElement(
            suites,
            "testsuite",
            name=suite_name,
            tests=str(len(checks)),
            failures=str(sum(c.status == FAIL for c in checks)),
            skipped=str(sum(c.status == SKIP for c in checks)),
            time=f"{sum(c.seconds for c in checks):.3f}",
        )
        for check in checks:
            case = ET.SubElement(suite, "testcase", classname=suite_name, name=check.name, time=f"{check.seconds:.3f}")
            if check.status == FAIL:
                ET.SubElement(case, "failure", message=check.detail).text = check.detail
            elif check.status == SKIP:
                ET.SubElement(case, "skipped", message=check.detail)
            if check.figures:
                ET.SubElement(case, "system-out").text = json.dumps(dict(check.figures))
    ET.indent(suites)
    _write_atomic(Path(path), ET.tostring(suites, encoding="utf-8", xml_declaration=True) + b"\n")


def _write_atomic(path: Path, data: bytes) -> None:
    """Readers (the publish gate, CI) see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise

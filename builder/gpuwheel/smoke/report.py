"""What a smoke run found, and the two files it leaves: smoke.json (read back by the publish gate,
`read_json`) and JUnit XML (read by CI).

smoke.json (docs/smoke.md):
    {"schema": 1, "target", "compute_capability", "gpu": {"name", "compute_capability"} | null,
     "gpu_checks": "ran" | "skipped", "gpu_skip_reason", "passed", "python", "torch", "index_url", "checks": [CHECK...],
     "wheels": [{"filename", "sha256", "project", "version", "passed", "checks": [CHECK...]}]}
    CHECK = {"name", "status": "pass" | "fail" | "skip", "detail", "seconds", "figures": {name: number}}

`passed` (the report's and each wheel's) means *passed on a GPU of the target's compute capability*:
a run whose GPU checks were skipped is never a pass, so the publish gate refuses its wheels.
`passed` and `gpu_checks` are written for readers; reading a report computes them again from the
checks, so a report cannot claim a pass its checks do not show.
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
# Raised when smoke.json changes in a way an older reader would misread; 1 is also what a report
# without the field (written before gpuwheel numbered it) is read as.
SCHEMA = 1


class SmokeReportFormatError(ValueError):
    """smoke.json is not a report this gpuwheel reads: the message names the field (read_json: and the file)."""


def _take(record: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str, *, nullable: bool = False):
    """record[key] when it has the JSON type `kind` (or is null, where nullable); else the error naming it."""
    if key not in record:
        raise SmokeReportFormatError(f"{where}{key} is missing")
    value = record[key]
    if value is None and nullable:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int in Python; a JSON true where a number belongs is still the wrong type
    if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
        raise SmokeReportFormatError(f"{where}{key} is {_json_type(value)}, not {_JSON_TYPES[kinds[0]]}")
    return value


_JSON_TYPES = {
    dict: "an object",
    list: "a list",
    str: "text",
    bool: "true or false",
    int: "a number",
    float: "a number",
}


def _json_type(value: Any) -> str:
    return "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)


def _objects(record: Mapping[str, Any], key: str, where: str) -> list[tuple[str, Mapping[str, Any]]]:
    """The objects listed under record[key], each with where it is ("checks[2].")."""
    items = _take(record, key, list, where)
    for number, item in enumerate(items):
        if not isinstance(item, dict):
            raise SmokeReportFormatError(f"{where}{key}[{number}] is {_json_type(item)}, not an object")
    return [(f"{where}{key}[{number}].", item) for number, item in enumerate(items)]


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
    def from_json(cls, data: Mapping[str, Any], where: str = "") -> CheckResult:
        """A check as to_json writes it and probe.py emits it. A status other than pass, fail or skip
        is a failure of that check, never a pass."""
        name, status, detail = (_take(data, key, str, where) for key in ("name", "status", "detail"))
        seconds = float(_take(data, "seconds", (int, float), where))
        figures = _take(data, "figures", dict, where)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in figures.values()):
            raise SmokeReportFormatError(f"{where}figures must map names to numbers")
        if status not in (PASS, FAIL, SKIP):
            return cls(name, FAIL, f"check reported status {status!r}", seconds)
        return cls(name, status, detail, seconds, {k: float(v) for k, v in figures.items()})


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "9.0"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "compute_capability": self.compute_capability}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "gpu.") -> GpuInfo:
        return cls(_take(data, "name", str, where), _take(data, "compute_capability", str, where))


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

    def to_json(self, passed: bool) -> dict[str, Any]:
        """passed: the report's verdict on this wheel (SmokeReport.wheel_passed), written for readers."""
        return {
            "filename": self.filename,
            "sha256": self.sha256,
            "project": self.project,
            "version": self.version,
            "passed": passed,
            "checks": [c.to_json() for c in self.checks],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str) -> WheelSmoke:
        return cls(
            filename=_take(data, "filename", str, where),
            sha256=_take(data, "sha256", str, where),
            project=_take(data, "project", str, where),
            version=_take(data, "version", str, where),
            checks=tuple(CheckResult.from_json(check, at) for at, check in _objects(data, "checks", where)),
        )


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
            "schema": SCHEMA,
            "target": self.target,
            "compute_capability": self.compute_capability,
            "gpu": self.gpu.to_json() if self.gpu else None,
            "gpu_checks": "ran" if self.gpu_ran else "skipped",
            "gpu_skip_reason": self.gpu_skip_reason,
            "passed": self.passed,
            "python": self.python,
            "torch": self.torch,
            "index_url": self.index_url,
            "checks": [c.to_json() for c in self.checks],
            "wheels": [w.to_json(self.wheel_passed(w)) for w in self.wheels],
        }

    @classmethod
    def from_json(cls, data: Any) -> SmokeReport:
        """A parsed smoke.json; SmokeReportFormatError names the first field that is wrong."""
        if not isinstance(data, dict):
            raise SmokeReportFormatError(f"the report is {_json_type(data)}, not a JSON object")
        schema = _take(data, "schema", int, "") if "schema" in data else SCHEMA
        if schema > SCHEMA:
            raise SmokeReportFormatError(
                f"schema {schema} is newer than this gpuwheel reads ({SCHEMA}): upgrade gpuwheel"
            )
        gpu = _take(data, "gpu", dict, "", nullable=True)
        return cls(
            target=_take(data, "target", str, ""),
            compute_capability=_take(data, "compute_capability", str, ""),
            gpu=GpuInfo.from_json(gpu) if gpu is not None else None,
            gpu_skip_reason=_take(data, "gpu_skip_reason", str, "", nullable=True),
            python=_take(data, "python", str, ""),
            torch=_take(data, "torch", str, "", nullable=True),
            index_url=_take(data, "index_url", str, ""),
            checks=tuple(CheckResult.from_json(check, at) for at, check in _objects(data, "checks", "")),
            wheels=tuple(WheelSmoke.from_json(wheel, at) for at, wheel in _objects(data, "wheels", "")),
        )


def write_json(report: SmokeReport, path: Path) -> None:
    _write_atomic(Path(path), (json.dumps(report.to_json(), indent=1) + "\n").encode())


def read_json(path: Path) -> SmokeReport:
    """The report a smoke run wrote to path. OSError when it cannot be read (FileNotFoundError: none
    there); SmokeReportFormatError, naming the file, when it is not a smoke report."""
    try:
        data = json.loads(Path(path).read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SmokeReportFormatError(f"smoke report {path} is not JSON ({error})") from None
    try:
        return SmokeReport.from_json(data)
    except SmokeReportFormatError as error:
        raise SmokeReportFormatError(f"smoke report {path}: {error}") from None


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

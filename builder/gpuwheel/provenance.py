"""gpuwheel.json, the record each finished wheel carries about itself (`<dist-info>/gpuwheel.json`).

The finish stage writes it, the publish gate and the smoke stage read it, and a force-publish adds
its `publish` mark. The sections code reads are typed records; the sections that state facts for
people (target_spec, toolchain, sources, patches) are kept as the JSON they are. Every section is
optional when read: a wheel finished by an older gpuwheel, or made by hand, carries only some, and
the gate refuses what is missing instead of guessing it. Format: docs/wheels.md, "gpuwheel.json".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Raised when the format changes in a way an older reader would misread; 1 is also what a record
# without the field (made by hand, or by the earliest gpuwheel) is read as.
SCHEMA = 1


class ProvenanceFormatError(ValueError):
    """gpuwheel.json holds a field of the wrong type, or comes from a newer schema (the message names it)."""


def _take(record: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any, where: str) -> Any:
    """record[key] when it has the JSON type `kind`; default when absent (or null where default is None)."""
    value = record.get(key)
    if key not in record or value is None and default is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int in Python; a JSON true where a number belongs is still the wrong type
    if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
        raise ProvenanceFormatError(f"{where}{key} is {type(value).__name__}, not {_kind_name(kinds)}")
    return value


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {dict: "an object", list: "a list", str: "text", bool: "true or false", int: "a number", float: "a number"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _texts(record: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    values = _take(record, key, list, [], where)
    if not all(isinstance(v, str) for v in values):
        raise ProvenanceFormatError(f"{where}{key} must list text")
    return tuple(values)


def _section(record: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    return _take(record, key, dict, None, "")


@dataclass(frozen=True)
class PackageRecord:
    name: str  # the plan's package name, e.g. flash-attn
    version: str  # the source version, e.g. 2.8.3
    wheel_version: str  # with the local label: 2.8.3+cu128.sm120.torch211
    label: str  # cu128.sm120.torch211
    filename: str

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> PackageRecord:
        return cls(
            *(
                _take(record, key, str, "", "package.")
                for key in ("name", "version", "wheel_version", "label", "filename")
            )
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class BuildRecord:
    build_type: str = ""
    profile: str | None = None  # flash-attn's inference / vLLM's serving profile, when one was built
    inference: Mapping[str, Any] | None = None
    serving: Mapping[str, Any] | None = None  # vLLM's serving profile: head_dims, dtypes, omit
    components: Mapping[str, Any] = field(default_factory=dict)
    command: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)  # the plan env, secrets masked
    env_excluded: tuple[str, ...] = ()  # scheduling variables left out of env (they change no byte)

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> BuildRecord:
        env = _take(record, "env", dict, {}, "build.")
        if not all(isinstance(value, str) for value in env.values()):
            raise ProvenanceFormatError("build.env must map names to text")
        return cls(
            build_type=_take(record, "build_type", str, "", "build."),
            profile=_take(record, "profile", str, None, "build."),
            inference=_take(record, "inference", dict, None, "build."),
            serving=_take(record, "serving", dict, None, "build."),
            components=_take(record, "components", dict, {}, "build."),
            command=_texts(record, "command", "build."),
            env=env,
            env_excluded=_texts(record, "env_excluded", "build."),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "build_type": self.build_type,
            "profile": self.profile,
            "inference": self.inference,
            "serving": self.serving,
            "components": dict(self.components),
            "command": list(self.command),
            "env": dict(self.env),
            "env_excluded": list(self.env_excluded),
        }


@dataclass(frozen=True)
class WheelRecord:
    raw_filename: str = ""  # what the build wrote, before auditwheel and the label
    platform_tags: tuple[str, ...] = ()
    graft_excluded: tuple[str, ...] = ()  # the library globs auditwheel was told never to graft
    grafted: tuple[str, ...] = ()  # the libraries it grafted (paths inside the wheel)
    source_date_epoch: int | None = None  # every entry's timestamp

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> WheelRecord:
        return cls(
            raw_filename=_take(record, "raw_filename", str, "", "wheel."),
            platform_tags=_texts(record, "platform_tags", "wheel."),
            graft_excluded=_texts(record, "graft_excluded", "wheel."),
            grafted=_texts(record, "grafted", "wheel."),
            source_date_epoch=_take(record, "source_date_epoch", int, None, "wheel."),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "raw_filename": self.raw_filename,
            "platform_tags": list(self.platform_tags),
            "graft_excluded": list(self.graft_excluded),
            "grafted": list(self.grafted),
            "source_date_epoch": self.source_date_epoch,
        }


@dataclass(frozen=True)
class AuditRecord:
    passed: bool = False
    arch: str = ""  # the compute capability audited for, e.g. "9.0"
    driver: str = ""  # the fleet driver the PTX was checked against
    optional_globs: tuple[str, ...] = ()
    allowed_failure: bool = False  # finished with --allow-audit-failure although it failed
    problems: tuple[str, ...] = ()
    sos: tuple[Mapping[str, Any], ...] = ()  # per .so with GPU code: verdict and archs

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> AuditRecord:
        sos = _take(record, "sos", list, [], "audit.")
        if not all(isinstance(so, dict) for so in sos):
            raise ProvenanceFormatError("audit.sos must list objects")
        return cls(
            passed=_take(record, "passed", bool, False, "audit."),
            arch=str(_take(record, "arch", (str, int, float), "", "audit.")),
            driver=_take(record, "driver", str, "", "audit."),
            optional_globs=_texts(record, "optional_globs", "audit."),
            allowed_failure=_take(record, "allowed_failure", bool, False, "audit."),
            problems=_texts(record, "problems", "audit."),
            sos=tuple(sos),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "arch": self.arch,
            "driver": self.driver,
            "optional_globs": list(self.optional_globs),
            "allowed_failure": self.allowed_failure,
            "problems": list(self.problems),
            "sos": [dict(so) for so in self.sos],
        }


@dataclass(frozen=True)
class PublishMark:
    """What `gpuwheel publish --force` let through for this wheel; the index pages repeat it."""

    gpu_tested: bool  # the smoke check passed on the target GPU (only the audit was waived)
    skipped_audit: tuple[str, ...]  # the audit findings the gate would have refused it for
    skipped_smoke: tuple[str, ...]
    forced: bool = True

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> PublishMark:
        skipped = _take(record, "skipped", dict, {}, "publish.")
        return cls(
            gpu_tested=_take(record, "gpu_tested", bool, False, "publish."),
            skipped_audit=_texts(skipped, "audit", "publish.skipped."),
            skipped_smoke=_texts(skipped, "smoke", "publish.skipped."),
            forced=_take(record, "forced", bool, False, "publish."),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "forced": self.forced,
            "gpu_tested": self.gpu_tested,
            "skipped": {"audit": list(self.skipped_audit), "smoke": list(self.skipped_smoke)},
        }


@dataclass(frozen=True)
class Provenance:
    """A wheel's gpuwheel.json. A section is None when the record lacks it."""

    target: str | None = None  # the recipe target it was built for
    plan_hash: str | None = None  # the plan it was built from (a finished wheel is reused by it)
    package: PackageRecord | None = None
    build: BuildRecord | None = None
    wheel: WheelRecord | None = None
    audit: AuditRecord | None = None
    publish: PublishMark | None = None
    # Facts for people, kept as written: the target's spec, the toolchain planned and observed, the
    # sources and patches (with their hashes).
    target_spec: Mapping[str, Any] | None = None
    toolchain: Mapping[str, Any] | None = None
    sources: tuple[Mapping[str, Any], ...] | None = None
    patches: tuple[Mapping[str, Any], ...] | None = None
    schema: int = SCHEMA

    @classmethod
    def from_json(cls, record: Any) -> Provenance:
        """Read a parsed gpuwheel.json; ProvenanceFormatError names the first field that is wrong."""
        if not isinstance(record, dict):
            raise ProvenanceFormatError(f"is {type(record).__name__}, not a JSON object")
        schema = _take(record, "schema", int, SCHEMA, "")
        if schema > SCHEMA:
            raise ProvenanceFormatError(f"has schema {schema}; this gpuwheel reads schema {SCHEMA} (upgrade gpuwheel)")
        sources, patches = (_take(record, key, list, None, "") for key in ("sources", "patches"))
        for key, items in (("sources", sources), ("patches", patches)):
            if items is not None and not all(isinstance(item, dict) for item in items):
                raise ProvenanceFormatError(f"{key} must list objects")
        sections = {key: _section(record, key) for key in ("package", "build", "wheel", "audit", "publish")}
        readers = {
            "package": PackageRecord,
            "build": BuildRecord,
            "wheel": WheelRecord,
            "audit": AuditRecord,
            "publish": PublishMark,
        }
        return cls(
            target=_take(record, "target", str, None, ""),
            plan_hash=_take(record, "plan_hash", str, None, ""),
            **{
                key: readers[key].from_json(value) if value is not None else None  # type: ignore[attr-defined]
                for key, value in sections.items()
            },
            target_spec=_section(record, "target_spec"),
            toolchain=_section(record, "toolchain"),
            sources=tuple(sources) if sources is not None else None,
            patches=tuple(patches) if patches is not None else None,
            schema=schema,
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON object written into the wheel; absent sections stay absent."""
        record: dict[str, Any] = {"schema": self.schema}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if item.name == "schema" or value is None:
                continue
            if hasattr(value, "to_json"):
                value = value.to_json()
            elif isinstance(value, tuple):
                value = [dict(v) for v in value]
            elif isinstance(value, Mapping):
                value = dict(value)
            record[item.name] = value
        return record

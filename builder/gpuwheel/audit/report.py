"""The arch audit: can every kernel unit of a wheel (or .so) run on the target GPU and driver?

Per fatbin unit: *native* (SASS the target runs), *JIT* (PTX the driver must compile: its ISA must be
one the target driver reads) or *none*. A .so fails when a unit needs JIT of too new a PTX ISA
(cudaErrorUnsupportedPtxVersion the moment that kernel runs), or when none of its units run on the
target (unless the recipe declares it arch-specific). A wheel fails when any of its .so fails.
"""

from __future__ import annotations

import fnmatch
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from packaging.version import Version

from gpuwheel import facts
from gpuwheel.audit.fatbin import FatbinUnit, PtxEntry, SassEntry, linked_cuda_runtime, map_file, read_fatbin
from gpuwheel.audit.members import ELF_MAGIC, read_so_members
from gpuwheel.errors import AuditInputError
from gpuwheel.limits import irregular_file
from gpuwheel.recipe import Recipe
from gpuwheel.wheelfile import escapes_root

NATIVE, JIT, NONE = "native", "jit", "none"


@dataclass(frozen=True)
class AuditTarget:
    """The GPU the code must run on and the oldest driver of the fleet (None: driver not checked)."""

    arch: facts.Arch
    min_driver: str | None
    optional_globs: tuple[str, ...] = ()  # .so paths in a wheel that may carry no code for this arch

    @classmethod
    def from_recipe(cls, recipe: Recipe, driver: str | None = None) -> AuditTarget:
        """The recipe's GPU and fleet driver (`driver` overrides it) and every package's optional globs."""
        globs = tuple(glob for package in recipe.packages for glob in package.audit_optional)
        return cls(facts.parse_arch(recipe.target.compute_capability), driver or recipe.target.min_driver, globs)

    def to_json(self) -> dict:
        return {"arch": self.arch.plain, "min_driver": self.min_driver, "optional_globs": list(self.optional_globs)}


@dataclass(frozen=True)
class UnitVerdict:
    """How the target runs one fatbin unit, and what is wrong with that if anything."""

    index: int
    offset: int
    verdict: str  # native | jit | none
    sass: tuple[str, ...]  # sm_90a, sm_120, ...
    ptx: tuple[str, ...]  # compute_80, compute_90a, ...
    ptx_isas: tuple[str, ...]  # the PTX ISA version of each of `ptx`, in the same order
    runs_as: str | None  # the entry the driver picks: sm_120 or compute_80
    ptx_isa: str | None = None  # for JIT: the ISA the driver must read
    jit_min_driver: str | None = None  # for JIT: oldest driver that reads it (None: unknown ISA)
    problem: str | None = None

    def to_json(self) -> dict:
        return {
            "index": self.index,
            "offset": self.offset,
            "verdict": self.verdict,
            "sass": list(self.sass),
            "ptx": list(self.ptx),
            "ptx_isas": list(self.ptx_isas),
            "runs_as": self.runs_as,
            "ptx_isa": self.ptx_isa,
            "jit_min_driver": self.jit_min_driver,
            "problem": self.problem,
        }


@dataclass(frozen=True)
class SoReport:
    """The verdicts for one ELF shared object (`path` is its path inside `wheel`, or on disk)."""

    path: str
    wheel: str | None
    units: tuple[UnitVerdict, ...]
    optional: bool  # matches one of the target's optional globs
    problems: tuple[str, ...]  # why it fails
    waived: tuple[str, ...] = ()  # what would fail it, were it not declared optional
    cuda_runtime: int | None = None  # N of the libcudart.so.N it links

    @property
    def has_gpu_code(self) -> bool:
        return bool(self.units)

    @property
    def passed(self) -> bool:
        return not self.problems

    def count(self, verdict: str) -> int:
        return sum(1 for unit in self.units if unit.verdict == verdict)

    @property
    def ptx_isa_range(self) -> str:
        isas = sorted({isa for unit in self.units for isa in unit.ptx_isas}, key=Version)
        return "" if not isas else isas[0] if len(isas) == 1 else f"{isas[0]}–{isas[-1]}"

    @property
    def sass_archs(self) -> tuple[str, ...]:
        return _sorted_names(name for unit in self.units for name in unit.sass)

    @property
    def ptx_archs(self) -> tuple[str, ...]:
        return _sorted_names(name for unit in self.units for name in unit.ptx)

    @property
    def verdict(self) -> str:
        """One word for the table: pass, fail, optional (no code for the target, allowed) or no GPU code."""
        if not self.has_gpu_code:
            return "no GPU code"
        if self.problems:
            return "fail"
        return "optional" if self.waived else "pass"

    @property
    def none_archs(self) -> tuple[str, ...]:
        """What the units with no code for the target carry (reported, not failed, beside runnable ones)."""
        return _sorted_names(name for unit in self.units if unit.verdict == NONE for name in (*unit.sass, *unit.ptx))

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "wheel": self.wheel,
            "verdict": self.verdict,
            "passed": self.passed,
            "optional": self.optional,
            "native": self.count(NATIVE),
            "jit": self.count(JIT),
            "none": self.count(NONE),
            "ptx_isa_range": self.ptx_isa_range,
            "sass_archs": list(self.sass_archs),
            "ptx_archs": list(self.ptx_archs),
            "none_archs": list(self.none_archs),
            "problems": list(self.problems),
            "waived": list(self.waived),
            "cuda_runtime": self.cuda_runtime,
            "units": [unit.to_json() for unit in self.units],
        }


@dataclass(frozen=True)
class WheelReport:
    """One wheel: its .so reports; it fails when any .so fails or none carries GPU code."""

    path: str
    sos: tuple[SoReport, ...]
    problems: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "passed": self.passed,
            "problems": list(self.problems),
            "sos": [so.path for so in self.sos],
        }


@dataclass(frozen=True)
class AuditReport:
    """Everything the audit found under one PATH: per wheel (when it read wheels) and per .so."""

    path: str
    target: AuditTarget
    wheels: tuple[WheelReport, ...]
    sos: tuple[SoReport, ...]
    problems: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return not self.problems

    @property
    def driver_checked(self) -> bool:
        return self.target.min_driver is not None

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "target": self.target.to_json(),
            "passed": self.passed,
            "driver_checked": self.driver_checked,
            "problems": list(self.problems),
            "wheels": [wheel.to_json() for wheel in self.wheels],
            "sos": [so.to_json() for so in self.sos],
        }


def audit(path: Path | str, target: AuditTarget) -> AuditReport:
    """Audit a wheel, a directory of wheels or one ELF .so against the target GPU and driver."""
    path = Path(path)
    if target.arch.suffix or target.arch.ptx:
        raise AuditInputError(
            f"target arch {target.arch} is not a GPU's compute capability; give one like {target.arch.plain}"
        )
    if target.min_driver is not None:
        try:
            facts.driver_tuple(target.min_driver)
        except ValueError as error:
            raise AuditInputError(f"driver {error}") from None
    if path.is_dir():
        wheel_paths = sorted(path.glob("*.whl"))
        for wheel_path in wheel_paths:
            _require_regular(wheel_path)
        if not wheel_paths:
            raise AuditInputError(
                f"{path}: no *.whl files in this directory; give a wheel, a directory of wheels or a .so"
            )
        wheels = _audit_wheels(wheel_paths, target)
        sos = tuple(so for wheel in wheels for so in wheel.sos)
        problems = tuple(problem for wheel in wheels for problem in wheel.problems)
        return AuditReport(str(path), target, wheels, sos, problems)
    _require_regular(path)
    if zipfile.is_zipfile(path):
        if path.suffix != ".whl":
            raise AuditInputError(
                f"{path}: a zip file but not a wheel (*.whl); give a wheel, a directory of wheels or a .so"
            )
        (wheel,) = _audit_wheels([path], target)
        return AuditReport(str(path), target, (wheel,), wheel.sos, wheel.problems)
    with open(path, "rb") as file:
        if file.read(4) != ELF_MAGIC:
            raise AuditInputError(
                f"{path}: neither a wheel nor an ELF shared object; give a wheel, a directory of wheels or a .so"
            )
        image = map_file(file)
    units = read_fatbin(image, str(path))
    so = _judge_so(str(path), None, units, linked_cuda_runtime(image, str(path)), target=target)
    problems = (
        so.problems
        if so.has_gpu_code
        else (f"{path}: carries no GPU code (no fatbin); nothing in it runs on {target.arch.plain}",)
    )
    return AuditReport(str(path), target, (), (so,), problems)


def _audit_wheels(paths: list[Path], target: AuditTarget) -> tuple[WheelReport, ...]:
    """Every wheel's names are checked before any member is read; then all their .so members are read at once."""
    candidates = {path: _so_candidates(path) for path in paths}
    code = read_so_members(candidates)
    reports = []
    for path, members in candidates.items():
        sos = [
            _judge_so(member.filename, path.name, *read, target=target)
            for member in members
            if (read := code[path, member.filename]) is not None
        ]
        problems = tuple(f"{path.name}: {problem}" for so in sos for problem in so.problems)
        if not any(so.has_gpu_code for so in sos):
            problems += (
                f"{path.name}: carries no GPU code (no .so with a fatbin among {len(sos)} ELF files); "
                f"nothing in it runs on {target.arch.plain}",
            )
        reports.append(WheelReport(str(path), tuple(sos), problems))
    return tuple(reports)


def _so_candidates(path: Path) -> list[zipfile.ZipInfo]:
    """The members named like shared objects, once the wheel's names are known to be safe and its
    dist-info is there."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError) as error:
        raise AuditInputError(f"{path}: not a readable wheel ({error})") from None
    for member in members:
        _refuse_unsafe_name(path, member.filename)
    if not any(_is_dist_info_metadata(member.filename) for member in members):
        raise AuditInputError(f"{path}: no *.dist-info/WHEEL in the archive; not a wheel")
    return [member for member in members if _looks_like_shared_object(member.filename)]


def _require_regular(path: Path) -> None:
    if why := irregular_file(path):
        raise AuditInputError(f"{path}: {why}; give a wheel, a directory of wheels or a .so")


def _refuse_unsafe_name(wheel: Path, name: str) -> None:
    if escapes_root(name):
        raise AuditInputError(
            f"{wheel}: member {name!r} would land outside the wheel's root (path traversal); refusing this wheel"
        )


def _is_dist_info_metadata(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return len(parts) == 2 and parts[0].endswith(".dist-info") and parts[1] == "WHEEL"


def _looks_like_shared_object(name: str) -> bool:
    base = PurePosixPath(name).name
    return base.endswith(".so") or ".so." in base


def _judge_so(
    path: str, wheel: str | None, units: tuple[FatbinUnit, ...], cuda_runtime: int | None = None, *, target: AuditTarget
) -> SoReport:
    verdicts = tuple(judge_unit(unit, target) for unit in units)
    optional = any(
        fnmatch.fnmatch(path, glob) or fnmatch.fnmatch(PurePosixPath(path).name, glob) for glob in target.optional_globs
    )
    problems = [f"{path}: unit {v.index}: {v.problem}" for v in verdicts if v.problem]
    if verdicts and not any(v.verdict in (NATIVE, JIT) for v in verdicts):
        carried = ", ".join(_sorted_names(name for v in verdicts for name in (*v.sass, *v.ptx)))
        problems.append(
            f"{path}: none of its {len(verdicts)} fatbin units runs on {target.arch.plain} "
            f"(it carries {carried}); build it for {target.arch.plain} or declare it audit-optional"
        )
    runtime_problem = _runtime_problem(cuda_runtime, target.min_driver)
    # No optional waiver for the runtime: such a library fails to load whichever GPU it is on.
    loads = (f"{path}: {runtime_problem}",) if runtime_problem else ()
    if optional:  # declared arch-specific: the library never dispatches to it on other GPUs
        return SoReport(path, wheel, verdicts, optional, loads, tuple(problems), cuda_runtime)
    return SoReport(path, wheel, verdicts, optional, (*loads, *problems), (), cuda_runtime)


def _runtime_problem(cuda_runtime: int | None, min_driver: str | None) -> str | None:
    """libcudart.so.N runs on any driver of CUDA N.0 or newer (minor-version compatibility)."""
    if cuda_runtime is None or min_driver is None:
        return None
    need = facts.CUDA_MIN_DRIVER.get(f"{cuda_runtime}.0")
    if need is None or facts.driver_tuple(min_driver) >= facts.driver_tuple(need):
        return None
    fits = facts.driver_max_cuda(min_driver)
    return (
        f"links libcudart.so.{cuda_runtime}, which needs driver ≥ {need} (target driver {min_driver}); "
        f"build with CUDA ≤ {fits}"
        if fits
        else f"links libcudart.so.{cuda_runtime}, which needs driver ≥ {need}"
    )


def judge_unit(unit: FatbinUnit, target: AuditTarget) -> UnitVerdict:
    """native / JIT / none for one unit on the target, with the problem a JIT verdict may carry."""
    sass = tuple(entry.name for entry in unit.sass)
    ptx = tuple(entry.name for entry in unit.ptx)
    isas = tuple(entry.isa for entry in unit.ptx)
    runnable = [entry for entry in unit.sass if sass_runs_on(entry, target.arch)]
    if runnable:
        best = max(runnable, key=lambda e: (e.arch, e.variant != ""))
        return UnitVerdict(unit.index, unit.offset, NATIVE, sass, ptx, isas, best.name)
    jittable = [entry for entry in unit.ptx if ptx_jits_on(entry, target.arch)]
    if not jittable:
        return UnitVerdict(unit.index, unit.offset, NONE, sass, ptx, isas, None)
    # The driver JITs the newest PTX that fits the GPU.
    newest = max(jittable, key=lambda e: (e.arch, e.variant != "", Version(e.isa)))
    min_driver = facts.ptx_isa_min_driver(newest.isa)
    return UnitVerdict(
        unit.index,
        unit.offset,
        JIT,
        sass,
        ptx,
        isas,
        newest.name,
        newest.isa,
        min_driver,
        _jit_problem(newest, min_driver, target.min_driver),
    )


def _jit_problem(entry: PtxEntry, min_driver: str | None, driver: str | None) -> str | None:
    if driver is None:
        return None
    if min_driver is None:
        return (
            f"{entry.name} needs JIT of PTX ISA {entry.isa}, which gpuwheel's facts do not know; "
            f"cannot tell whether driver {driver} reads it"
        )
    if facts.driver_tuple(driver) < facts.driver_tuple(min_driver):
        return (
            f"PTX ISA {entry.isa} cannot be JIT-compiled by driver {driver} (reads up to "
            f"{facts.driver_max_ptx_isa(driver) or 'none known'}; {entry.name} needs driver ≥ {min_driver}): "
            "build native SASS for the target or use a toolkit no newer than the driver"
        )
    return None


def sass_runs_on(entry: SassEntry, gpu: facts.Arch) -> bool:
    """Plain SASS runs on its arch and later minors of its major; `a` only on its arch; `f` within its family."""
    if entry.variant == "a":
        return (entry.major, entry.minor) == (gpu.major, gpu.minor)
    # Plain and family SASS alike: same major, GPU minor ≥ code minor (sm_100f runs on 10.0 and 10.3).
    return entry.major == gpu.major and entry.minor <= gpu.minor


def ptx_jits_on(entry: PtxEntry, gpu: facts.Arch) -> bool:
    """Plain PTX JITs for any GPU of its arch or newer; `a`/`f` PTX only where their SASS would run."""
    if entry.variant:
        return sass_runs_on(SassEntry(entry.arch, entry.variant), gpu)
    return entry.arch <= gpu.number


def _sorted_names(names) -> tuple[str, ...]:
    def key(name: str) -> tuple:
        digits = "".join(ch for ch in name if ch.isdigit())
        return (int(digits) if digits else 0, name)

    return tuple(sorted(set(names), key=key))

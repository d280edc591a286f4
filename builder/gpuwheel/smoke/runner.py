"""The smoke stage: install a target's wheels from an index into a smoke interpreter and run the checks
there, on the target GPU when there is one.

1. The index: `index_url`, or a throwaway static index made (gpuwheel.static_index) from the wheels of
   `wheels_dir` (default: the target's staging/).
2. The interpreter: a fresh venv, or `python` (one that already holds the pinned torch, as on a GPU
   machine without network; the wheels then go into a private --target directory, --no-deps).
3. The target's wheels are downloaded from that index alone (pip's own configuration and PIP_* index
   variables are set aside, so no other index can supply a package of the same name), then installed;
   their dependencies and the pinned torch come from pip's configured index.
4. Checks: host side, the audit says the GPU's compute capability is covered natively; in the
   interpreter (probe.py), every .so loads against the installed torch and the modules import; on the
   target GPU, each package's kernels run at the users' crashing shapes: the groups its kind names
   (gpuwheel.kinds; check modules flash_attn.py, vllm.py, causal_conv1d.py).

No GPU, or a GPU of another compute capability, skips the GPU checks with the reason, and the report
is then not a pass (see report.py): the publish gate refuses wheels that did not pass on the target.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from gpuwheel import facts
from gpuwheel.audit.report import JIT, NATIVE, AuditTarget, audit
from gpuwheel.errors import SmokeFailure, UsageError
from gpuwheel.kinds import registry
from gpuwheel.kinds.base import Kind
from gpuwheel.layout import simple_url, target_paths
from gpuwheel.log import logger, pip_milestones, say
from gpuwheel.recipe import load_recipe
from gpuwheel.run import Finished, capture, run
from gpuwheel.smoke.report import (
    FAIL,
    PASS,
    SKIP,
    CheckResult,
    GpuInfo,
    SmokeReport,
    WheelSmoke,
    write_json,
    write_junit,
)
from gpuwheel.static_index import add_wheels
from gpuwheel.wheelfile import WheelFile, read_wheel

PROBE = Path(__file__).with_name("probe.py")
# Ways pip is pointed at other indexes; set aside while the target's wheels are downloaded.
_PIP_INDEX_VARIABLES = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX", "PIP_CONFIG_FILE")
PIP_TIMEOUT = 1800  # a fresh venv may download torch and vLLM's dependencies
GPU_GROUP_TIMEOUT = 1200


@dataclass(frozen=True)
class _Interpreter:
    python: str
    env: Mapping[str, str]  # with PYTHONPATH on the private --target directory, when there is one
    target_dir: Path | None  # where --python installs go
    described: str  # for the report: the interpreter given, or "a fresh venv of <base>"


def run_smoke(
    target_or_recipe: str | os.PathLike,
    *,
    index_url: str | None = None,
    wheels_dir: Path | None = None,
    python: str | None = None,
    junit: Path | None = None,
    json_out: Path | None = None,
) -> SmokeReport:
    """Install the target's wheels from an index and run the smoke checks; write smoke.json
    (json_out, default: smoke.json beside the wheels, or the target's staging/ for --index) and
    JUnit XML (junit) and return the report. Failing checks do not raise: the caller decides."""
    if index_url is not None and wheels_dir is not None:
        raise UsageError("give an index URL or a wheels directory, not both")
    recipe = load_recipe(target_or_recipe)
    paths = target_paths(recipe.target.name)
    if index_url is None:
        wheels_dir = Path(wheels_dir) if wheels_dir is not None else paths.staging_dir
    report_path = Path(json_out) if json_out else (wheels_dir / "smoke.json" if wheels_dir else paths.smoke_report)
    with tempfile.TemporaryDirectory(prefix="gpuwheel-smoke-") as temp:
        work = Path(temp)
        if index_url is None:
            assert wheels_dir is not None  # set above when there is no index URL
            url, requirements = _throwaway_index(wheels_dir, work / "index")
            source = f"{Path(os.path.abspath(wheels_dir))} (through a throwaway static index)"
        else:
            url = source = _as_url(index_url)
            requirements = [f"{p.name}=={p.version}" for p in recipe.packages]
        report = _smoke(recipe, url, source, requirements, python, work, from_wheels_dir=index_url is None)
    write_json(report, report_path)
    if junit:
        write_junit(report, Path(junit))
    logger.info("smoke report written to %s", report_path)
    return report


def _as_url(index: str) -> str:
    """A local directory given as the index is used through file://."""
    return index if "://" in index else Path(os.path.abspath(index)).as_uri()


def _throwaway_index(wheels_dir: Path, index_dir: Path) -> tuple[str, list[str]]:
    found = sorted(p for p in Path(wheels_dir).glob("*.whl") if not p.name.startswith("."))
    if not found:
        raise SmokeFailure(
            f"no wheels in {wheels_dir}", hint="build the target first, or pass --wheels DIR or --index URL"
        )
    wheels = [read_wheel(path) for path in found]
    add_wheels(wheels, index_dir)
    # the exact versions (local labels included): nothing but these files can satisfy them
    return simple_url(index_dir), [f"{w.project}=={w.version}" for w in wheels]


def _smoke(
    recipe, url: str, source: str, requirements: list[str], python: str | None, work: Path, from_wheels_dir: bool
) -> SmokeReport:
    target_cc = recipe.target.compute_capability
    interpreter = _interpreter(python, recipe.toolchain.python, work)
    env_checks: list[CheckResult] = []

    def report(
        info: Mapping[str, Any], gpu: GpuInfo | None, reason: str | None, wheels: Sequence[WheelSmoke] = ()
    ) -> SmokeReport:
        return SmokeReport(
            target=recipe.target.name,
            compute_capability=target_cc,
            gpu=gpu,
            gpu_skip_reason=reason,
            python=interpreter.described,
            torch=info.get("torch"),
            index_url=source,
            checks=tuple(env_checks),
            wheels=tuple(wheels),
        )

    before = _probe_env(interpreter, work)
    downloaded, check = _download(interpreter, url, requirements, work / "downloaded", from_wheels_dir)
    env_checks.extend(check)
    if any(c.status == FAIL for c in check) or not downloaded:
        if not downloaded and not any(c.status == FAIL for c in check):
            env_checks.append(CheckResult("install", FAIL, f"none of {', '.join(requirements)} is on {url}"))
        return report(before, None, "nothing was installed")
    wheels = [read_wheel(path) for path in downloaded]
    env_checks.append(
        _install(interpreter, wheels, recipe.toolchain.torch, torch_present=before.get("torch") is not None, work=work)
    )
    if env_checks[-1].status == FAIL:
        return report(before, None, "the wheels did not install")
    info = _probe_env(interpreter, work)
    env_checks.append(_torch_check(info, recipe.toolchain.torch))
    gpu, reason = _gpu(info, target_cc, recipe.target.name)
    env_checks.append(
        CheckResult(
            "GPU",
            PASS if reason is None else SKIP,
            reason
            or (
                f"{gpu.name}, compute capability {gpu.compute_capability} (target {recipe.target.name}: {target_cc})"
                if gpu is not None  # _gpu gives a reason whenever it gives no GPU
                else ""
            ),
        )
    )
    optional = tuple(glob for package in recipe.packages for glob in package.audit_optional)
    # The recipe's kind for each of its packages; a wheel the recipe does not name, by its project name.
    kinds: dict[str, str] = {canonicalize_name(package.name): package.kind for package in recipe.packages}
    results = [
        _smoke_wheel(
            wheel,
            registry.get(kinds.get(wheel.project) or registry.default_kind(wheel.project)),
            interpreter,
            work,
            target_cc,
            recipe.target.min_driver,
            optional,
            reason,
        )
        for wheel in wheels
    ]
    return report(info, gpu, reason, results)


# ---- the interpreter -----------------------------------------------------------------------------
def _interpreter(python: str | None, wanted_python: str, work: Path) -> _Interpreter:
    env = dict(os.environ)
    if python is not None:
        found = shutil.which(python) or (python if Path(python).is_file() else None)
        if found is None:
            raise SmokeFailure(f"--python {python}: no such interpreter")
        target_dir = work / "site"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target_dir), env.get("PYTHONPATH")]))
        return _Interpreter(found, env, target_dir, found)
    # the recipe's Python when this machine has it (the wheels are tagged for it), else gpuwheel's
    base = shutil.which(f"python{wanted_python}") or sys.executable
    venv = work / "venv"
    made = run([base, "-m", "venv", venv], timeout=300)
    if not made.ok:
        raise SmokeFailure(f"cannot create a venv with {base}: {_last_line(made)}")
    return _Interpreter(str(venv / "bin" / "python"), env, None, f"a fresh venv of {base}")


def _probe(
    interpreter: _Interpreter, group: str, spec: Mapping[str, Any], work: Path, name: str, timeout: float
) -> tuple[Path, Finished]:
    probes = work / "probes"
    probes.mkdir(exist_ok=True)
    spec_path, out = probes / f"{name}.json", probes / f"{name}.out"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    finished = run(
        [interpreter.python, PROBE, group, spec_path, out],
        env=interpreter.env,
        timeout=timeout,
        log_path=probes / f"{name}.log",
    )
    return out, finished


def _probe_env(interpreter: _Interpreter, work: Path) -> dict[str, Any]:
    out, finished = _probe(interpreter, "env", {}, work, "env", timeout=300)
    if not finished.ok or not out.exists():
        raise SmokeFailure(f"{interpreter.python} cannot run the smoke probe: {_last_line(finished)}")
    return json.loads(out.read_text(encoding="utf-8"))


def _last_line(finished: Finished) -> str:
    lines = [line.strip() for line in finished.tail if line.strip()]
    return f"exit {finished.returncode}: {lines[-1] if lines else 'no output'}"


# ---- download and install ------------------------------------------------------------------------
def _download(
    interpreter: _Interpreter, url: str, requirements: list[str], dest: Path, from_wheels_dir: bool
) -> tuple[list[Path], list[CheckResult]]:
    """The target's wheels, from `url` alone; a recipe package the index lacks is skipped (--index)."""
    env = {k: v for k, v in interpreter.env.items() if k not in _PIP_INDEX_VARIABLES}
    env["PIP_CONFIG_FILE"] = os.devnull  # pip.conf may add extra indexes or find-links
    checks = []
    for requirement in requirements:
        finished = run(
            [
                interpreter.python,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "--index-url",
                url,
                "--dest",
                dest,
                requirement,
            ],
            env=env,
            timeout=PIP_TIMEOUT,
        )
        if finished.ok:
            continue
        missing = any("No matching distribution" in line for line in finished.tail)
        if missing and not from_wheels_dir:
            checks.append(CheckResult(f"download {requirement}", SKIP, f"not on {url}"))
        else:
            checks.append(
                CheckResult(f"download {requirement}", FAIL, f"pip download from {url}: {_last_line(finished)}")
            )
    return sorted(dest.glob("*.whl")) if dest.exists() else [], checks


def _install(
    interpreter: _Interpreter, wheels: list[WheelFile], torch_pin: str, *, torch_present: bool, work: Path
) -> CheckResult:
    command = [interpreter.python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    if interpreter.target_dir is not None:
        command += ["--target", str(interpreter.target_dir)]
    if interpreter.target_dir is not None and torch_present:
        command.append("--no-deps")  # the interpreter's torch and packages are what the wheels run with
    else:
        constraints = work / "constraints.txt"
        constraints.write_text(f"torch=={torch_pin}\n", encoding="utf-8")
        command += ["--constraint", str(constraints)]
    say(
        f"smoke: installing {len(wheels)} wheel(s)"
        + ("" if "--no-deps" in command else f" and their dependencies (torch {torch_pin}: a minute or more)")
        + f" into {interpreter.described}"
    )
    finished = run(
        [*command, *(str(w.path) for w in wheels)],
        env=interpreter.env,
        timeout=PIP_TIMEOUT,
        log_path=work / "pip-install.log",
        on_line=pip_milestones("smoke install"),
    )
    names = ", ".join(w.filename for w in wheels)
    if not finished.ok:
        return CheckResult("install", FAIL, f"pip install {names}: {_last_line(finished)}", finished.seconds)
    where = f" into {interpreter.target_dir} (--no-deps)" if "--no-deps" in command else ""
    return CheckResult("install", PASS, f"{names}{where}", finished.seconds)


def _torch_check(info: Mapping[str, Any], pin: str) -> CheckResult:
    installed = info.get("torch")
    if installed is None:
        return CheckResult("torch", SKIP, f"torch is not installed (no wheel requires it); the recipe pins {pin}")
    try:
        same = Version(installed).public == Version(pin).public
    except InvalidVersion:
        same = False
    if same:
        return CheckResult("torch", PASS, f"torch {installed} is the recipe's pin {pin}")
    return CheckResult(
        "torch",
        FAIL,
        f"torch {installed} in {info.get('python')}, but the recipe pins {pin} "
        "(the wheels are built against the pin); use a recipe with this torch, "
        "or an interpreter with the pinned one",
    )


# ---- the GPU -----------------------------------------------------------------------------------
def _gpu(info: Mapping[str, Any], target_cc: str, target: str) -> tuple[GpuInfo | None, str | None]:
    """The GPU the checks will see, and why the GPU checks are skipped (None: they run)."""
    seen = info.get("gpu")
    if seen:
        gpu = GpuInfo(seen["name"], seen["compute_capability"])
        if facts.parse_arch(gpu.compute_capability).plain != facts.parse_arch(target_cc).plain:
            return gpu, (
                f"GPU checks skipped: {gpu.name} has compute capability {gpu.compute_capability}, "
                f"target {target} is {target_cc}"
            )
        return gpu, None
    listed, smi = _nvidia_smi_gpu()
    if info.get("torch") is not None or listed is None:
        return listed, f"GPU checks skipped: no GPU visible ({info.get('gpu_reason')}; {smi})"
    return listed, f"GPU checks skipped: {info.get('gpu_reason')}, and the checks run through torch ({smi})"


def _nvidia_smi_gpu() -> tuple[GpuInfo | None, str]:
    """The first GPU nvidia-smi lists, and what it said, for when torch cannot tell."""
    try:
        result = capture(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"], timeout=60)
    except OSError:
        return None, "no nvidia-smi on PATH"
    first = result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else ""
    name, _, cc = first.rpartition(",")
    if not name or not cc.strip():
        return None, "nvidia-smi lists no GPU"
    return GpuInfo(name.strip(), cc.strip()), f"nvidia-smi lists {name.strip()}"


# ---- one wheel -----------------------------------------------------------------------------------
def _smoke_wheel(
    wheel: WheelFile,
    kind: Kind,
    interpreter: _Interpreter,
    work: Path,
    target_cc: str,
    driver: str,
    optional: tuple[str, ...],
    gpu_skip: str | None,
) -> WheelSmoke:
    members = _members(wheel.path)
    shared_objects = tuple(m for m in members if _is_shared_object(m))
    checks = [_native_check(wheel, target_cc, driver, optional)]
    checks += _run_group(
        interpreter,
        "wheel",
        {"project": wheel.project, "modules": _top_level_modules(members), "shared_objects": list(shared_objects)},
        work,
        wheel,
        timeout=600,
    )
    groups = kind.smoke_groups(wheel.project, wheel.provenance, shared_objects, work)
    for index, group in enumerate(groups):
        if gpu_skip is not None and group.needs_gpu:
            checks.append(CheckResult(f"GPU: {group.what}", SKIP, gpu_skip))
        else:
            checks += _run_group(
                interpreter, group.group, group.spec, work, wheel, timeout=GPU_GROUP_TIMEOUT, run=index
            )
    checks[1:1] = kind.smoke_checks(wheel.provenance, shared_objects)
    return WheelSmoke(wheel.filename, wheel.sha256, wheel.project, wheel.version, tuple(checks))


def _run_group(
    interpreter: _Interpreter,
    group: str,
    spec: Mapping[str, Any],
    work: Path,
    wheel: WheelFile,
    timeout: float,
    run: int | None = None,
) -> list[CheckResult]:
    """One probe process; `run` tells apart the runs of one group (vllm-generate compiled, then eager)."""
    logger.info("smoke: %s checks of %s", group, wheel.filename)
    name = f"{wheel.project}-{group}" if run is None else f"{wheel.project}-{run}-{group}"
    out, finished = _probe(interpreter, group, spec, work, name, timeout)
    lines = out.read_text(encoding="utf-8").splitlines() if out.exists() else []
    results = [CheckResult.from_json(json.loads(line)) for line in lines if line.strip()]
    if not finished.ok:
        # a kernel that takes the process down (illegal memory access) ends the group here
        results.append(
            CheckResult(
                f"{group} checks",
                FAIL,
                f"the check process died after {len(results)} check(s): {_last_line(finished)}",
                finished.seconds,
            )
        )
    return results


def _native_check(wheel: WheelFile, cc: str, driver: str, optional: tuple[str, ...]) -> CheckResult:
    """The audit's verdict for the target GPU and the fleet's driver: every (non-optional) .so with GPU
    code has SASS for the GPU; units that run through PTX JIT must be PTX the driver reads (vLLM
    builds its Marlin kernels 8.0+PTX for Hopper: JIT by design, and fine on a ≥ 580 driver)."""
    arch = facts.parse_arch(cc)
    name = f"code for {arch.plain} on driver {driver} (audit)"
    found = audit(wheel.path, AuditTarget(arch, driver, optional))
    with_code = [so for so in found.sos if so.has_gpu_code]
    if not with_code:
        return CheckResult(name, SKIP, "the wheel carries no GPU code")
    judged = [so for so in with_code if not so.optional]
    problems = [f"{so.path}: no SASS for {arch.plain}" for so in judged if not so.count(NATIVE)]
    problems += [p for so in judged for p in so.problems]
    native, jit = sum(so.count(NATIVE) for so in judged), sum(so.count(JIT) for so in judged)
    figures = {"native_units": float(native), "jit_units": float(jit), "shared_objects": float(len(judged))}
    if problems:
        return CheckResult(name, FAIL, "; ".join(problems), figures=figures)
    return CheckResult(
        name,
        PASS,
        f"{len(judged)} .so, {native} kernel unit(s) with SASS for {arch.plain}"
        + (f", {jit} through PTX JIT the driver reads" if jit else ""),
        figures=figures,
    )


def _members(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return [n for n in archive.namelist() if not n.endswith("/")]


def _is_shared_object(member: str) -> bool:
    top = PurePosixPath(member).parts[0]
    base = PurePosixPath(member).name
    return not top.endswith((".dist-info", ".data")) and (base.endswith(".so") or ".so." in base)


def _top_level_modules(members: list[str]) -> list[str]:
    """Importable top-level names: packages (with __init__.py) and root modules (.py, extension .so)."""
    names = set()
    for member in members:
        parts = PurePosixPath(member).parts
        if parts[0].endswith((".dist-info", ".data")):
            continue
        if len(parts) == 2 and parts[1] == "__init__.py":
            names.add(parts[0])
        elif len(parts) == 1 and (member.endswith(".py") or _is_shared_object(member)):
            names.add(member.split(".")[0])
    return sorted(names)

"""The checks' side of a smoke run, executed by the smoke interpreter (the fresh venv or --python):
`python probe.py GROUP SPEC.json RESULTS.jsonl`. Standard library and torch only: gpuwheel itself is
not installed there. Each result is one JSON line, flushed at once, so the checks that finished are
kept when a kernel takes the whole process down (illegal memory access, device-side assert).

Groups: `env` (python, torch, the GPU torch sees), `wheel` (the wheel's .so files load against the
installed torch, its modules import), and the groups of each package check module (flash_attn.py,
vllm.py, causal_conv1d.py).
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
# `python probe.py` puts this directory first on sys.path, where flash_attn.py, vllm.py and
# causal_conv1d.py would shadow the real packages under test.
if sys.path and os.path.abspath(sys.path[0] or ".") == HERE:
    del sys.path[0]


class Recorder:
    """Writes check results as JSON lines; `check` times a function and turns an exception into a failure."""

    def __init__(self, path: str):
        self.handle = open(path, "a", encoding="utf-8")

    def emit(self, name: str, status: str, detail: str, seconds: float = 0.0, figures: dict | None = None) -> None:
        record = {
            "name": name,
            "status": status,
            "detail": detail,
            "seconds": seconds,
            "figures": {k: float(v) for k, v in (figures or {}).items()},
        }
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()

    def check(self, name: str, function) -> None:
        """function() returns (status, detail, figures); raising is a failure with its one-line reason."""
        start = time.perf_counter()
        try:
            status, detail, figures = function()
        except Exception as error:  # a check's failure is a result, not a crash of the probe
            detail = one_line(error)
            traceback.print_exc()
            status, figures = "fail", {}
        self.emit(name, status, detail, time.perf_counter() - start, figures)


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text[:400]}"


def import_torch():
    """torch, or None when the interpreter has none (the checks that need it say so)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def probe_env(spec: dict, out: str) -> None:
    info: dict = {"python": sys.executable, "python_version": sys.version.split()[0], "torch": None, "gpu": None}
    torch = import_torch()
    if torch is None:
        info["gpu_reason"] = f"torch is not installed in {sys.executable}"
    else:
        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        if not torch.cuda.is_available():
            info["gpu_reason"] = f"torch {torch.__version__} sees no CUDA device" + (
                "" if torch.version.cuda else " (a CPU-only build)"
            )
        else:
            major, minor = torch.cuda.get_device_capability(0)
            info["gpu"] = {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}
    with open(out, "w", encoding="utf-8") as handle:
        json.dump(info, handle)


def probe_wheel(spec: dict, recorder: Recorder) -> None:
    """spec: {"project", "modules": [...], "shared_objects": [paths relative to the install root]}."""
    torch = import_torch()
    against = f"torch {torch.__version__}" if torch else "no torch (not installed)"
    distribution = importlib.metadata.distribution(spec["project"])

    def load_shared_objects():
        failures, need_driver, other_python, loaded = [], [], [], 0
        for relative in spec["shared_objects"]:
            tag = re.search(r"\.(cpython-\d+)[-.]", os.path.basename(relative))
            if tag and tag.group(1) != sys.implementation.cache_tag:
                other_python.append(relative)  # an extension module built for another CPython
                continue
            path = str(distribution.locate_file(relative))
            try:
                # RTLD_NOW resolves every symbol at load: a torch ABI mismatch shows as "undefined symbol"
                ctypes.CDLL(path, mode=os.RTLD_NOW)
                loaded += 1
            except OSError as error:
                reason = " ".join(str(error).split())
                if re.search(r"libcuda\.so[.\d]*: cannot open shared object file", reason):
                    need_driver.append(relative)  # the NVIDIA driver's library: no driver on this machine
                else:
                    failures.append(f"{relative}: {reason}")
        tried = len(spec["shared_objects"]) - len(other_python)
        notes = (
            f"; {len(other_python)} extension module(s) for other Pythons not loaded "
            f"({', '.join(sorted({re.search(r'cpython-[0-9]+', p).group(0) for p in other_python}))})"
            if other_python
            else ""
        )
        if failures:
            abi = " (built against another torch?)" if any("undefined symbol" in f for f in failures) else ""
            return (
                "fail",
                f"{len(failures)} of {tried} do not load against {against}{abi}: " + "; ".join(failures) + notes,
                {},
            )
        if need_driver:
            return (
                "skip",
                (
                    f"{len(need_driver)} of {tried} .so need the NVIDIA driver's libcuda.so.1, which this "
                    f"machine lacks ({', '.join(need_driver)}); the other {loaded} loaded against "
                    f"{against}{notes}"
                ),
                {"shared_objects": loaded},
            )
        if not spec["shared_objects"]:
            return "pass", "the wheel holds no .so", {}
        return "pass", f"{loaded} .so loaded against {against}{notes}", {"shared_objects": loaded}

    def import_modules():
        failures = []
        for module in spec["modules"]:
            try:
                importlib.import_module(module)
            except Exception as error:  # ImportError, or whatever the package's __init__ raises
                failures.append(f"{module}: {one_line(error)}")
        if failures:
            return "fail", "; ".join(failures), {}
        return "pass", f"imported {', '.join(spec['modules'])}", {}

    recorder.check(".so load", load_shared_objects)
    recorder.check("import", import_modules)


def _check_module(file_name: str):
    """A package check module loaded by path under a private name (its file name is the package's)."""
    spec = importlib.util.spec_from_file_location(f"_gpuwheel_smoke_{file_name[:-3]}", os.path.join(HERE, file_name))
    if spec is None or spec.loader is None:  # not a .py file: cannot happen for the names used here
        raise ImportError(f"cannot load {file_name} as a module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Packages of the generic kind with a GPU check of their own: project → (check module,
# function(spec, recorder), what it checks). The generic kind runs it as the group of that name.
PACKAGE_CHECKS = {
    "causal-conv1d": (
        "causal_conv1d.py",
        "run_checks",
        "causal_conv1d_fn and causal_conv1d_update against a torch conv1d reference",
    ),
}

# group → (check module, function(spec, recorder)); the package's kind names the groups to run.
GROUPS = {
    **{project: (module, function) for project, (module, function, _) in PACKAGE_CHECKS.items()},
    "flash-attn": ("flash_attn.py", "run_checks"),
    "flash-attn-errors": ("flash_attn.py", "run_error_checks"),
    "vllm-ops": ("vllm.py", "run_op_checks"),
    "vllm": ("vllm.py", "run_checks"),
    "vllm-fa2-errors": ("vllm.py", "run_fa2_error_checks"),
    "vllm-boundary": ("vllm.py", "run_boundary_checks"),
    "vllm-generate": ("vllm.py", "run_generate_check"),
}


def main(argv: list[str]) -> int:
    group, spec_path, out = argv
    with open(spec_path, encoding="utf-8") as handle:
        spec = json.load(handle)
    if group == "env":
        probe_env(spec, out)
        return 0
    recorder = Recorder(out)
    if group == "wheel":
        probe_wheel(spec, recorder)
        return 0
    file_name, function = GROUPS[group]
    getattr(_check_module(file_name), function)(spec, recorder)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Real things the publish tests need: small valid wheels, smoke reports, the target recipe's tables,
fresh virtual environments and a check of a whole index."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from html.parser import HTMLParser
from pathlib import Path

from gpuwheel.smoke.report import FAIL, PASS, SKIP, CheckResult, GpuInfo, SmokeReport, WheelSmoke, write_json
from wheels_helpers import write_wheel

TARGET = "h100-test"
TARGET_CC = "9.0"


def publish_recipe() -> dict:
    """make_recipe's arguments for the publish tests' target (TARGET.toml, for a recipes folder)."""
    return {
        "name": f"{TARGET}.toml",
        "target": {"name": TARGET, "gpu": "NVIDIA H100", "compute_capability": TARGET_CC,
                   "torch_cuda_arch_list": "9.0a", "min_driver": "580.65.06"},
        "toolchain": {"cuda": "13.0", "python": "3.12", "torch": "2.11.0"},
        "package": [{"name": "flash-attn", "version": "2.8.3",
                     "source": {"sdist": "flash_attn-2.8.3.tar.gz", "sha256": "0" * 64}}],
    }


def audit_record(passed: bool = True, arch: str = TARGET_CC, target: str = TARGET) -> dict:
    return {"target": target, "audit": {"passed": passed, "arch": arch, "driver": "580.65.06"}}


def make_wheel(directory: Path, name: str, version: str = "1.0", *, provenance: dict | None = None,
               value: str = "one", payload_bytes: int = 0) -> Path:
    """A pure-Python wheel (py3-none-any, so pip installs it into any venv) whose module exposes VALUE.
    payload_bytes adds a random file, the wheel then stored (uncompressed), to make it big."""
    module = name.replace("-", "_").lower()
    files = {f"{module}/__init__.py": f"VALUE = {value!r}\n".encode()}
    if payload_bytes:
        files[f"{module}/payload.bin"] = os.urandom(payload_bytes)
    return write_wheel(directory, name, version, files, tag="py3-none-any", provenance=provenance,
                       metadata={"Requires-Python": ">=3.8", "Summary": "publish test wheel"},
                       compression=zipfile.ZIP_STORED if payload_bytes else zipfile.ZIP_DEFLATED)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def smoke_report(wheels: list[Path], *, cc: str = TARGET_CC, passed: bool = True, target: str = TARGET,
                 gpu_skip_reason: str | None = None, failing: tuple[str, ...] = ()) -> SmokeReport:
    """What the smoke stage reports for these wheels: per wheel an `import` and a `kernels` check, run on
    a GPU of compute capability cc. passed=False fails `kernels`; gpu_skip_reason: no GPU of the target,
    `kernels` skipped; failing: the names of further checks that failed."""
    gpu = None if gpu_skip_reason else GpuInfo("NVIDIA H100 80GB HBM3" if cc == "9.0" else "other GPU", cc)

    def check(name: str, detail: str) -> CheckResult:
        if name == "kernels" and gpu_skip_reason:
            return CheckResult(name, SKIP, gpu_skip_reason)
        ok = name not in failing and (passed or name != "kernels")
        return CheckResult(name, PASS if ok else FAIL, detail if ok else f"{detail}: wrong", 0.25,
                           {"max_err": 0.001} if name == "kernels" else {})

    return SmokeReport(
        target=target, compute_capability=TARGET_CC, gpu=gpu, gpu_skip_reason=gpu_skip_reason,
        python="a fresh venv of python3", torch="2.11.0+cu130", index_url="wheels",
        checks=(CheckResult("install", PASS, "installed"),),
        wheels=tuple(WheelSmoke(w.name, sha256(w), *w.name.split("-")[:2],
                                (check("import", "imported"), check("kernels", "max err 0.001"))) for w in wheels))


def write_smoke_report(directory: Path, wheels: list[Path], **kwargs) -> Path:
    """smoke.json as the smoke stage writes it, beside the wheels (kwargs: smoke_report's)."""
    path = directory / "smoke.json"
    write_json(smoke_report(wheels, **kwargs), path)
    return path


def passing_wheel(directory: Path, name: str, version: str = "1.0", **kwargs) -> Path:
    """A wheel that passed audit and smoke for the test target (its smoke.json written beside it)."""
    wheel = make_wheel(directory, name, version, provenance=audit_record(), **kwargs)
    write_smoke_report(directory, sorted(directory.glob("*.whl")))
    return wheel


def fresh_venv(path: Path) -> Path:
    """A new virtual environment without pip (fast); pip runs into it with --python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    return path / "bin" / "python"


def pip_install(python: Path, index_url: str, *requirements: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-cache-dir",
         "--disable-pip-version-check", "--index-url", index_url, *requirements],
        capture_output=True, text=True, timeout=300)


def import_value(python: Path, module: str) -> str:
    result = subprocess.run([str(python), "-c", f"import {module}; print({module}.VALUE)"],
                            capture_output=True, text=True, check=True)
    return result.stdout.strip()


class _Anchors(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.anchors: list[dict] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.anchors.append(dict(attrs))


def index_listing(index_dir: Path) -> dict[str, str]:
    """filename → sha256 as the index's JSON pages state it, after checking that the index is
    whole: HTML and JSON agree, every listed file and .metadata exists with the stated hashes."""
    simple = index_dir / "simple"
    assert simple.is_symlink() and simple.resolve().is_dir(), f"{simple} is not a link to a generation"
    root = json.loads((simple / "index.json").read_text())
    listed: dict[str, str] = {}
    for project in root["projects"]:
        page = json.loads((simple / project["name"] / "index.json").read_text())
        parser = _Anchors()
        parser.feed((simple / project["name"] / "index.html").read_text())
        anchors = parser.anchors
        assert len(anchors) == len(page["files"])
        for entry, anchor in zip(page["files"], anchors, strict=True):
            wheel = simple / project["name"] / entry["url"]
            assert wheel.is_file(), f"{entry['url']} listed but missing"
            assert sha256(wheel) == entry["hashes"]["sha256"]
            assert anchor["href"] == f"{entry['url']}#sha256={entry['hashes']['sha256']}"
            metadata = wheel.with_name(wheel.name + ".metadata").read_bytes()
            assert hashlib.sha256(metadata).hexdigest() == entry["core-metadata"]["sha256"]
            assert anchor["data-core-metadata"] == anchor["data-dist-info-metadata"] == \
                f"sha256={entry['core-metadata']['sha256']}"
            with zipfile.ZipFile(wheel) as archive:
                member = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
                assert archive.read(member) == metadata
                record = [n for n in archive.namelist() if n.endswith(".dist-info/gpuwheel.json")]
                publish = json.loads(archive.read(record[0])).get("publish") if record else None
            # A force-published wheel's mark: the same on both pages as in the wheel's own gpuwheel.json.
            assert entry.get("_gpuwheel") == ({"publish": publish} if publish else None)
            assert anchor.get("data-gpuwheel-gpu-tested") == \
                (str(publish["gpu_tested"]).lower() if publish else None)
            assert entry["filename"] not in listed, f"{entry['filename']} listed twice"
            listed[entry["filename"]] = entry["hashes"]["sha256"]
    on_disk = {p.name for p in (index_dir / "files").glob("*.whl") if not p.name.startswith(".")}
    assert on_disk == set(listed), f"files/ holds {sorted(on_disk - set(listed))} not in the index"
    return listed


def leftovers(index_dir: Path) -> list[str]:
    """Temp files a finished publish must not leave (it keeps at most the one previous generation)."""
    found = [p.name for p in (index_dir / "files").glob(".*")]
    found += [p.name for p in index_dir.glob(".simple-tmp-*")] + [p.name for p in index_dir.glob(".simple-link-*")]
    generations = [p for p in index_dir.glob(".simple-*") if p.name not in found]
    assert len(generations) <= 2, f"old generations kept: {generations}"
    return found

"""The audit on real wheels nobody here wrote: PyTorch 2.14.1's CUDA 13.0 build (~1 GB of .so files,
SASS only), cuBLAS 13.1 (cuBLASLt carries PTX too) and vLLM's own 0.14.0 and 0.26.0 wheels (downloaded
once from PyPI into the test cache)."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest

from audit_helpers import GOLDEN, cuobjdump_listing, golden_target, our_listing, verdict_digests
from vllm_patches_helpers import vllm_dist
from gpuwheel import facts
from gpuwheel.audit.fatbin import read_fatbin_units
from gpuwheel.audit.report import AuditTarget, audit

TORCH_WHEEL = Path("/opt/pypi-more/files/torch-2.14.1-cp311-cp311-manylinux_2_28_x86_64.whl")
CUBLAS_WHEEL = Path("/opt/pypi-more/files/nvidia_cublas-13.1.1.3-py3-none-manylinux_2_27_x86_64.whl")


def _needs(wheel: Path):
    return pytest.mark.skipif(not wheel.exists(), reason=f"{wheel.name} is not on this machine's disk")


pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("wheel_path", "gpu_sos"), [
    pytest.param(TORCH_WHEEL, {"torch/lib/libtorch_cuda.so", "torch/lib/libtorch_cuda_linalg.so"},
                 marks=_needs(TORCH_WHEEL), id="torch"),
    pytest.param(CUBLAS_WHEEL, {"nvidia/cu13/lib/libcublas.so.13", "nvidia/cu13/lib/libcublasLt.so.13"},
                 marks=_needs(CUBLAS_WHEEL), id="cublas"),
])
def test_wheel_matches_cuobjdump_for_every_so(tmp_path, wheel_path, gpu_sos):
    report = audit(wheel_path, AuditTarget(facts.parse_arch("12.0"), "580.65.06"))
    assert {so.path for so in report.sos if so.has_gpu_code} >= gpu_sos
    assert report.passed  # both carry sm_120 SASS or compute_120 PTX wherever they need it
    with zipfile.ZipFile(wheel_path) as wheel:
        for so in report.sos:
            extracted = tmp_path / Path(so.path).name
            with wheel.open(so.path) as source, open(extracted, "wb") as target:
                shutil.copyfileobj(source, target, 4 * 1024 * 1024)
            units = read_fatbin_units(extracted)
            assert len(units) == len(so.units), so.path
            # Every .so, with or without GPU code, lists what cuobjdump lists.
            assert our_listing(units) == cuobjdump_listing(extracted), so.path
            extracted.unlink()


@_needs(TORCH_WHEEL)
def test_torch_cuda_on_a_570_driver_runs_natively_but_its_cuda_13_runtime_does_not_load():
    # No PTX in torch's cu130 build: a 570 driver never has to JIT anything on sm_120. What fails is the
    # CUDA 13 runtime the library links: libcudart.so.13 needs driver ≥ 580.
    report = audit(TORCH_WHEEL, AuditTarget(facts.parse_arch("12.0"), "570.195.03"))
    cuda = next(so for so in report.sos if so.path == "torch/lib/libtorch_cuda.so")
    assert cuda.count("native") == len(cuda.units) and cuda.count("jit") == 0
    assert cuda.cuda_runtime == 13 and len(cuda.problems) == 1
    assert "links libcudart.so.13, which needs driver ≥ 580.65.06" in cuda.problems[0]


def _golden_wheel(name: str) -> Path:
    """The wheel a digest was recorded for: torch and cuBLAS from this machine's disk, vLLM's from PyPI."""
    local = {TORCH_WHEEL.name: TORCH_WHEEL, CUBLAS_WHEEL.name: CUBLAS_WHEEL}.get(name)
    if local is None:
        return vllm_dist(name, json.loads(GOLDEN.read_text())["wheels"][name]["sha256"])
    if not local.exists():
        pytest.skip(f"{name} is not on this machine's disk")
    return local


@pytest.mark.parametrize("name", list(json.loads(GOLDEN.read_text())["wheels"]))
def test_verdicts_are_the_ones_recorded_before_the_reader_was_rewritten(name):
    wheel = _golden_wheel(name)
    for target_name, digests in json.loads(GOLDEN.read_text())["wheels"][name]["digests"].items():
        assert verdict_digests(audit(wheel, golden_target(target_name))) == digests, target_name

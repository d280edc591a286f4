"""benchmarks/build_vllm.py on a small ninja log written here: FA2's kernel TUs by kind and the
split-per-forward ratio that compares split-KV builds across hosts (patch 0012)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FA2 = "vllm-flash-attn/CMakeFiles/_vllm_fa2_C.dir/csrc/flash_attn"
# (output, seconds): FA2's four kinds, its API TU, and one TU of another target
STEPS = (
    (f"{FA2}/src/flash_fwd_hdim128_fp16_sm80.cu.o", 100.0),
    (f"{FA2}/src/flash_fwd_hdim128_bf16_causal_sm80.cu.o", 100.0),
    (f"{FA2}/src/flash_fwd_split_hdim128_fp16_sm80.cu.o", 180.0),
    (f"{FA2}/src/flash_fwd_split_align_hdim128_fp16_sm80.cu.o", 120.0),
    (f"{FA2}/src/flash_fwd_sparse_hdim128_fp16_sm80.cu.o", 50.0),
    (f"{FA2}/flash_api.cpp.o", 10.0),
    ("CMakeFiles/_C_stable_libtorch.dir/csrc/libtorch_stable/activation_kernels.cu.o", 30.0),
    ("_vllm_fa2_C.abi3.so", 2.0),
)


def write_log(path: Path, scale: float = 1.0) -> Path:
    lines, start = ["# ninja log v5"], 0
    for output, seconds in STEPS:
        end = start + int(seconds * scale * 1000)
        lines.append(f"{start}\t{end}\t0\t{output}\t0")
        start = end
    path.write_text("\n".join(lines) + "\n")
    return path


def test_fa2_tus_are_grouped_by_kernel_kind(build_vllm, tmp_path):
    run = build_vllm.summarize(build_vllm.read_log(write_log(tmp_path / "log")))

    assert run.by_fa2_kind == {"forward": (2, 200.0), "split-KV": (1, 180.0), "split-align": (1, 120.0),
                               "sparse": (1, 50.0), "api": (1, 10.0)}
    assert run.fa2_split_per_forward == pytest.approx(1.5)  # (180 + 120) / 200
    assert run.by_family["fa2"] == (6, 560.0) and run.compiles == 7


def test_the_ratio_against_a_baseline_cancels_the_hosts_speed(tmp_path):
    """A host twice as slow doubles every step; the split-per-forward ratio stays."""
    fast, slow = write_log(tmp_path / "fast"), write_log(tmp_path / "slow", scale=2.0)

    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "build_vllm.py"), str(slow),
                          "--baseline", str(fast)], capture_output=True, text=True, check=True).stdout

    assert "FA2 split-KV + split-align CPU-s per plain forward CPU-s: 1.50 (baseline 1.50, ratio 1.00x)" in out
    assert "ratio (baseline / this): CPU 0.50x" in out


def test_a_log_without_fa2_prints_no_fa2_table(tmp_path):
    log = tmp_path / "log"
    log.write_text("# ninja log v5\n0\t5000\t0\tCMakeFiles/_C.dir/csrc/cache_kernels.cu.o\t0\n")

    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "build_vllm.py"), str(log)],
                         capture_output=True, text=True, check=True).stdout

    assert "FA2 TUs by kernel" not in out and "1 compiles, 5 CPU-s" in out

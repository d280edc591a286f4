"""GPU checks of the vLLM patches at the shapes that crash (the smoke stage runs these on the target).

- moe_permute (patch 0001, vllm issue 43396): vLLM's own CUDA op, built here from the pinned sdist
  with the patch applied, and the real Python wrapper, at 8192 tokens (8 x 1001 + 184) with FP8
  activations and per-token scales, against a plain torch reference; the op refuses mismatched row
  counts with an error and the CUDA context survives; the unpatched gather faults on the GPU.
- fused MoE (patch 0002): the real Triton fused_moe_kernel and its launcher at GLM-4.6 shapes
  (160 experts, top-8, hidden 5120, expert width 1536, unsharded: the w13 expert offset passes
  2**31 elements) at 8192 tokens, FP8 per-token, against a torch reference; short tensors refused.

Build the op with the C++ compiler torch was built with (its libstdc++): on the GPU machine the
image's CC/CXX wrapper (/opt/gcc) made every STD_TORCH_CHECK of the op, upstream ones too, crash the
process instead of raising; CC=/usr/bin/gcc CXX=/usr/bin/g++ raise RuntimeError as vLLM's build does.
Needs: an NVIDIA GPU, torch with CUDA (the op is built for the pinned vLLM whose torch pin matches
the running torch's minor version), triton, nvcc + ninja, cutlass headers (`pip install
nvidia-cutlass`, or CUTLASS_INCLUDE=DIR), and the pinned sources (cached sdist, or the extracted
copy `python tests/vllm_patches_helpers.py DIR` writes, with GPUWHEEL_TEST_SOURCES=DIR).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from vllm_patches_helpers import (
    GPU_TEST_FILES, MOE_DIR, PATCHES, REPO, apply_patch, load_functions, op_schema, sorted_rows_of, vllm_files,
)

torch = pytest.importorskip("torch", reason="needs torch with CUDA")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")]

TOKENS = 8 * 1001 + 184


def torch_pins() -> dict[str, str]:
    """vLLM version → the torch its recipe builds against."""
    pins = {}
    for base in (REPO / "recipes" / "_base").glob("*.toml"):
        data = tomllib.loads(base.read_text())
        for package in data.get("package", []):
            if package["name"] == "vllm":
                pins[package["version"]] = data["toolchain"]["torch"]
    return pins


def matching_version() -> str:
    running = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    for version, pinned in sorted(torch_pins().items()):
        if ".".join(pinned.split(".")[:2]) == running:
            return version
    pytest.skip(f"no pinned vLLM builds against torch {running} (pins: {torch_pins()}); its op cannot be built here")


def cutlass_include() -> Path:
    if os.environ.get("CUTLASS_INCLUDE"):
        return Path(os.environ["CUTLASS_INCLUDE"])
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None:
        pytest.skip("needs cutlass headers: pip install nvidia-cutlass, or CUTLASS_INCLUDE=DIR")
    return Path(spec.origin).parent / "source" / "include"


def patched_tree(version: str, root: Path, patches: tuple[str, ...]) -> tuple[Path, Path]:
    """(pristine, patched) copies of the GPU test files of `version`, the named patches applied."""
    pristine = vllm_files(version, GPU_TEST_FILES[version], root / "pristine")
    patched = vllm_files(version, GPU_TEST_FILES[version], root / "patched")
    for prefix in patches:
        patch = next((PATCHES / version).glob(f"{prefix}-*.patch"))
        result = apply_patch(patch, patched)
        assert result.returncode == 0, result.stdout + result.stderr
    return pristine, patched


@pytest.fixture(scope="module")
def moe_c(tmp_path_factory):
    """The patched `_moe_C` permute ops of the torch-matching pinned vLLM, built and loaded."""
    from torch.utils import cpp_extension
    version = matching_version()
    root = tmp_path_factory.mktemp(f"moe-c-{version}")
    pristine, patched = patched_tree(version, root, ("0001",))
    csrc = patched / "csrc"
    op = next(csrc.rglob("moe_permute_unpermute_op.cu"))
    bindings = op.parent / "torch_bindings.cpp"
    names = [line.split('"')[1] for line in op.read_text().splitlines() if 'm.impl("' in line]
    registration = root / "moe_permute_registration.cpp"
    registration.write_text("#include <torch/csrc/stable/library.h>\nSTABLE_TORCH_LIBRARY(_moe_C, m) {\n" + "".join(
        f'  m.def("{op_schema(bindings, name)}");\n' for name in names) + "}\n")
    library = cpp_extension.load(
        name=f"moe_permute_patched_{version.replace('.', '_')}",
        sources=[str(op), str(op.parent / "permute_unpermute_kernels" / "moe_permute_unpermute_kernel.cu"),
                 str(registration)],
        extra_include_paths=[str(csrc), str(cutlass_include())],
        extra_cflags=["-DUSE_CUDA"],
        # vLLM builds these with CUDA's half/bfloat16 operators on; torch's extension defaults turn them off.
        extra_cuda_cflags=["-DUSE_CUDA", "--expt-relaxed-constexpr", *(f"-U__CUDA_NO_{name}__" for name in (
            "HALF_OPERATORS", "HALF_CONVERSIONS", "BFLOAT16_CONVERSIONS", "HALF2_OPERATORS"))],
        build_directory=str(root), is_python_module=False, verbose=False)
    namespace = load_functions(patched / MOE_DIR / "moe_permute_unpermute.py", ("moe_permute",), {"torch": torch})
    return SimpleNamespace(version=version, library=library, pristine=pristine, patched=patched,
                           moe_permute=namespace["moe_permute"], sorted_rows=sorted_rows_of(op.read_text()))


def fp8_batch(rows: int, n_expert: int = 128, topk: int = 8, hidden: int = 2048):
    generator = torch.Generator(device="cuda").manual_seed(0)
    topk_ids = torch.rand(rows, n_expert, device="cuda", generator=generator).topk(topk, dim=1).indices
    hidden_states = torch.randn(rows, hidden, device="cuda", generator=generator).to(torch.float8_e4m3fn)
    scale = torch.arange(rows, device="cuda", dtype=torch.float32).unsqueeze(1)
    return topk_ids.to(torch.int32), hidden_states, scale


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["all-experts", "half-local"])
@pytest.mark.parametrize("extra_rows", [0, 512], ids=["rows-agree", "longer-routing-and-scale"])
def test_moe_permute_8192_matches_reference(moe_c, expert_parallel, extra_rows):
    """Longer routing and scales (rows past the batch) are what upstream takes where its op sorts
    input's rows (0.26.0): the extra rows are not read, and the patched op and wrapper let them pass."""
    if extra_rows and moe_c.sorted_rows != "input":
        pytest.skip(f"vLLM {moe_c.version}'s op sorts topk_ids' own rows: longer routing is out of bounds there")
    n_expert, topk = 128, 8
    topk_ids, _, scale = fp8_batch(TOKENS + extra_rows, n_expert, topk)
    _, hidden_states, _ = fp8_batch(TOKENS, n_expert, topk)
    expert_map, n_local = None, n_expert
    if expert_parallel:
        n_local = n_expert // 2
        expert_map = torch.full((n_expert,), -1, dtype=torch.int32, device="cuda")
        expert_map[n_local:] = torch.arange(n_local, dtype=torch.int32, device="cuda")
    routed = topk_ids[:TOKENS].flatten().long()
    local = routed if expert_map is None else expert_map[routed].long()
    tokens = torch.cat([(local == e).nonzero().flatten() // topk for e in range(n_local)])
    permuted, permuted_scale, offsets, _, _ = moe_c.moe_permute(
        hidden_states, scale, topk_ids, n_expert, n_local, expert_map)
    torch.cuda.synchronize()
    valid = tokens.numel()
    assert int(offsets[-1]) == valid
    assert torch.equal(permuted_scale[:valid, 0].long(), tokens)
    assert torch.equal(permuted[:valid].view(torch.uint8), hidden_states[tokens].view(torch.uint8))


def test_moe_permute_op_refuses_mismatched_rows(moe_c):
    topk_ids, hidden_states, _ = fp8_batch(TOKENS)
    topk = topk_ids.size(1)
    short = topk_ids[:4096].contiguous()
    outputs = dict(
        permuted_input=torch.empty(TOKENS * topk, hidden_states.size(1), dtype=hidden_states.dtype, device="cuda"),
        expert_first_token_offset=torch.empty(129, dtype=torch.int64, device="cuda"),
        inv_permuted_idx=torch.empty(4096, topk, dtype=torch.int32, device="cuda"),
        permuted_idx=torch.full((TOKENS * topk,), TOKENS * topk, dtype=torch.int32, device="cuda"))
    indices = torch.arange(4096 * topk, dtype=torch.int32, device="cuda").view(4096, topk)
    with pytest.raises(RuntimeError, match=f"topk_ids has 4096 rows but input has {TOKENS}"):
        torch.ops._moe_C.moe_permute(hidden_states, short, indices, None, 128, 128, topk, *outputs.values())
    torch.cuda.synchronize()  # the context is alive: nothing was launched
    assert float(torch.ones(4, device="cuda").sum()) == 4.0


def test_patched_wrapper_refuses_short_scale(moe_c):
    topk_ids, hidden_states, scale = fp8_batch(TOKENS)
    with pytest.raises(ValueError, match=f"a1q_scale has 4096 rows but hidden_states has {TOKENS}"):
        moe_c.moe_permute(hidden_states, scale[:4096], topk_ids, 128)


PRISTINE_GATHER = """
import sys, torch
sys.path.insert(0, {tests!r})
from vllm_patches_helpers import load_functions
torch.ops.load_library({library!r})
moe_permute = load_functions(__import__("pathlib").Path({source!r}), ("moe_permute",), {{"torch": torch}})["moe_permute"]
g = torch.Generator(device="cuda").manual_seed(0)
topk_ids = torch.rand({tokens}, 128, device="cuda", generator=g).topk(8, dim=1).indices.to(torch.int32)
hidden = torch.randn({tokens}, 2048, device="cuda", generator=g).to(torch.float8_e4m3fn)
scale = torch.ones(4096, 1, device="cuda")
moe_permute(hidden, scale, topk_ids, 128)
torch.cuda.synchronize()
print("no fault")
"""


def test_unpatched_gather_faults_on_gpu(moe_c, tmp_path):
    """The bug itself, in a child process (a device-side fault kills its CUDA context)."""
    script = tmp_path / "pristine_gather.py"
    script.write_text(PRISTINE_GATHER.format(
        tests=str(Path(__file__).parents[1]), library=str(moe_c.library),
        source=str(moe_c.pristine / MOE_DIR / "moe_permute_unpermute.py"), tokens=TOKENS))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "no fault" not in result.stdout
    assert any(word in result.stderr for word in ("device-side assert", "illegal memory access", "out of bounds"))


# ------------------------------------------------------------------ fused MoE (Triton)

GLM46 = dict(experts=160, topk=8, hidden=5120, width=1536)  # zai-org/GLM-4.6 config.json


@pytest.fixture(scope="module", params=sorted(torch_pins()))
def fused_moe(request, tmp_path_factory):
    """The patched launcher and the real kernel of each pinned vLLM (Triton compiles them here)."""
    triton = pytest.importorskip("triton", reason="the fused-MoE kernel is Triton")
    import triton.language as tl
    version = request.param
    _, patched = patched_tree(version, tmp_path_factory.mktemp(f"fused-{version}"), ("0002",))
    source = patched / MOE_DIR / "fused_moe.py"
    capability = torch.cuda.get_device_capability()
    platform = SimpleNamespace(is_device_capability=lambda cc: capability[0] * 10 + capability[1] == cc)
    namespace = {"torch": torch, "triton": triton, "tl": tl, "current_platform": platform, "functools": functools,
                 "warn_if_moe_use_td_ineffective": lambda *a, **k: None, "resolve_moe_use_td": lambda: False}
    load_functions(patched / MOE_DIR / "utils.py", ("enable_swap_ab",), namespace)
    load_functions(source, ("write_zeros_to_output", "fused_moe_kernel"), namespace, lazy_annotations=False)
    load_functions(source, ("invoke_fused_moe_triton_kernel",), namespace)
    return SimpleNamespace(version=version, invoke=namespace["invoke_fused_moe_triton_kernel"], tl=tl)


def align_block_size(topk_ids, block: int, n_expert: int):
    """moe_align_block_size's contract in torch: routed rows grouped by expert, each group padded to
    a multiple of `block` with the sentinel topk_ids.numel(); one expert id per block."""
    flat = topk_ids.flatten()
    order = torch.sort(flat, stable=True).indices.to(torch.int32)
    counts = torch.bincount(flat, minlength=n_expert).tolist()
    sorted_ids, expert_ids, start = [], [], 0
    for expert, count in enumerate(counts):
        padded = -(-count // block) * block
        group = torch.full((padded,), flat.numel(), dtype=torch.int32, device=flat.device)
        group[:count] = order[start:start + count]
        start += count
        sorted_ids.append(group)
        expert_ids += [expert] * (padded // block)
    sorted_ids = torch.cat(sorted_ids)
    return (sorted_ids, torch.tensor(expert_ids, dtype=torch.int32, device=flat.device),
            torch.tensor([sorted_ids.numel()], dtype=torch.int32, device=flat.device))


@pytest.mark.parametrize("extra_rows", [0, 512], ids=["rows-agree", "longer-routing"])
def test_fused_moe_glm46_8192_tokens(fused_moe, extra_rows):
    """Longer routing (rows past A's) sorts ids at or past A rows * top_k and pads with its own numel:
    the kernel masks them all, upstream is right and the patch lets it through."""
    e, topk, k, n = GLM46["experts"], GLM46["topk"], GLM46["hidden"], 2 * GLM46["width"]
    assert (e - 1) * n * k > 2**31, "the w13 expert offset needs 64-bit arithmetic at this shape"
    generator = torch.Generator(device="cuda").manual_seed(0)
    a = (torch.randn(TOKENS, k, device="cuda", generator=generator) / 4).to(torch.float8_e4m3fn)
    a_scale = torch.rand(TOKENS, 1, device="cuda", generator=generator) + 0.5
    w = (torch.randn(e, n, k, device="cuda", generator=generator) / 4).to(torch.float8_e4m3fn)
    w_scale = torch.rand(e, n, 1, device="cuda", generator=generator) / 100
    routing = torch.rand(TOKENS + extra_rows, e, device="cuda", generator=generator).topk(topk, dim=1).indices
    topk_ids = routing.to(torch.int32)[:TOKENS]
    c = torch.zeros(TOKENS, topk, n, dtype=torch.bfloat16, device="cuda")
    config = {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 32,
              "num_warps": 4, "num_stages": 3}
    sorted_ids, expert_ids, post_padded = align_block_size(routing.to(torch.int32), config["BLOCK_SIZE_M"], e)
    fused_moe.invoke(a, w, c, a_scale, w_scale, None, sorted_ids, expert_ids, post_padded, False, topk, config,
                     compute_type=fused_moe.tl.bfloat16, use_fp8_w8a8=True, use_int8_w8a8=False,
                     use_int8_w8a16=False, use_int4_w4a16=False, per_channel_quant=True)
    torch.cuda.synchronize()
    flat_c = c.view(-1, n)
    for expert in range(e):
        rows = (topk_ids.flatten() == expert).nonzero().flatten()
        reference = (a[rows // topk].float() * a_scale[rows // topk]) @ (w[expert].float() * w_scale[expert]).T
        torch.testing.assert_close(flat_c[rows].float(), reference, rtol=2e-2, atol=2e-2 * float(reference.abs().max()))


def test_fused_moe_refuses_short_topk_weights(fused_moe):
    a = torch.zeros(TOKENS * 8, 256, dtype=torch.float8_e4m3fn, device="cuda")
    w = torch.zeros(16, 128, 256, dtype=torch.float8_e4m3fn, device="cuda")
    c = torch.empty(TOKENS, 8, 128, dtype=torch.bfloat16, device="cuda")
    weights = torch.ones(4096, 8, device="cuda")
    ids = torch.zeros(TOKENS * 8, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match=r"topk_weights \(4096, 8\) has fewer than 65536 entries"):
        fused_moe.invoke(a, w, c, torch.ones(TOKENS * 8, 1, device="cuda"), torch.ones(16, 128, 1, device="cuda"),
                         weights, ids, ids[:4096], ids[:1], True, 1, {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 64,
                         "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 8}, compute_type=fused_moe.tl.bfloat16,
                         use_fp8_w8a8=True, use_int8_w8a8=False, use_int8_w8a16=False, use_int4_w4a16=False,
                         per_channel_quant=True)

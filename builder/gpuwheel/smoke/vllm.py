"""vLLM checks, run by probe.py inside the smoke interpreter (torch + the installed vLLM wheel).

The shapes are the crashes of CONTEXT.md: 8192 scheduled tokens made of 8 requests of 1001 tokens +
1 of 184, FP8 (e4m3) activations with per-token scales, 128 experts, top-8 (Qwen3-30B-A3B's MoE).

- `run_op_checks` (no GPU needed, only torch and the driver's libcuda.so.1): the compiled op
  libraries load and register the ops the engine calls (OP_LIBRARIES; 0.26.0 names them
  `_C_stable_libtorch` / `_moe_C_stable_libtorch`, 0.20.0 `_C` / `_moe_C`: same namespaces); the
  Marlin ops have a CUDA kernel, or none where the serving profile left Marlin out (OMITTABLE_OPS);
  and vLLM's Python package imports with its dependencies.
- `run_checks`: vLLM's FA2 (`vllm.vllm_flash_attn.flash_attn_varlen_func`, fa_version=2) at 8192
  tokens for every head dim and dtype the wheel's serving profile built, contiguous and paged KV,
  against an fp32 torch reference; `moe_permute` (vLLM's own Python wrapper over
  `_moe_C.moe_permute`) at 8192 tokens checked row by row against the routing; a MoE layer at 8192
  tokens through vLLM's routing, permute and unpermute kernels and vLLM's Triton `fused_experts`.
- `run_fa2_error_checks` (its own process): what the serving profile left out of FA2 (head dims,
  dtypes, the split-KV kernels that append new keys to the cache) must raise its RuntimeError, not
  crash, and leave the GPU usable.
- `run_boundary_checks` (its own process: an unfixed wheel kills the CUDA context): row counts that
  disagree at 8192 tokens must be refused with an error, not read out of bounds (vllm issue 43396).
- `run_generate_check` (its own process, once compiled with CUDA graphs and once eager): a tiny
  random-weight Llama of the profile's head dim, written locally, generates with chunked prefill
  and max_num_batched_tokens=8192, the 8192-token batch scheduled in one step; the attention
  backend and FA version vLLM chose are recorded.

torch, vLLM and transformers exist only in the smoke interpreter: they are imported inside the checks,
so that this file itself loads anywhere (kinds/vllm.py imports it on the host for its constants).
"""

from __future__ import annotations

import ctypes
import fnmatch
import functools
import importlib
import importlib.metadata
import importlib.util
import os
import time
from typing import Any

SEQLENS = (1001,) * 8 + (184,)
TOKENS = sum(SEQLENS)  # 8192
HIDDEN, INTERMEDIATE, EXPERTS, TOPK = 2048, 768, 128, 8
MOE_REL_TOLERANCE = 2e-2  # max |out − reference| / max |reference|, bf16 expert outputs
MOE_PERMUTE_FILE = "vllm/model_executor/layers/fused_moe/moe_permute_unpermute.py"
# The compiled op libraries: (name, wheel member globs, newest layout first, {namespace: ops it
# must register}). One library registers several namespaces (_C holds _C_cache_ops too).
OP_LIBRARIES = (
    (
        "_C",
        ("vllm/_C_stable_libtorch.*so", "vllm/_C.*so"),
        {
            "_C": ("silu_and_mul", "rms_norm", "fused_add_rms_norm", "rotary_embedding"),
            "_C_cache_ops": ("reshape_and_cache_flash",),
        },
    ),
    (
        "_moe_C",
        ("vllm/_moe_C_stable_libtorch.*so", "vllm/_moe_C.*so"),
        {"_moe_C": ("moe_permute", "moe_unpermute", "topk_softmax", "moe_align_block_size", "moe_sum")},
    ),
    ("_vllm_fa2_C", ("vllm/vllm_flash_attn/_vllm_fa2_C.*so",), {"_vllm_fa2_C": ("varlen_fwd", "fwd_kvcache")}),
)
# Kernel families a serving profile may omit (kinds/vllm.py OMITTABLE) and the libraries they are.
OMITTABLE_LIBRARIES = {
    "fa3": ("vllm/vllm_flash_attn/_vllm_fa3_C.*so",),
    "flashmla": ("vllm/_flashmla_C.*so", "vllm/_flashmla_extension_C.*so"),
}
# Kernel families a serving profile may omit that live inside the op libraries (patch 0009): their
# ops keep their schemas, and the CUDA kernel is what the family is.
OMITTABLE_OPS = {
    "marlin": {
        "_C": ("marlin_gemm", "gptq_marlin_repack", "awq_marlin_repack"),
        "_moe_C": ("moe_wna16_marlin_gemm",),
    },
}
FA2_HEAD_DIMS = (32, 64, 96, 128, 192, 256)  # vllm-flash-attn's FA2 buckets
FA2_DTYPES = ("fp16", "bf16")
FA2_HEADS, FA2_KV_HEADS, FA2_BLOCK = 16, 4, 16  # GQA as served models use it; vLLM's default block size
FA2_NOT_BUILT = "has no FA2 kernels for"  # the serving profile's refusal (patch 0005)
# vLLM modules the engine imports at start (engine, worker, model runner, FA backend, models).
ENGINE_MODULES = (
    "vllm.entrypoints.llm",
    "vllm.v1.engine.core",
    "vllm.v1.worker.gpu_model_runner",
    "vllm.v1.attention.backends.flash_attn",
    "vllm.model_executor.models.llama",
    "vllm.model_executor.models.qwen3_moe",
    "vllm.v1.structured_output",
)


def _root(spec: dict) -> str:
    """Where the wheel's files are: spec["root"], else the installed distribution's location."""
    if spec.get("root"):
        return spec["root"]
    return str(importlib.metadata.distribution("vllm").locate_file(""))


def _load_by_path(path: str, name: str):
    """The wheel's own Python file, without importing vLLM's package (and its many dependencies)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:  # not a .py file: cannot happen for the names used here
        raise ImportError(f"cannot load {path} as a module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _permute_module(spec: dict):
    return _load_by_path(
        spec.get("moe_permute_file") or os.path.join(_root(spec), MOE_PERMUTE_FILE),
        "_gpuwheel_smoke_moe_permute_unpermute",
    )


def _libraries(spec: dict) -> list[tuple[str, str, dict]]:
    """(name, path relative to the root, {namespace: ops}) of spec["op_libraries"]: entries as the
    runner writes them ({"name", "path", "ops"}), or bare paths matched against OP_LIBRARIES."""
    found = []
    for entry in spec.get("op_libraries", ()):
        if isinstance(entry, dict):
            found.append((entry["name"], entry["path"], entry.get("ops") or {}))
            continue
        known = next(
            ((name, ops) for name, globs, ops in OP_LIBRARIES if any(fnmatch.fnmatch(entry, g) for g in globs)), None
        )
        name = known[0] if known else os.path.basename(entry).split(".")[0]
        found.append((name, entry, known[1] if known else {}))
    return found


def _load_libraries(spec: dict) -> None:
    import torch

    root = _root(spec)
    for _, relative, _ in _libraries(spec):
        torch.ops.load_library(os.path.join(root, relative))  # run_op_checks reports how they load


def run_op_checks(spec: dict, recorder) -> None:
    """spec: {"root": dir | null, "op_libraries": [...]}. No GPU needed: loading needs torch and
    the driver's libcuda.so.1 (the libraries link it), registration needs nothing more."""
    if importlib.util.find_spec("torch") is None:
        recorder.emit(
            "op libraries", "skip", "torch is not installed in this interpreter: the op libraries load into torch"
        )
        return
    root = _root(spec)
    for name, relative, ops in _libraries(spec):
        recorder.check(f"op library {name}", functools.partial(_load_op_library, os.path.join(root, relative), ops))
    for family, ops in OMITTABLE_OPS.items():
        omitted = family in spec.get("omit", ())
        recorder.check(
            f"{family} kernels {'left out' if omitted else 'built'}", functools.partial(_cuda_kernels, ops, not omitted)
        )
    if not spec.get("root"):
        recorder.check("vLLM's engine modules import", _engine_imports)


def _load_op_library(path: str, ops: dict):
    import torch

    try:
        # torch's own error hides the loader's reason ("Could not load this library")
        ctypes.CDLL(path, mode=os.RTLD_NOW | os.RTLD_GLOBAL)
    except OSError as error:
        reason = " ".join(str(error).split())
        if "libcuda.so" in reason and "cannot open shared object file" in reason:
            return (
                "skip",
                (
                    f"needs the NVIDIA driver's libcuda.so.1, which this machine lacks "
                    f"({os.path.basename(path)}); runs where the driver is"
                ),
                {},
            )
        raise
    torch.ops.load_library(path)
    missing = [
        f"{namespace}.{op}" for namespace, names in ops.items() for op in names if not _registered(torch, namespace, op)
    ]
    if missing:
        return "fail", f"loaded, but registers no torch.ops.{', torch.ops.'.join(missing)}", {}
    listed = "; ".join(f"torch.ops.{ns}: {', '.join(names)}" for ns, names in ops.items())
    return "pass", f"loaded {os.path.basename(path)}; " + (listed or "no ops expected"), {}


def _cuda_kernels(ops: dict, expected: bool):
    """Whether each op has a CUDA kernel, as the profile says it must (or must not): a left-out family's
    ops then fail at their first call with torch's "Could not run … with arguments from the 'CUDA'
    backend" rather than run another kernel. Reads the dispatcher only: no GPU needed."""
    import torch

    found = {
        f"{namespace}::{op}": torch._C._dispatch_has_kernel_for_dispatch_key(f"{namespace}::{op}", "CUDA")
        for namespace, names in ops.items()
        for op in names
        if _registered(torch, namespace, op)  # its schema: the op library check reports a missing one
    }
    if not found:
        return "skip", "the op libraries that define these ops did not load", {}
    wrong = [name for name, has in found.items() if has != expected]
    if wrong:
        state = "has no CUDA kernel" if expected else "still has a CUDA kernel"
        return "fail", f"{', '.join(wrong)} {state}", {}
    return "pass", f"{', '.join(found)}: {'a CUDA kernel each' if expected else 'no CUDA kernel (refused at call)'}", {}


def _registered(torch, namespace: str, op: str) -> bool:
    try:
        getattr(getattr(torch.ops, namespace), op)
    except (AttributeError, RuntimeError):
        return False
    return True


def _engine_imports():
    """vLLM's Python package with the dependencies the engine imports at start."""
    for module in ENGINE_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name and not error.name.startswith("vllm"):
                return (
                    "fail",
                    (
                        f"{module} needs {error.name!r}, which is not installed here: vLLM's "
                        "dependencies must be installed (on the GPU machine: "
                        "tests/gpu/install_vllm_deps.sh)"
                    ),
                    {},
                )
            raise
    return "pass", f"imported {', '.join(ENGINE_MODULES)}", {}


def run_checks(spec: dict, recorder) -> None:
    """spec: {"root": dir | null, "op_libraries": [...], "moe_permute_file": path | null,
    "fa2": {"head_dims": [..] | null, "dtypes": [..]} | null}."""
    _load_libraries(spec)
    fa2 = spec.get("fa2")
    if fa2 is not None:
        known = fa2.get("head_dims") is not None
        for head_dim in fa2.get("head_dims") or FA2_HEAD_DIMS:
            for dtype in fa2.get("dtypes") or FA2_DTYPES:
                recorder.check(
                    f"FA2 varlen hdim{head_dim} {dtype} 8x1001+184 (vllm.vllm_flash_attn)",
                    functools.partial(_fa2_varlen, head_dim, dtype, known),
                )
    recorder.check(f"moe_permute fp8 {TOKENS} tokens (8x1001+184)", lambda: _moe_permute(spec))
    recorder.check(
        f"MoE layer {TOKENS} tokens: topk_softmax, moe_permute, moe_unpermute", lambda: _moe_layer_with_permute(spec)
    )
    recorder.check(f"fused_experts (Triton) {TOKENS} tokens", _fused_experts_triton)


# ---- vLLM's FA2 at 8192 tokens -------------------------------------------------------------------
def _torch_dtype(name: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _flash_attn_checks():
    """flash_attn.py beside this file (its timing and SDPA reference serve FA2 here too)."""
    return _load_by_path(
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "flash_attn.py"), "_gpuwheel_smoke_flash_attn_helpers"
    )


def _fa2_varlen(head_dim: int, dtype_name: str, known: bool):
    """vLLM's own entry point, FA2 forced: contiguous K/V (full and causal) and K/V in a paged cache
    with a shuffled block table (causal, how vLLM's FLASH_ATTN backend calls it), each sequence
    against torch SDPA in fp32."""
    import torch
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    dtype = _torch_dtype(dtype_name)
    torch.manual_seed(head_dim)
    q = torch.randn(TOKENS, FA2_HEADS, head_dim, device="cuda", dtype=dtype)
    k, v = (torch.randn(TOKENS, FA2_KV_HEADS, head_dim, device="cuda", dtype=dtype) for _ in range(2))
    offsets = [0]
    for length in SEQLENS:
        offsets.append(offsets[-1] + length)
    cu_seqlens = torch.tensor(offsets, device="cuda", dtype=torch.int32)
    longest = max(SEQLENS)
    # the same K/V in 16-token pages, pages of all sequences shuffled over the cache
    pages = [-(-n // FA2_BLOCK) for n in SEQLENS]
    order = torch.randperm(sum(pages), device="cuda")
    k_cache, v_cache = (
        torch.zeros(sum(pages), FA2_BLOCK, FA2_KV_HEADS, head_dim, device="cuda", dtype=dtype) for _ in range(2)
    )
    block_table = torch.zeros(len(SEQLENS), max(pages), device="cuda", dtype=torch.int32)
    used = 0
    for i, (start, length) in enumerate(zip(offsets, SEQLENS, strict=False)):
        blocks = order[used : used + pages[i]]
        used += pages[i]
        block_table[i, : pages[i]] = blocks.to(torch.int32)
        for j, block in enumerate(blocks.tolist()):
            rows = slice(start + j * FA2_BLOCK, min(start + (j + 1) * FA2_BLOCK, start + length))
            n = rows.stop - rows.start
            k_cache[block, :n], v_cache[block, :n] = k[rows], v[rows]
    seqused = torch.tensor(SEQLENS, device="cuda", dtype=torch.int32)

    calls = {
        "full": lambda: flash_attn_varlen_func(
            q, k, v, longest, cu_seqlens, longest, cu_seqlens_k=cu_seqlens, causal=False, fa_version=2
        ),
        "causal": lambda: flash_attn_varlen_func(
            q, k, v, longest, cu_seqlens, longest, cu_seqlens_k=cu_seqlens, causal=True, fa_version=2
        ),
        "paged": lambda: flash_attn_varlen_func(
            q,
            k_cache,
            v_cache,
            longest,
            cu_seqlens,
            longest,
            seqused_k=seqused,
            block_table=block_table,
            causal=True,
            fa_version=2,
        ),
    }
    try:
        outputs = {label: call() for label, call in calls.items()}
    except RuntimeError as error:
        if not known and FA2_NOT_BUILT in str(error):
            return (
                "skip",
                f"head dim {head_dim} {dtype_name} is not built into this wheel ({' '.join(str(error).split())[:160]})",
                {},
            )
        raise
    shared = _flash_attn_checks()
    figures: dict[str, float] = {}
    worst = torch_worst = 0.0
    for label, out in outputs.items():
        causal = label != "full"
        error_fa, error_torch = shared.measure_varlen(label, out, q, k, v, offsets, causal, calls[label], figures)
        worst, torch_worst = max(worst, error_fa), max(torch_worst, error_torch)
    tolerance = figures["tolerance"] = shared.tolerance_for(dtype, torch_worst)
    detail = (
        f"max err {worst:.2e} (tolerance {tolerance:.1e}); TFLOP/s {figures['tflops_full']:.0f} full, "
        f"{figures['tflops_causal']:.0f} causal, {figures['tflops_paged']:.0f} paged causal"
    )
    return ("pass" if worst <= tolerance else "fail"), detail, figures


def run_fa2_error_checks(spec: dict, recorder) -> None:
    """spec: {"fa2": {"head_dims": [..], "dtypes": [..], "append_kv": false (left out) | absent}}.
    What the serving profile left out of FA2 must raise its RuntimeError and leave the GPU usable;
    a head dim no kernel serves must raise.
    Run alone: a build whose C++ exceptions crash (the GPU machine's /opt/gcc g++) takes the process
    down here, and the runner reports that death as a failure."""
    import torch
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    fa2 = spec.get("fa2") or {}
    built_dims = fa2.get("head_dims") or FA2_HEAD_DIMS
    built_dtypes = fa2.get("dtypes") or FA2_DTYPES

    def attend(head_dim: int, dtype_name: str):
        q = torch.randn(64, 4, head_dim, device="cuda", dtype=_torch_dtype(dtype_name))
        cu = torch.tensor([0, 64], device="cuda", dtype=torch.int32)
        out = flash_attn_varlen_func(q, q, q, 64, cu, 64, cu_seqlens_k=cu, causal=True, fa_version=2)
        torch.cuda.synchronize()
        return out

    def refused(head_dim: int, dtype_name: str, what: str, profile: bool):
        def case():
            try:
                attend(head_dim, dtype_name)
            except RuntimeError as error:
                message = " ".join(str(error).split())
                if profile and FA2_NOT_BUILT not in message:
                    return "fail", f"raised, but not the serving profile's refusal: {message[:240]}", {}
                if not _context_alive():
                    return "fail", f"raised ({message[:160]}), but the CUDA context is dead afterwards", {}
                attend(built_dims[0], built_dtypes[0])  # a built kernel still runs after the refusal
                return "pass", f"raised RuntimeError: {message[:240]}", {}
            return "fail", f"accepted {what}", {}

        return case

    for head_dim in (d for d in FA2_HEAD_DIMS if d not in built_dims):
        recorder.check(
            f"FA2 unbuilt head dim {head_dim} raises",
            refused(head_dim, built_dtypes[0], f"head dim {head_dim}, which this build left out", True),
        )
    for dtype_name in (d for d in FA2_DTYPES if d not in built_dtypes):
        recorder.check(
            f"FA2 unbuilt dtype {dtype_name} raises",
            refused(built_dims[0], dtype_name, f"{dtype_name}, which this build left out", True),
        )
    recorder.check(
        "FA2 head dim 304 raises", refused(304, built_dtypes[0], "head dim 304, which no kernel serves", False)
    )
    if fa2.get("append_kv") is False:
        recorder.check(
            "FA2 appending new keys to the KV cache raises",
            lambda: _fa2_append_kv_refused(built_dims[0], built_dtypes[0]),
        )


def _fa2_append_kv_refused(head_dim: int, dtype_name: str):
    """The serving profile compiles no split-KV kernel that appends new keys (patch 0012):
    `_vllm_fa2_C::fwd_kvcache` given k and v must raise the profile's refusal, and the same call
    without them (keys already in the cache, as vLLM writes them) must still attend correctly."""
    import torch

    dtype = _torch_dtype(dtype_name)
    torch.manual_seed(head_dim)
    cached = 48  # keys already in the cache, of its 64 rows
    q = torch.randn(1, 1, FA2_HEADS, head_dim, device="cuda", dtype=dtype)
    k_cache, v_cache = (torch.randn(1, 64, FA2_KV_HEADS, head_dim, device="cuda", dtype=dtype) for _ in range(2))
    k_new, v_new = (torch.randn(1, 1, FA2_KV_HEADS, head_dim, device="cuda", dtype=dtype) for _ in range(2))
    seqlens = torch.tensor([cached], device="cuda", dtype=torch.int32)
    scale = head_dim**-0.5

    def fwd_kvcache(k, v):
        # after seqlens_k: rotary cos and sin, cache_batch_idx, leftpad_k, block_table, alibi_slopes and
        # out, all None; then softmax_scale, causal, window left/right, softcap, rotary interleaved, splits
        unused = (None,) * 7
        op = torch.ops._vllm_fa2_C.fwd_kvcache
        return op(q, k_cache, v_cache, k, v, seqlens, *unused, scale, True, -1, -1, 0.0, False, 0)[0]

    try:
        fwd_kvcache(k_new, v_new)
        torch.cuda.synchronize()
    except RuntimeError as error:
        message = " ".join(str(error).split())
        if FA2_NOT_BUILT not in message:
            return "fail", f"raised, but not the serving profile's refusal: {message[:240]}", {}
    else:
        return "fail", "accepted new keys: the build compiled the appending kernels after all", {}
    if not _context_alive():
        return "fail", f"raised ({message[:160]}), but the CUDA context is dead afterwards", {}
    shared = _flash_attn_checks()
    group = FA2_HEADS // FA2_KV_HEADS
    # (1, 1, H, D) → (1, H, 1, D); the cached keys (L, Hkv, D) → (1, H, L, D), one KV head per group
    got, qs = (t[0].transpose(0, 1).unsqueeze(0) for t in (fwd_kvcache(None, None), q))
    ks, vs = (t[0, :cached].repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0) for t in (k_cache, v_cache))
    worst, error_torch = shared.sdpa_error_pair(got, qs, ks, vs)
    tolerance = shared.tolerance_for(dtype, error_torch)
    detail = f"raised RuntimeError: {message[:200]}; without new keys max err {worst:.1e} (≤ {tolerance:.1e})"
    return ("pass" if worst <= tolerance else "fail"), detail, {"max_error_without_new_keys": worst}


def _routing(seed: int):
    """FP8 activations, per-token scales and top-8 routing from vLLM's own topk_softmax kernel."""
    import torch

    generator = torch.Generator(device="cuda").manual_seed(seed)
    hidden = (torch.randn(TOKENS, HIDDEN, device="cuda", generator=generator) * 2).to(torch.float8_e4m3fn)
    scale = torch.rand(TOKENS, 1, device="cuda", generator=generator, dtype=torch.float32) / 100 + 1e-3
    gating = torch.randn(TOKENS, EXPERTS, device="cuda", generator=generator, dtype=torch.float32)
    weights = torch.empty(TOKENS, TOPK, device="cuda", dtype=torch.float32)
    ids = torch.empty(TOKENS, TOPK, device="cuda", dtype=torch.int32)
    token_expert = torch.empty(TOKENS, TOPK, device="cuda", dtype=torch.int32)
    torch.ops._moe_C.topk_softmax(weights, ids, token_expert, gating, True, None)
    expected_weights, expected_ids = torch.topk(torch.softmax(gating, dim=-1), TOPK, dim=-1)
    expected_weights = expected_weights / expected_weights.sum(dim=-1, keepdim=True)
    order = ids.long().sort(dim=-1)
    expected_order = expected_ids.sort(dim=-1)
    if not torch.equal(order.values, expected_order.values):
        raise AssertionError("topk_softmax chose other experts than torch.topk(softmax(gating))")
    if not torch.allclose(
        weights.gather(1, order.indices), expected_weights.gather(1, expected_order.indices), atol=1e-5
    ):
        raise AssertionError("topk_softmax weights differ from torch's renormalized softmax top-8")
    return hidden, scale, weights, ids


def _moe_permute(spec: dict):
    import torch

    module = _permute_module(spec)
    hidden, scale, _, ids = _routing(seed=1)
    start = time.perf_counter()
    permuted, permuted_scale, first_offset, inverse, permuted_idx = module.moe_permute(hidden, scale, ids, EXPERTS)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    rows = TOKENS * TOPK
    source = permuted_idx.long()
    # every (token, k) pair lands in exactly one permuted row: no sentinel left, none twice
    if not torch.equal(source.sort().values, torch.arange(rows, device="cuda")):
        unfilled = int((source >= rows).sum())
        raise AssertionError(f"permuted_idx is no permutation of the {rows} (token, k) rows ({unfilled} unfilled)")
    token = source // TOPK
    if not torch.equal(permuted.view(torch.uint8), hidden.view(torch.uint8)[token]):
        raise AssertionError("a permuted row is not the FP8 row of the token routed there")
    if permuted_scale is None or not torch.equal(permuted_scale, scale[token]):
        raise AssertionError("a permuted FP8 scale is not the scale of its row's token")
    experts_of_rows = ids.flatten().long()[source]
    if bool((experts_of_rows[1:] < experts_of_rows[:-1]).any()):
        raise AssertionError("permuted rows are not grouped by expert")
    counts = torch.bincount(ids.flatten().long(), minlength=EXPERTS)
    expected_offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    if not torch.equal(first_offset.long(), expected_offsets):
        raise AssertionError("expert_first_token_offset does not match the routing's expert counts")
    if not torch.equal(inverse.long()[source], torch.arange(rows, device="cuda")):
        raise AssertionError("inv_permuted_idx does not invert permuted_idx")
    return "pass", f"{rows} rows permuted exactly, FP8 scales follow their tokens", {"seconds_first_call": seconds}


def _experts(seed: int):
    """Gate/up and down weights of EXPERTS SiLU experts, bf16, in vLLM's fused_experts layout."""
    import torch

    generator = torch.Generator(device="cuda").manual_seed(seed)
    w1 = (
        torch.randn(EXPERTS, 2 * INTERMEDIATE, HIDDEN, device="cuda", generator=generator, dtype=torch.bfloat16)
        / HIDDEN**0.5
    )
    w2 = (
        torch.randn(EXPERTS, HIDDEN, INTERMEDIATE, device="cuda", generator=generator, dtype=torch.bfloat16)
        / INTERMEDIATE**0.5
    )
    return w1, w2


def _expert(x, w1, w2, e):
    import torch.nn.functional as F

    gate_up = x @ w1[e].t()
    return (F.silu(gate_up[:, :INTERMEDIATE]) * gate_up[:, INTERMEDIATE:]) @ w2[e].t()


def _reference(x, weights, ids, w1, w2):
    """out[t] = Σ_k weights[t, k] · expert_{ids[t, k]}(x[t]), accumulated in fp32, token by expert."""
    import torch

    out = torch.zeros(TOKENS, HIDDEN, device="cuda", dtype=torch.float32)
    for e in range(EXPERTS):
        token, slot = (ids == e).nonzero(as_tuple=True)
        if token.numel():
            out.index_add_(0, token, _expert(x[token], w1, w2, e).float() * weights[token, slot, None])
    return out


def _compare(out, reference, seconds: float):
    error = (out.float() - reference).abs().max().item()
    relative = error / reference.abs().max().item()
    figures = {"max_abs_err": error, "max_rel_err": relative, "tolerance": MOE_REL_TOLERANCE, "seconds": seconds}
    detail = (
        f"max rel err {relative:.2e} (tolerance {MOE_REL_TOLERANCE:.0e}) vs torch reference, {seconds * 1e3:.1f} ms"
    )
    return ("pass" if relative <= MOE_REL_TOLERANCE else "fail"), detail, figures


def _moe_layer_with_permute(spec: dict):
    """The data path of vLLM's CUTLASS FP8 MoE (seed 3) with torch GEMMs for the experts."""
    import torch

    module = _permute_module(spec)
    hidden, scale, weights, ids = _routing(seed=2)
    w1, w2 = _experts(seed=3)
    x = (hidden.float() * scale).to(torch.bfloat16)
    torch.cuda.synchronize()
    start = time.perf_counter()
    permuted, permuted_scale, first_offset, inverse, _ = module.moe_permute(hidden, scale, ids, EXPERTS)
    rows = (permuted.float() * permuted_scale).to(torch.bfloat16)
    expert_out = torch.empty(TOKENS * TOPK, HIDDEN, device="cuda", dtype=torch.bfloat16)
    bounds = first_offset.tolist()
    for e in range(EXPERTS):
        if bounds[e + 1] > bounds[e]:
            expert_out[bounds[e] : bounds[e + 1]] = _expert(rows[bounds[e] : bounds[e + 1]], w1, w2, e)
    out = torch.empty(TOKENS, HIDDEN, device="cuda", dtype=torch.bfloat16)
    module.moe_unpermute(out, expert_out, weights, inverse, first_offset)
    torch.cuda.synchronize()
    return _compare(out, _reference(x, weights, ids, w1, w2), time.perf_counter() - start)


def _fused_experts_triton():
    import torch
    from vllm.model_executor.layers.fused_moe import fused_experts

    hidden, scale, weights, ids = _routing(seed=4)
    w1, w2 = _experts(seed=5)
    x = (hidden.float() * scale).to(torch.bfloat16)
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fused_experts(x, w1, w2, weights, ids)
    torch.cuda.synchronize()
    return _compare(out, _reference(x, weights, ids, w1, w2), time.perf_counter() - start)


# ---- row counts that disagree (vllm issue 43396) ----------------------------------------------
def run_boundary_checks(spec: dict, recorder) -> None:
    """Each case must raise a clear error and leave the GPU usable; after a case kills the CUDA
    context the rest cannot run and are skipped."""
    import torch

    _load_libraries(spec)
    module = _permute_module(spec)
    hidden, scale, _, ids = _routing(seed=6)
    cases = {
        f"moe_permute refuses {TOKENS // 2} scale rows for {TOKENS} tokens": lambda: module.moe_permute(
            hidden, scale[: TOKENS // 2], ids, EXPERTS
        ),
        f"moe_permute refuses {TOKENS // 2} topk_ids rows for {TOKENS} tokens": lambda: module.moe_permute(
            hidden, scale, ids[: TOKENS // 2], EXPERTS
        ),
    }
    alive = True
    for name, call in cases.items():
        if not alive:
            recorder.emit(name, "skip", "not run: the CUDA context died in the case before")
            continue
        outcome: dict[str, Any] = {}

        def case(call=call, outcome=outcome):  # bound now; recorder.check runs it in this iteration
            try:
                call()
                torch.cuda.synchronize()
            except Exception as error:  # the refusal, or the crash surfacing at synchronize
                outcome["error"] = error
            outcome["alive"] = _context_alive()
            raised = outcome.get("error")
            message = " ".join(str(raised).split())[:240] if raised else ""
            if raised is None:
                return "fail", "accepted mismatched row counts without an error", {}
            if not outcome["alive"] or "CUDA" in message:
                return (
                    "fail",
                    (
                        f"crashed on the GPU ({type(raised).__name__}: {message}); this vLLM lacks the "
                        "moe_permute row-count check (patch 0001)"
                    ),
                    {},
                )
            return "pass", f"refused: {type(raised).__name__}: {message}", {}

        recorder.check(name, case)
        alive = outcome.get("alive", False)


def _context_alive() -> bool:
    import torch

    try:
        return torch.ones(4, device="cuda").sum().item() == 4.0
    except Exception:  # a sticky CUDA error: every later call fails
        return False


# ---- a tiny model generating at the boundary ---------------------------------------------------
def run_generate_check(spec: dict, recorder) -> None:
    """spec: {"workdir": dir for the model, "head_dim": int, "dtype": "bf16" | "fp16",
    "enforce_eager": bool}. Default settings (torch.compile and CUDA graphs) put the 8192-token
    step on the boundary of the compiled shape ranges, where the reported crashes happened."""
    eager = bool(spec.get("enforce_eager"))
    head_dim, dtype = int(spec.get("head_dim") or 128), spec.get("dtype") or "bf16"
    mode = "eager" if eager else "torch.compile + CUDA graphs"
    recorder.check(
        f"generate ({mode}): tiny Llama hdim{head_dim} {dtype}, chunked prefill, "
        f"max_num_batched_tokens={TOKENS}, 8x1001+184 prompts",
        lambda: _generate(spec["workdir"], head_dim, dtype, eager),
    )


def _write_tiny_model(directory: str, head_dim: int, dtype: str) -> None:
    """config.json + model.safetensors of a 2-layer Llama with random weights (4 query heads on 2 KV
    heads of `head_dim`): no hub, no tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch_dtype = _torch_dtype(dtype)
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=4 * head_dim,
        intermediate_size=8 * head_dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=4096,
        torch_dtype=str(torch_dtype).removeprefix("torch."),
    )
    LlamaForCausalLM(config).to(torch_dtype).save_pretrained(directory, safe_serialization=True)


def attention_in_use(worker) -> dict:
    """Run inside the engine's worker (collective_rpc): the backend and FA version of its attention layers."""
    context = worker.vllm_config.compilation_config.static_forward_context
    for layer in context.values():
        backend = getattr(layer, "attn_backend", None)
        if backend is not None:
            impl = getattr(layer, "impl", None)
            return {"backend": backend.get_name(), "fa_version": getattr(impl, "vllm_flash_attn_version", None)}
    return {"backend": None, "fa_version": None}


def _generate(workdir: str, head_dim: int, dtype: str, eager: bool):
    # the engine core in this process, so that the check can read what it chose (collective_rpc
    # with a function needs no serialization then); a crash ends this check process, and the
    # runner reports its last line
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # vLLM 0.26.0's sampler imports FlashInfer unless told not to, and FlashInfer is no dependency of
    # the wheel gpuwheel builds (seen on the H200: "No module named 'flashinfer'").
    no_flashinfer = importlib.util.find_spec("flashinfer") is None
    if no_flashinfer:
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    from vllm import LLM, SamplingParams

    model = os.path.join(workdir, f"tiny-llama-hdim{head_dim}-{dtype}")
    if not os.path.exists(os.path.join(model, "config.json")):
        _write_tiny_model(model, head_dim, dtype)
    llm = LLM(
        model=model,
        skip_tokenizer_init=True,
        enable_chunked_prefill=True,
        max_num_batched_tokens=TOKENS,
        max_model_len=2048,
        max_num_seqs=16,
        gpu_memory_utilization=0.3,
        enforce_eager=eager,
        seed=0,
        dtype={"bf16": "bfloat16", "fp16": "float16"}[dtype],
    )
    prompts = [
        {"prompt_token_ids": [(7 * i + j) % 2000 + 1 for j in range(length)]} for i, length in enumerate(SEQLENS)
    ]
    new_tokens = 16
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    try:
        chosen = llm.collective_rpc(attention_in_use)[0]
    except Exception as error:  # what vLLM chose is a record, not the check
        chosen = {
            "backend": f"unknown ({type(error).__name__}: {' '.join(str(error).split())[:80]})",
            "fa_version": None,
        }
    compilation = llm.llm_engine.vllm_config.compilation_config
    settings = (
        f"compilation {getattr(compilation.mode, 'name', compilation.mode)}, "
        f"CUDA graphs {getattr(compilation.cudagraph_mode, 'name', compilation.cudagraph_mode)}"
    )
    try:  # 0.26.0 compiles one graph per token range: (1, 8192) here, the 8192-token step at its edge
        settings += f", compile ranges {', '.join(map(str, compilation.get_compile_ranges()))}"
    except Exception:  # older vLLM has no ranges
        pass
    produced = [len(o.outputs[0].token_ids) for o in outputs]
    attention = (
        f"attention {chosen['backend']}"
        + (f" FA{chosen['fa_version']}" if chosen["fa_version"] else "")
        + ("; sampler without FlashInfer (not installed)" if no_flashinfer else "")
    )
    figures = {"seconds": seconds, "tokens_per_s": (TOKENS + new_tokens * len(SEQLENS)) / seconds}
    if chosen["fa_version"]:
        figures["fa_version"] = chosen["fa_version"]
    if produced != [new_tokens] * len(SEQLENS):
        return (
            "fail",
            (
                f"generated {produced} tokens, expected {new_tokens} for each of {len(SEQLENS)} prompts "
                f"({attention}; {settings})"
            ),
            figures,
        )
    if any(t < 0 or t >= 2048 for o in outputs for t in o.outputs[0].token_ids):
        return "fail", f"generated token ids outside the vocabulary of 2048 ({attention}; {settings})", figures
    return (
        "pass",
        (
            f"{len(SEQLENS)} prompts ({TOKENS} prompt tokens) → {new_tokens} tokens each in "
            f"{seconds:.1f} s; {attention}; {settings}"
        ),
        figures,
    )

"""flash-attn checks, run by probe.py inside the smoke interpreter (torch + the installed flash-attn).

At the users' crashing batch, 8 sequences of 1001 tokens + 1 of 184 = 8192 tokens:
- flash_attn_varlen_func, fp16 and bf16, causal and not, every head dim the wheel carries, against an
  fp32 torch SDPA reference computed per sequence;
- flash_attn_with_kvcache, paged decode (256-token pages, shuffled block table) at 8192 context;
- in its own process (run_error_checks): a C++ error (TORCH_CHECK) surfaces as a Python exception.

Tolerance: max |flash-attn − fp32 reference| ≤ max(2 × max |torch SDPA in the same dtype − fp32
reference|, FLOOR[dtype]) — upstream flash-attn's own test criterion, with an absolute floor so that
an unusually exact torch run does not fail flash-attn for ordinary rounding.

torch and flash_attn exist only in the smoke interpreter: they are imported inside the checks, so that
this file itself loads anywhere.
"""

from __future__ import annotations

import functools
import itertools

SEQLENS = (1001,) * 8 + (184,)  # 8192 tokens: the batch that crashed the users' servers
ALL_HEAD_DIMS = (32, 64, 96, 128, 192, 256)
FLOOR = {"float16": 2e-3, "bfloat16": 1.6e-2}
HEADS = 16
DECODE_BATCH, DECODE_CONTEXT, DECODE_KV_HEADS, PAGE = 8, 8192, 4, 256
TIMED_ITERATIONS = 10


def run_checks(spec: dict, recorder) -> None:
    """spec: {"head_dims": [..] | null}; null: try every head dim, unbuilt ones are skipped."""
    import torch

    head_dims = spec.get("head_dims") or ALL_HEAD_DIMS
    known = spec.get("head_dims") is not None
    for head_dim in head_dims:
        for dtype in (torch.float16, torch.bfloat16):
            name = f"flash_attn_varlen_func hdim{head_dim} {_short(dtype)} 8x1001+184"
            recorder.check(name, functools.partial(_varlen, head_dim, dtype, known))
            name = f"flash_attn_with_kvcache hdim{head_dim} {_short(dtype)} paged decode {DECODE_CONTEXT}"
            recorder.check(name, functools.partial(_kvcache, head_dim, dtype, known))


def run_error_checks(spec: dict, recorder) -> None:
    """Bad input and what the build left out must raise, not crash: a head dim no kernel has, an
    unbuilt head dim, dropout and backward where compiled out. Run alone: on the GPU machine a
    build with its $CXX=/opt/gcc/bin/g++ took the process down on the profile's refusals (unbuilt
    head dim, dropout, backward) while the system g++ build raised them (docs/gpu-runs.md)."""
    import torch
    from flash_attn import flash_attn_func

    def refused(call, what: str):
        def case():
            try:
                call()
                torch.cuda.synchronize()
            except RuntimeError as error:
                return "pass", f"raised {' '.join(str(error).split())[:200]}", {}
            return "fail", f"accepted {what}", {}

        return case

    def attention(head_dim: int, **options):
        q = torch.randn(1, 64, 4, head_dim, device="cuda", dtype=torch.float16, requires_grad=True)
        return lambda: flash_attn_func(q, q, q, **options)

    recorder.check("head dim 304 raises", refused(attention(304), "head dim 304, which no kernel serves"))
    built = spec.get("head_dims")
    unbuilt = [d for d in ALL_HEAD_DIMS if built and d not in built]
    if unbuilt:
        recorder.check(
            f"unbuilt head dim {unbuilt[0]} raises",
            refused(attention(unbuilt[0]), f"head dim {unbuilt[0]}, which this build left out"),
        )
    disabled = set(spec.get("disabled") or ())
    if "DROPOUT" in disabled:
        recorder.check(
            "dropout raises",
            refused(attention(built[0] if built else 128, dropout_p=0.1), "dropout, which this build left out"),
        )
    if "BACKWARD" in disabled:
        forward = attention(built[0] if built else 128)
        recorder.check(
            "backward raises", refused(lambda: forward().sum().backward(), "backward, which this build left out")
        )


def _short(dtype) -> str:
    return {"torch.float16": "fp16", "torch.bfloat16": "bf16"}[str(dtype)]


def _not_built(error: Exception, known: bool) -> bool:
    """Without the wheel's head-dim list, a head-dim refusal from the kernel means: not built in."""
    return not known and isinstance(error, RuntimeError) and "head" in str(error).lower()


def seconds_per_call(function) -> float:
    """Seconds per call, by CUDA events after a warm-up (vllm.py uses it too)."""
    import torch

    function()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(TIMED_ITERATIONS):
        function()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / TIMED_ITERATIONS


def tolerance_for(dtype, torch_error: float) -> float:
    """The module docstring's rule: twice torch SDPA's own error in this dtype, at least FLOOR[dtype].
    vllm.py uses it too."""
    return max(FLOOR[str(dtype).removeprefix("torch.")], 2 * torch_error)


def sdpa_error_pair(got, qs, ks, vs, causal: bool = False) -> tuple[float, float]:
    """Max |got − fp32 SDPA| and max |SDPA in q's dtype − fp32 SDPA| of one attention; (1, H, L, D)
    tensors, K/V already repeated to H heads. vllm.py uses it too."""
    import torch.nn.functional as F

    reference = F.scaled_dot_product_attention(qs.float(), ks.float(), vs.float(), is_causal=causal)
    low = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
    return (got.float() - reference).abs().max().item(), (low.float() - reference).abs().max().item()


def sdpa_errors(out, q, k, v, offsets, causal: bool) -> tuple[float, float]:
    """Max |out − fp32 SDPA| and max |SDPA in q's dtype − fp32 SDPA| over the sequences of a varlen
    batch ((tokens, heads, head dim) tensors, sequence bounds `offsets`); K/V heads may be fewer
    than Q heads (GQA: each serves a group of query heads). vllm.py uses it too."""
    group = q.shape[1] // k.shape[1]
    error_fa = error_torch = 0.0
    for start, end in itertools.pairwise(offsets):
        # (L, H, D) → (1, H, L, D) for SDPA
        qs, got = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, out))
        ks, vs = (t[start:end].repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0) for t in (k, v))
        errors = sdpa_error_pair(got, qs, ks, vs, causal)
        error_fa, error_torch = max(error_fa, errors[0]), max(error_torch, errors[1])
    return error_fa, error_torch


def measure_varlen(label: str, out, q, k, v, offsets, causal: bool, call, figures: dict) -> tuple[float, float]:
    """sdpa_errors and the TFLOP/s of `call` (causal counts half the FLOPs) of one varlen attention,
    recorded in figures as max_err_/sdpa_err_/tflops_<label>; vllm.py uses it too."""
    error_fa, error_torch = sdpa_errors(out, q, k, v, offsets, causal)
    seconds = seconds_per_call(call)
    lengths = [end - start for start, end in itertools.pairwise(offsets)]
    flops = 4 * q.shape[1] * q.shape[2] * sum(n * n for n in lengths) / (2 if causal else 1)
    figures.update(
        {f"max_err_{label}": error_fa, f"sdpa_err_{label}": error_torch, f"tflops_{label}": flops / seconds / 1e12}
    )
    return error_fa, error_torch


def _varlen(head_dim: int, dtype, known: bool):
    import torch
    from flash_attn import flash_attn_varlen_func

    torch.manual_seed(head_dim)
    total = sum(SEQLENS)
    q, k, v = (torch.randn(total, HEADS, head_dim, device="cuda", dtype=dtype) for _ in range(3))
    offsets = [0]
    for length in SEQLENS:
        offsets.append(offsets[-1] + length)
    cu_seqlens = torch.tensor(offsets, device="cuda", dtype=torch.int32)
    figures: dict[str, float] = {}
    worst = torch_worst = 0.0
    for causal in (False, True):

        def attend(causal=causal):  # bound now: measure_varlen times it within this iteration
            return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max(SEQLENS), max(SEQLENS), causal=causal)

        try:
            out = attend()
        except RuntimeError as error:
            if _not_built(error, known):
                return (
                    "skip",
                    f"head dim {head_dim} is not built into this wheel ({' '.join(str(error).split())[:160]})",
                    {},
                )
            raise
        label = "causal" if causal else "full"
        error_fa, error_torch = measure_varlen(label, out, q, k, v, offsets, causal, attend, figures)
        worst, torch_worst = max(worst, error_fa), max(torch_worst, error_torch)
    tolerance = figures["tolerance"] = tolerance_for(dtype, torch_worst)
    detail = (
        f"max err {worst:.2e} (tolerance {tolerance:.1e}); {figures['tflops_full']:.0f} TFLOP/s full, "
        f"{figures['tflops_causal']:.0f} TFLOP/s causal"
    )
    return ("pass" if worst <= tolerance else "fail"), detail, figures


def _kvcache(head_dim: int, dtype, known: bool):
    import torch
    from flash_attn import flash_attn_with_kvcache

    torch.manual_seed(1000 + head_dim)
    pages_per_sequence = DECODE_CONTEXT // PAGE
    blocks = DECODE_BATCH * pages_per_sequence
    k_cache, v_cache = (
        torch.randn(blocks, PAGE, DECODE_KV_HEADS, head_dim, device="cuda", dtype=dtype) for _ in range(2)
    )
    # pages in shuffled order, so a kernel that ignores the block table reads the wrong keys
    block_table = torch.randperm(blocks, device="cuda", dtype=torch.int32).reshape(DECODE_BATCH, pages_per_sequence)
    cache_seqlens = torch.full((DECODE_BATCH,), DECODE_CONTEXT, device="cuda", dtype=torch.int32)
    q = torch.randn(DECODE_BATCH, 1, HEADS, head_dim, device="cuda", dtype=dtype)

    def decode():
        return flash_attn_with_kvcache(
            q, k_cache, v_cache, cache_seqlens=cache_seqlens, block_table=block_table, causal=True
        )

    try:
        out = decode()
    except RuntimeError as error:
        if _not_built(error, known):
            return (
                "skip",
                f"head dim {head_dim} is not built into this wheel ({' '.join(str(error).split())[:160]})",
                {},
            )
        raise
    error_fa = error_torch = 0.0
    group = HEADS // DECODE_KV_HEADS
    for b in range(DECODE_BATCH):
        # (pages, PAGE, Hkv, D) → (1, H, context, D), each KV head shared by `group` query heads
        ks, vs = (
            c[block_table[b].long()]
            .reshape(DECODE_CONTEXT, DECODE_KV_HEADS, head_dim)
            .repeat_interleave(group, dim=1)
            .transpose(0, 1)
            .unsqueeze(0)
            for c in (k_cache, v_cache)
        )
        qs, got = (t[b].transpose(0, 1).unsqueeze(0) for t in (q, out))  # (1, H, 1, D)
        errors = sdpa_error_pair(got, qs, ks, vs)
        error_fa, error_torch = max(error_fa, errors[0]), max(error_torch, errors[1])
    tolerance = tolerance_for(dtype, error_torch)
    seconds = seconds_per_call(decode)
    cache_bytes = 2 * DECODE_BATCH * DECODE_CONTEXT * DECODE_KV_HEADS * head_dim * k_cache.element_size()
    figures = {
        "max_err": error_fa,
        "sdpa_err": error_torch,
        "tolerance": tolerance,
        "microseconds": seconds * 1e6,
        "kv_gb_per_s": cache_bytes / seconds / 1e9,
        "tflops": 4 * DECODE_BATCH * HEADS * head_dim * DECODE_CONTEXT / seconds / 1e12,
    }
    detail = (
        f"max err {error_fa:.2e} (tolerance {tolerance:.1e}); {seconds * 1e6:.0f} µs per step, "
        f"{figures['kv_gb_per_s']:.0f} GB/s of KV cache read"
    )
    return ("pass" if error_fa <= tolerance else "fail"), detail, figures

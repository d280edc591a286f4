"""A flash-attn inference-profile wheel on a real GPU: its forward kernels against torch SDPA.

Checks, at the head dim the profile built (default 128), fp16 and bf16, causal and not:
  flash_attn_varlen_func at 8192 tokens packed as 8 x 1001 + 184 (the boundary shape of CONTEXT.md)
  flash_attn_with_kvcache (the split-KV kernels) decoding 1 token against a 4096-token cache
each against torch.nn.functional.scaled_dot_product_attention per sequence (max abs error);
then that what the profile left out fails with flash-attn's own clear error (an unbuilt head dim,
dropout > 0, backward); and prints the time of the varlen forward vs the SDPA loop (ratio).

    python benchmarks/flash_attn_vs_sdpa.py [--head-dim 128] [--missing-head-dim 64]
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

SEQLENS = [1001] * 8 + [184]  # 8192 tokens
HEADS, KV_HEADS = 32, 8
TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 3e-2}  # vs an fp32 reference


def sdpa(q, k, v, causal, upcast=True):
    """(seq, heads, d) inputs; GQA by repeating KV heads; bottom-right causal like flash-attn.
    upcast: compute in fp32 (the reference); False: in the inputs' dtype (the timing baseline)."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    sq, sk = q.shape[1], k.shape[1]
    if not causal or sq == sk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(0, 1)
    mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(0, 1)


def check_varlen(d, dtype, causal) -> float:
    total = sum(SEQLENS)
    q = torch.randn(total, HEADS, d, device="cuda", dtype=dtype)
    k = torch.randn(total, KV_HEADS, d, device="cuda", dtype=dtype)
    v = torch.randn(total, KV_HEADS, d, device="cuda", dtype=dtype)
    cu = torch.tensor([0, *torch.tensor(SEQLENS).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    out = flash_attn_varlen_func(q, k, v, cu, cu, max(SEQLENS), max(SEQLENS), causal=causal)
    ref = torch.cat([sdpa(q[a:b], k[a:b], v[a:b], causal) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
    return (out.float() - ref).abs().max().item()


def check_kvcache(d, dtype, causal) -> float:
    batch, cache_len = 4, 4096
    q = torch.randn(batch, 1, HEADS, d, device="cuda", dtype=dtype)
    k = torch.randn(batch, cache_len, KV_HEADS, d, device="cuda", dtype=dtype)
    v = torch.randn(batch, cache_len, KV_HEADS, d, device="cuda", dtype=dtype)
    lens = torch.tensor([4096, 3000, 1001, 17], device="cuda", dtype=torch.int32)
    # num_splits=4: run the split-KV kernels (flash_fwd_split_*), not the heuristic's choice.
    out = flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, causal=causal, num_splits=4)
    ref = torch.stack([sdpa(q[b], k[b, :n], v[b, :n], causal) for b, n in enumerate(lens.tolist())])
    return (out.float() - ref).abs().max().item()


def expect_error(what, call, fragment) -> bool:
    try:
        call()
    except RuntimeError as error:
        ok = fragment in str(error)
        print(f"  {what}: {'clear error' if ok else 'UNEXPECTED error'}: {str(error).splitlines()[0]}")
        return ok
    print(f"  {what}: NO ERROR (expected one containing {fragment!r})")
    return False


def time_ms(fn, repeat=20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--missing-head-dim", type=int, default=64, help="a head dim the profile did not build")
    args = parser.parse_args()
    d = args.head_dim
    print(f"{torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))}), "
          f"torch {torch.__version__}, head dim {d}")
    torch.manual_seed(0)
    ok = True
    for dtype in (torch.float16, torch.bfloat16):
        for causal in (False, True):
            for name, check in (("varlen 8x1001+184", check_varlen), ("kvcache decode", check_kvcache)):
                err = check(d, dtype, causal)
                good = err <= TOLERANCE[dtype]
                ok &= good
                print(f"  {name:18s} {str(dtype)[6:]:8s} causal={causal!s:5s} max|flash-sdpa| {err:.2e} "
                      f"{'ok' if good else 'FAIL'}")

    q = torch.randn(sum(SEQLENS), HEADS, d, device="cuda", dtype=torch.float16)
    kv = torch.randn(sum(SEQLENS), KV_HEADS, d, device="cuda", dtype=torch.float16)
    cu = torch.tensor([0, *torch.tensor(SEQLENS).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    small = torch.randn(64, HEADS, args.missing_head_dim, device="cuda", dtype=torch.float16)
    cu_small = torch.tensor([0, 64], device="cuda", dtype=torch.int32)
    ok &= expect_error(f"head dim {args.missing_head_dim}", lambda: flash_attn_varlen_func(
        small, small, small, cu_small, cu_small, 64, 64), "no kernels for head dim")
    ok &= expect_error("dropout 0.1", lambda: flash_attn_varlen_func(
        q, kv, kv, cu, cu, 1001, 1001, dropout_p=0.1), "does not support dropout")
    grad_q = q[:1001].clone().requires_grad_()
    ok &= expect_error("backward", lambda: flash_attn_varlen_func(
        grad_q, kv[:1001], kv[:1001], cu[:2], cu[:2], 1001, 1001).sum().backward(), "does not support backward")

    bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    flash = time_ms(lambda: flash_attn_varlen_func(q, kv, kv, cu, cu, 1001, 1001, causal=True))
    loop = time_ms(lambda: [sdpa(q[a:b], kv[a:b], kv[a:b], True, upcast=False) for a, b in bounds])
    print(f"  varlen causal fp16, 8192 tokens: flash {flash:.3f} ms, SDPA fp16 per-sequence loop "
          f"{loop:.3f} ms, ratio {loop / flash:.1f}x")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

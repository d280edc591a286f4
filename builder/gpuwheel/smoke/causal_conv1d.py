"""causal-conv1d checks, run by probe.py inside the smoke interpreter (torch + the installed causal-conv1d).

On the target GPU, fp16, bf16 and fp32, with and without bias and SiLU:
- causal_conv1d_fn (prefill) at a Mamba-2 mixer's shape (batch 2, 8192 channels, 1024 tokens,
  width 4) and a small odd one (batch 1, 64 channels, 37 tokens, width 3), against a torch
  reference: a depthwise F.conv1d padded on the left, in fp32;
- causal_conv1d_update (decode): one token at batch 4 against the same reference applied to the
  conv state with the new token appended; the state must have shifted by that token.

Tolerance: causal-conv1d's own test criterion (tests/test_causal_conv1d.py of the release): rtol,
atol 3e-4, 1e-3 for fp32, 3e-3, 5e-3 for fp16 and 1e-2, 5e-2 for bf16.

torch and causal_conv1d exist only in the smoke interpreter: they are imported inside the checks, so
that this file itself loads anywhere (the tests load `reference` on the host).
"""

from __future__ import annotations

import functools

# (batch, channels, tokens, width)
PREFILL_SHAPES = ((2, 8192, 1024, 4), (1, 64, 37, 3))
DECODE_SHAPE = (4, 2048, 4)  # batch, channels, width
TOLERANCE = {"float32": (3e-4, 1e-3), "float16": (3e-3, 5e-3), "bfloat16": (1e-2, 5e-2)}


def run_checks(spec: dict, recorder) -> None:
    import torch

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for batch, channels, tokens, width in PREFILL_SHAPES:
            for bias, activation in ((True, "silu"), (False, None)):
                name = (
                    f"causal_conv1d_fn {_short(dtype)} {batch}x{channels}x{tokens} width {width}"
                    f"{' bias' if bias else ''}{' silu' if activation else ''}"
                )
                recorder.check(
                    name, functools.partial(_prefill, batch, channels, tokens, width, dtype, bias, activation)
                )
        name = f"causal_conv1d_update {_short(dtype)} batch {DECODE_SHAPE[0]} x {DECODE_SHAPE[1]} one token"
        recorder.check(name, functools.partial(_decode, *DECODE_SHAPE, dtype))


def reference(x, weight, bias, activation):
    """Causal depthwise conv1d in fp32: output t sees inputs t-width+1 … t."""
    import torch.nn.functional as F

    width = weight.shape[-1]
    out = F.conv1d(
        x.float(),
        weight.float().unsqueeze(1),
        None if bias is None else bias.float(),
        padding=width - 1,
        groups=x.shape[1],
    )[..., : x.shape[-1]]
    return F.silu(out) if activation else out


def _prefill(batch: int, channels: int, tokens: int, width: int, dtype, bias: bool, activation):
    import torch
    from causal_conv1d import causal_conv1d_fn

    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, channels, tokens, device="cuda", dtype=dtype, generator=generator)
    weight = torch.randn(channels, width, device="cuda", dtype=dtype, generator=generator)
    b = torch.randn(channels, device="cuda", dtype=dtype, generator=generator) if bias else None
    out = causal_conv1d_fn(x, weight, b, activation=activation)
    torch.cuda.synchronize()
    return _compare(out, reference(x, weight, b, activation), dtype)


def _decode(batch: int, channels: int, width: int, dtype):
    import torch
    from causal_conv1d import causal_conv1d_update

    generator = torch.Generator(device="cuda").manual_seed(1)
    state = torch.randn(batch, channels, width - 1, device="cuda", dtype=dtype, generator=generator)
    x = torch.randn(batch, channels, device="cuda", dtype=dtype, generator=generator)
    weight = torch.randn(channels, width, device="cuda", dtype=dtype, generator=generator)
    bias = torch.randn(channels, device="cuda", dtype=dtype, generator=generator)
    window = torch.cat([state, x.unsqueeze(-1)], dim=-1)  # what the kernel must read, before it shifts the state
    expected = reference(window, weight, bias, "silu")[..., -1]
    out = causal_conv1d_update(x, state, weight, bias, activation="silu")
    torch.cuda.synchronize()
    if not torch.equal(state, window[..., 1:]):
        return "fail", "the conv state did not shift by the new token", {}
    return _compare(out, expected, dtype)


def _compare(out, expected, dtype):
    import torch

    rtol, atol = TOLERANCE[str(dtype).removeprefix("torch.")]
    error = (out.float() - expected).abs()
    allowed = atol + rtol * expected.abs()
    worst = float((error - allowed).max())
    figures = {"max_abs_error": float(error.max())}
    if not torch.isfinite(out).all():
        return "fail", "non-finite output", figures
    if worst > 0:
        return "fail", f"max |error| {float(error.max()):.3g} exceeds rtol {rtol}, atol {atol}", figures
    return "pass", f"max |error| {float(error.max()):.3g} within rtol {rtol}, atol {atol}", figures


def _short(dtype) -> str:
    return {"torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32"}[str(dtype)]

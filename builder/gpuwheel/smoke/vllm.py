"""vLLM checks, run by probe.py inside the smoke interpreter (torch + the installed vLLM wheel).

The shapes are the crashes of CONTEXT.md: 8192 scheduled tokens made of 8 requests of 1001 tokens +
1 of 184, FP8 (e4m3) activations with per-token scales, 128 experts, top-8 (Qwen3-30B-A3B's MoE).

- `run_checks`: the compiled op libraries load and register their ops; `moe_permute` (vLLM's own
  Python wrapper over `_moe_C.moe_permute`) at 8192 tokens checked row by row against the routing;
  a MoE layer at 8192 tokens through vLLM's routing, permute and unpermute kernels (and vLLM's Triton
  `fused_experts` when its Python package imports) against a torch reference.
- `run_boundary_checks` (its own process: an unfixed wheel kills the CUDA context): row counts that
  disagree at 8192 tokens must be refused with an error, not read out of bounds (vllm issue 43396).
- `run_generate_check`: a tiny random-weight Llama written locally generates with chunked prefill
  and max_num_batched_tokens=8192, the 8192-token batch scheduled in one step.
"""

from __future__ import annotations

import os
import time

SEQLENS = (1001,) * 8 + (184,)
TOKENS = sum(SEQLENS)  # 8192
HIDDEN, INTERMEDIATE, EXPERTS, TOPK = 2048, 768, 128, 8
MOE_REL_TOLERANCE = 2e-2  # max |out − reference| / max |reference|, bf16 expert outputs
MOE_PERMUTE_FILE = "vllm/model_executor/layers/fused_moe/moe_permute_unpermute.py"
# namespace → ops each compiled library must register
EXPECTED_OPS = {
    "_C": ("silu_and_mul", "rms_norm"),
    "_moe_C": ("moe_permute", "moe_unpermute", "topk_softmax", "moe_align_block_size"),
    "_vllm_fa2_C": ("varlen_fwd",),
}


def _root(spec: dict) -> str:
    """Where the wheel's files are: spec["root"], else the installed distribution's location."""
    if spec.get("root"):
        return spec["root"]
    import importlib.metadata

    return str(importlib.metadata.distribution("vllm").locate_file(""))


def _load_by_path(path: str, name: str):
    """The wheel's own Python file, without importing vLLM's package (and its many dependencies)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _permute_module(spec: dict):
    return _load_by_path(spec.get("moe_permute_file") or os.path.join(_root(spec), MOE_PERMUTE_FILE),
                         "_gpuwheel_smoke_moe_permute_unpermute")


def run_checks(spec: dict, recorder) -> None:
    """spec: {"root": dir | null, "op_libraries": [paths relative to root], "moe_permute_file": path | null}."""
    root = _root(spec)
    for relative in spec["op_libraries"]:
        namespace = os.path.basename(relative).split(".")[0]
        recorder.check(f"op library {namespace}", lambda: _load_op_library(os.path.join(root, relative), namespace))
    recorder.check(f"moe_permute fp8 {TOKENS} tokens (8x1001+184)", lambda: _moe_permute(spec))
    recorder.check(f"MoE layer {TOKENS} tokens: topk_softmax, moe_permute, moe_unpermute",
                   lambda: _moe_layer_with_permute(spec))
    recorder.check(f"fused_experts (Triton) {TOKENS} tokens", _fused_experts_triton)


def _load_op_library(path: str, namespace: str):
    import torch

    torch.ops.load_library(path)
    missing = []
    for op in EXPECTED_OPS.get(namespace, ()):
        try:
            getattr(getattr(torch.ops, namespace), op)
        except (AttributeError, RuntimeError):
            missing.append(op)
    if missing:
        return "fail", f"loaded, but registers no {', '.join(missing)} in torch.ops.{namespace}", {}
    ops = EXPECTED_OPS.get(namespace, ())
    return "pass", f"loaded; torch.ops.{namespace} has {', '.join(ops) or 'its ops'}", {}


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
    if not torch.allclose(weights.gather(1, order.indices), expected_weights.gather(1, expected_order.indices),
                          atol=1e-5):
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
    w1 = torch.randn(EXPERTS, 2 * INTERMEDIATE, HIDDEN, device="cuda", generator=generator,
                     dtype=torch.bfloat16) / HIDDEN ** 0.5
    w2 = torch.randn(EXPERTS, HIDDEN, INTERMEDIATE, device="cuda", generator=generator,
                     dtype=torch.bfloat16) / INTERMEDIATE ** 0.5
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
    detail = f"max rel err {relative:.2e} (tolerance {MOE_REL_TOLERANCE:.0e}) vs torch reference, {seconds * 1e3:.1f} ms"
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
            expert_out[bounds[e]:bounds[e + 1]] = _expert(rows[bounds[e]:bounds[e + 1]], w1, w2, e)
    out = torch.empty(TOKENS, HIDDEN, device="cuda", dtype=torch.bfloat16)
    module.moe_unpermute(out, expert_out, weights, inverse, first_offset)
    torch.cuda.synchronize()
    return _compare(out, _reference(x, weights, ids, w1, w2), time.perf_counter() - start)


def _fused_experts_triton():
    import torch

    try:
        from vllm.model_executor.layers.fused_moe import fused_experts
    except Exception as error:  # the stand-in run carries vLLM's compiled ops, not its dependencies
        return "skip", f"vLLM's Python package does not import here ({type(error).__name__}: " \
                       f"{' '.join(str(error).split())[:200]})", {}
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

    root = _root(spec)
    for relative in spec["op_libraries"]:
        torch.ops.load_library(os.path.join(root, relative))  # run_checks reports how they load
    module = _permute_module(spec)
    hidden, scale, _, ids = _routing(seed=6)
    cases = {
        f"moe_permute refuses {TOKENS // 2} scale rows for {TOKENS} tokens": lambda: module.moe_permute(
            hidden, scale[: TOKENS // 2], ids, EXPERTS),
        f"moe_permute refuses {TOKENS // 2} topk_ids rows for {TOKENS} tokens": lambda: module.moe_permute(
            hidden, scale, ids[: TOKENS // 2], EXPERTS),
    }
    alive = True
    for name, call in cases.items():
        if not alive:
            recorder.emit(name, "skip", "not run: the CUDA context died in the case before")
            continue
        outcome = {}

        def case():
            try:
                call()
                torch.cuda.synchronize()
            except Exception as error:  # the refusal, or the crash surfacing at synchronize
                outcome["error"] = error
            outcome["alive"] = _context_alive()
            error = outcome.get("error")
            message = " ".join(str(error).split())[:240] if error else ""
            if error is None:
                return "fail", "accepted mismatched row counts without an error", {}
            if not outcome["alive"] or "CUDA" in message:
                return "fail", (f"crashed on the GPU ({type(error).__name__}: {message}); this vLLM lacks the "
                                "moe_permute row-count check (patch 0001)"), {}
            return "pass", f"refused: {type(error).__name__}: {message}", {}
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
    """spec: {"workdir": dir for the model}."""
    recorder.check("generate: tiny Llama, chunked prefill, max_num_batched_tokens=8192, 8x1001+184 prompts",
                   lambda: _generate(spec["workdir"]))


def _write_tiny_model(directory: str) -> None:
    """config.json + model.safetensors of a 2-layer Llama with random weights: no hub, no tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                         max_position_embeddings=2048, torch_dtype="bfloat16")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory, safe_serialization=True)


def _generate(workdir: str):
    from vllm import LLM, SamplingParams

    model = os.path.join(workdir, "tiny-llama")
    _write_tiny_model(model)
    llm = LLM(model=model, skip_tokenizer_init=True, enable_chunked_prefill=True, max_num_batched_tokens=TOKENS,
              max_model_len=2048, max_num_seqs=16, gpu_memory_utilization=0.3, enforce_eager=True, seed=0)
    prompts = [{"prompt_token_ids": [(7 * i + j) % 2000 + 1 for j in range(length)]}
               for i, length in enumerate(SEQLENS)]
    new_tokens = 16
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    produced = [len(o.outputs[0].token_ids) for o in outputs]
    if produced != [new_tokens] * len(SEQLENS):
        return "fail", f"generated {produced} tokens, expected {new_tokens} for each of {len(SEQLENS)} prompts", {}
    tokens = TOKENS + new_tokens * len(SEQLENS)
    return "pass", (f"{len(SEQLENS)} prompts ({TOKENS} prompt tokens) → {new_tokens} tokens each in {seconds:.1f} s"), \
        {"seconds": seconds, "tokens_per_s": tokens / seconds}

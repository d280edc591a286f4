#!/usr/bin/env python3
"""Reproduce (or fail to reproduce) the users' 8192-token MoE crashes in the real vLLM engine.

CONTEXT.md failures 2 and 3: compressed-tensors FP8 MoE models (GLM-4.6-FP8, Qwen3-30B-A3B-FP8-
dynamic) die with "illegal memory access" when one scheduled step holds exactly
max_num_batched_tokens = 8192 tokens (8 requests of 1001 tokens + 1 of 184). This script writes tiny
random-weight models of both architectures, quantized the way the real checkpoints are, and runs
vLLM's engine on them once per configuration, each in its own process (a CUDA fault kills the
context, and the next run must not inherit it). It records what vLLM really chose: the FP8 MoE
backend and experts class, the attention backend, the compilation mode, CUDA graph mode and the
compile ranges the 8192-token step falls into.

Standalone: needs torch, safetensors, transformers and vLLM (all on the GPU machine's PYTHONPATH),
and gpuwheel's smoke module from this checkout (imported by path). `--cpu-check` needs no GPU (vLLM's quantization parser is used when it imports).

  python tests/gpu/crash_repro.py --out /tmp/crash                       # the whole matrix
  python tests/gpu/crash_repro.py --list                                 # what would run
  python tests/gpu/crash_repro.py --out /tmp/crash --only qwen3moe-base --sanitize
  python tests/gpu/crash_repro.py --cpu-check --out /tmp/crash-cpu       # write + validate models
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import time

# gpuwheel's smoke check reads the attention backend the same way (its module imports only the stdlib)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "builder"))
from gpuwheel.smoke.vllm import attention_in_use  # noqa: E402
import traceback

# ---- the reporters' workload -----------------------------------------------------------------------
BATCH_TOKENS = 8192  # max_num_batched_tokens of both reports
FULL_PROMPTS = (1001,) * 8  # + one short prompt: 184 gives exactly 8192 tokens in one step
MAX_MODEL_LEN = 2100
NEW_TOKENS = 4  # a few decode steps after the 8192-token prefill step
PHASE2_PROMPTS, PHASE2_LEN, PHASE2_SHARED = 100, 1000, 512  # 512 = 32 blocks of 16: cacheable prefix
KV_CACHE_BYTES = 1 << 30  # fixed KV cache: skips vLLM's memory profiling, which other runs on the
#                           same GPU disturb ("Error in memory profiling ... release GPU memory")
GPU_MEMORY_UTILIZATION = 0.10  # only the start-up free-memory check reads it once KV bytes are set

# ---- the tiny models ---------------------------------------------------------------------------------
# head_dim 128: this build's FA2 has head dim 128 only. Hidden and intermediate sizes are multiples of
# 128, which CUTLASS's FP8 grouped GEMM needs (16-byte aligned K and N for e4m3, and vLLM's ab/c
# strides are hidden_dim / intermediate_size); the real models' 2048/768 and 5120/1536 are too.
HEAD_DIM = 128
VOCAB = 8192
QWEN3_MOE = dict(name="qwen3moe", architecture="Qwen3MoeForCausalLM", hidden=512, heads=4, kv_heads=2,
                 layers=2, experts=128, topk=8, moe_intermediate=256)
# GLM-4.6: 160 routed experts, top-8, one shared expert, first_k_dense_replace dense layers before the
# MoE ones, sigmoid routing with e_score_correction_bias, q/k/v bias, partial rotary 0.5.
GLM4_MOE = dict(name="glm4moe", architecture="Glm4MoeForCausalLM", hidden=512, heads=4, kv_heads=2,
                layers=2, experts=160, topk=8, moe_intermediate=256, intermediate=1024,
                first_k_dense_replace=1, shared_experts=1)
MODELS = {spec["name"]: spec for spec in (QWEN3_MOE, GLM4_MOE)}
MODEL_FORMAT = 1  # bump when the writers change, so that a stale model directory is rewritten

# compressed-tensors FP8-dynamic as llm-compressor's FP8_DYNAMIC scheme writes it (Qwen3-30B-A3B-FP8-
# dynamic, GLM-4.x-FP8): static per-output-channel e4m3 weights with float32 `weight_scale` [out, 1],
# dynamic per-token activations; lm_head and the router gates stay bf16.
FP8_DYNAMIC_IGNORE = ["lm_head", "re:.*mlp.gate$"]


def quantization_config() -> dict:
    fp8 = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "actorder": None,
           "block_structure": None, "observer_kwargs": {}}
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "kv_cache_scheme": None,
        "ignore": list(FP8_DYNAMIC_IGNORE),
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": dict(fp8, strategy="channel", dynamic=False, observer="minmax"),
            "input_activations": dict(fp8, strategy="token", dynamic=True, observer=None),
            "output_activations": None,
        }},
    }


def model_config(spec: dict) -> dict:
    """config.json of the tiny model, with the real model's keys (transformers reads it)."""
    common = {
        "architectures": [spec["architecture"]], "vocab_size": VOCAB, "hidden_size": spec["hidden"],
        "num_hidden_layers": spec["layers"], "num_attention_heads": spec["heads"],
        "num_key_value_heads": spec["kv_heads"], "head_dim": HEAD_DIM, "hidden_act": "silu",
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "num_experts_per_tok": spec["topk"],
        "moe_intermediate_size": spec["moe_intermediate"], "norm_topk_prob": True,
        "quantization_config": quantization_config(),
    }
    if spec["name"] == "qwen3moe":
        return dict(common, model_type="qwen3_moe", num_experts=spec["experts"], decoder_sparse_step=1,
                    mlp_only_layers=[], intermediate_size=4 * spec["hidden"], attention_bias=False,
                    rope_theta=1000000.0, output_router_logits=False, router_aux_loss_coef=0.001)
    return dict(common, model_type="glm4_moe", n_routed_experts=spec["experts"],
                n_shared_experts=spec["shared_experts"], first_k_dense_replace=spec["first_k_dense_replace"],
                intermediate_size=spec["intermediate"], routed_scaling_factor=2.5, n_group=1, topk_group=1,
                attention_bias=True, use_qk_norm=False, partial_rotary_factor=0.5, rope_theta=1000000.0,
                num_nextn_predict_layers=0)


def expected_tensors(spec: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """{checkpoint name: (shape, dtype)} of the real checkpoint layout, shrunk: per-expert
    `mlp.experts.{e}.{gate,up,down}_proj` (what vLLM's expert mapping reads), every quantized Linear
    as `weight` (float8_e4m3fn) + `weight_scale` (float32 [out, 1])."""
    h, q, kv = spec["hidden"], spec["heads"] * HEAD_DIM, spec["kv_heads"] * HEAD_DIM
    tensors: dict[str, tuple[tuple[int, ...], str]] = {
        "model.embed_tokens.weight": ((VOCAB, h), "bfloat16"),
        "model.norm.weight": ((h,), "bfloat16"),
        "lm_head.weight": ((VOCAB, h), "bfloat16"),
    }

    def fp8_linear(name: str, out: int, inp: int) -> None:
        tensors[f"{name}.weight"] = ((out, inp), "float8_e4m3fn")
        tensors[f"{name}.weight_scale"] = ((out, 1), "float32")

    def mlp(prefix: str, inter: int) -> None:
        fp8_linear(f"{prefix}.gate_proj", inter, h)
        fp8_linear(f"{prefix}.up_proj", inter, h)
        fp8_linear(f"{prefix}.down_proj", h, inter)

    glm = spec["name"] == "glm4moe"
    for layer in range(spec["layers"]):
        p = f"model.layers.{layer}"
        tensors[f"{p}.input_layernorm.weight"] = ((h,), "bfloat16")
        tensors[f"{p}.post_attention_layernorm.weight"] = ((h,), "bfloat16")
        for proj, out in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            fp8_linear(f"{p}.self_attn.{proj}", out, h)
            if glm:  # attention_bias: q/k/v carry biases, o_proj does not
                tensors[f"{p}.self_attn.{proj}.bias"] = ((out,), "bfloat16")
        fp8_linear(f"{p}.self_attn.o_proj", h, q)
        if not glm:  # Qwen3 normalizes q and k per head
            tensors[f"{p}.self_attn.q_norm.weight"] = ((HEAD_DIM,), "bfloat16")
            tensors[f"{p}.self_attn.k_norm.weight"] = ((HEAD_DIM,), "bfloat16")
        if glm and layer < spec["first_k_dense_replace"]:
            mlp(f"{p}.mlp", spec["intermediate"])
            continue
        tensors[f"{p}.mlp.gate.weight"] = ((spec["experts"], h), "bfloat16")  # router: ignored, bf16
        if glm:
            tensors[f"{p}.mlp.gate.e_score_correction_bias"] = ((spec["experts"],), "float32")
            mlp(f"{p}.mlp.shared_experts", spec["moe_intermediate"] * spec["shared_experts"])
        for expert in range(spec["experts"]):
            mlp(f"{p}.mlp.experts.{expert}", spec["moe_intermediate"])
    return tensors


def _random_tensor(shape: tuple[int, ...], dtype: str, generator, name: str):
    import torch

    if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    if name.endswith("e_score_correction_bias"):
        return torch.zeros(shape, dtype=torch.float32)
    return (torch.randn(shape, generator=generator) * 0.02).to(getattr(torch, dtype))


def _quantize_fp8_per_channel(weight):
    """float weight [out, in] → (e4m3 weight, float32 scale [out, 1]), as llm-compressor does."""
    import torch

    finfo = torch.finfo(torch.float8_e4m3fn)
    scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / finfo.max
    quantized = (weight / scale).clamp(finfo.min, finfo.max).to(torch.float8_e4m3fn)
    return quantized, scale.to(torch.float32)


def write_model(spec: dict, directory: str) -> str:
    """config.json + model.safetensors (random weights, seed fixed); skipped when the directory
    already holds this format. Returns the directory."""
    import torch
    from safetensors.torch import save_file

    marker = os.path.join(directory, "crash_repro_model.json")
    stamp = {"format": MODEL_FORMAT, "spec": spec}
    if os.path.exists(marker):
        with open(marker) as handle:
            if json.load(handle) == stamp:
                return directory
    os.makedirs(directory, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (shape, dtype) in expected_tensors(spec).items():
        if name.endswith(".weight_scale"):
            continue  # written with its weight
        if dtype == "float8_e4m3fn":
            weight = torch.randn(shape, generator=generator) * 0.02
            tensors[name], tensors[name + "_scale"] = _quantize_fp8_per_channel(weight)
        else:
            tensors[name] = _random_tensor(shape, dtype, generator, name)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(directory, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as handle:
        json.dump(model_config(spec), handle, indent=2)
    with open(os.path.join(directory, "generation_config.json"), "w") as handle:
        json.dump({"_from_model_config": True}, handle)
    with open(marker, "w") as handle:
        json.dump(stamp, handle)
    return directory


# ---- the matrix --------------------------------------------------------------------------------------
# Base: the reporters' settings (vLLM defaults for compilation and CUDA graphs, auto MoE backend).
# Each variant changes one thing.
VARIANTS = {
    "base": {"last_prompt": 184},
    "tokens8191": {"last_prompt": 183},
    "tokens8193": {"last_prompt": 185},
    "eager": {"last_prompt": 184, "enforce_eager": True},
    "nocudagraph": {"last_prompt": 184, "cudagraph_mode": "NONE"},
    # vLLM's --moe-backend (KernelConfig.moe_backend): "triton" → Fp8MoeBackend.TRITON
    # (TritonExperts, fused_experts), "cutlass" → VLLM_CUTLASS (TritonOrCutlassExperts, CUTLASS
    # grouped GEMM with moe_permute). Auto picks VLLM_CUTLASS on sm_90 for channel×token FP8 when
    # FlashInfer is absent and the build has the sm_90 grouped GEMM; both are listed so that the
    # matrix has the other backend whichever auto picked.
    "moe-triton": {"last_prompt": 184, "moe_backend": "triton"},
    "moe-cutlass": {"last_prompt": 184, "moe_backend": "cutlass"},
}


def matrix() -> list[dict]:
    runs = []
    for model in MODELS:
        for variant, settings in VARIANTS.items():
            settings = dict(settings)
            total = sum(FULL_PROMPTS) + settings["last_prompt"]
            runs.append({"name": f"{model}-{variant}", "model": model, "variant": variant,
                         "total_tokens": total, "settings": settings})
    return runs


def engine_kwargs(settings: dict) -> dict:
    """vllm.LLM arguments of a run: the reporters' settings plus the one changed thing."""
    kwargs = dict(skip_tokenizer_init=True, enable_chunked_prefill=True, max_num_batched_tokens=BATCH_TOKENS,
                  enable_prefix_caching=True, max_model_len=MAX_MODEL_LEN, dtype="bfloat16", seed=0,
                  gpu_memory_utilization=GPU_MEMORY_UTILIZATION, kv_cache_memory_bytes=KV_CACHE_BYTES,
                  enforce_eager=bool(settings.get("enforce_eager")))
    if settings.get("cudagraph_mode"):
        kwargs["compilation_config"] = {"cudagraph_mode": settings["cudagraph_mode"]}
    if settings.get("moe_backend"):
        kwargs["moe_backend"] = settings["moe_backend"]
    return kwargs


# ---- one run, inside its own process -----------------------------------------------------------------
def _prompts(total_last: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Phase 1: 8×1001 + 1×total_last distinct random prompts (no shared prefix, so prefix caching
    cannot shrink the 8192-token step). Phase 2: 100 prompts of 1000 tokens whose first 512 tokens
    repeat a phase-1 prompt's (cache hits), the rest random."""
    import random

    rng = random.Random(seed)
    phase1 = [[rng.randrange(1, VOCAB) for _ in range(n)] for n in FULL_PROMPTS + (total_last,)]
    phase2 = [phase1[i % len(FULL_PROMPTS)][:PHASE2_SHARED]
              + [rng.randrange(1, VOCAB) for _ in range(PHASE2_LEN - PHASE2_SHARED)]
              for i in range(PHASE2_PROMPTS)]
    return phase1, phase2


def _moe_in_use(worker) -> list[dict]:
    """Inside the worker (collective_rpc): every FP8 MoE layer's quant method, the backend enum vLLM
    selected (select_fp8_moe_backend), the experts class, and the modular kernel's real pieces."""
    model = worker.model_runner.get_model() if hasattr(worker.model_runner, "get_model") \
        else worker.model_runner.model
    layers = []
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is None or not (hasattr(method, "fp8_backend") or "MoE" in type(method).__name__):
            continue
        entry = {"layer": name, "layer_class": type(module).__name__,
                 "quant_method": type(method).__name__}
        backend = getattr(method, "fp8_backend", None)
        entry["fp8_backend"] = getattr(backend, "value", None if backend is None else str(backend))
        experts_cls = getattr(method, "experts_cls", None)
        entry["experts_cls"] = getattr(experts_cls, "__name__", None)
        kernel = getattr(method, "moe_kernel", None)
        if kernel is not None:
            experts = getattr(kernel, "fused_experts", None)
            entry["kernel_experts"] = type(experts).__name__
            entry["kernel_prepare_finalize"] = type(getattr(kernel, "prepare_finalize", None)).__name__
            # TritonOrCutlassExperts wraps CUTLASS with a Triton fallback (used only for M <= 8 on sm_100)
            for part in ("experts", "fallback_experts"):
                if hasattr(experts, part):
                    entry[f"wrapped_{part}"] = type(getattr(experts, part)).__name__
        layers.append(entry)
    return layers


def _engine_choices(llm) -> dict:
    """What vLLM chose: MoE backend per layer (summarized), attention, compilation settings."""
    choices: dict = {}
    try:
        layers = llm.collective_rpc(_moe_in_use)[0]
        summary = sorted({json.dumps({k: v for k, v in entry.items() if k != "layer"}, sort_keys=True)
                          for entry in layers})
        choices["moe"] = {"layers": len(layers), "kinds": [json.loads(s) for s in summary]}
    except Exception as error:  # a record, not the check
        choices["moe"] = {"unknown": f"{type(error).__name__}: {error}"[:300]}
    try:
        choices["attention"] = llm.collective_rpc(attention_in_use)[0]
    except Exception as error:
        choices["attention"] = {"unknown": f"{type(error).__name__}: {error}"[:300]}
    config = llm.llm_engine.vllm_config
    compilation = config.compilation_config
    choices["compilation_mode"] = getattr(compilation.mode, "name", str(compilation.mode))
    choices["cudagraph_mode"] = getattr(compilation.cudagraph_mode, "name", str(compilation.cudagraph_mode))
    choices["max_cudagraph_capture_size"] = getattr(compilation, "max_cudagraph_capture_size", None)
    try:  # 0.26.0: compile_ranges_endpoints; later releases call them compile_ranges_split_points
        choices["compile_ranges"] = [str(r) for r in compilation.get_compile_ranges()]
    except Exception as error:
        choices["compile_ranges"] = f"unknown ({type(error).__name__})"
    for key in ("compile_ranges_endpoints", "compile_ranges_split_points", "compile_sizes"):
        if hasattr(compilation, key):
            value = getattr(compilation, key)
            choices[key] = list(value) if isinstance(value, (list, tuple, set)) else value
    choices["moe_backend_setting"] = getattr(config.kernel_config, "moe_backend", None)
    choices["max_num_seqs"] = config.scheduler_config.max_num_seqs
    return choices


def _record_step_sizes(llm) -> list[int]:
    """Wrap the in-process scheduler's schedule() to record each step's scheduled token count, so that
    the result says whether a step of exactly 8192 tokens ran. Empty list if the path is not there."""
    steps: list[int] = []
    try:
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    except AttributeError:
        return steps
    original = scheduler.schedule

    def schedule(*args, **kwargs):
        output = original(*args, **kwargs)
        steps.append(int(getattr(output, "total_num_scheduled_tokens", -1)))
        return output
    scheduler.schedule = schedule
    return steps


def child_main(spec_path: str) -> int:
    """Run one configuration; write its result JSON beside the spec. A fault that kills the process
    leaves no result file: the parent reports the signal and the log's last lines."""
    with open(spec_path) as handle:
        run = json.load(handle)
    result_path = run["result_path"]
    # engine core in this process, so collective_rpc can take a function and the scheduler can be
    # wrapped; the sampler without FlashInfer (not installed on the GPU machine)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    result = {"phase": "start"}
    start = time.perf_counter()
    try:
        from vllm import LLM, SamplingParams

        settings = run["settings"]
        result["phase"] = "engine start"
        llm = LLM(model=run["model_dir"], **engine_kwargs(settings))
        result["engine_start_s"] = round(time.perf_counter() - start, 1)
        result["choices"] = _engine_choices(llm)
        steps = _record_step_sizes(llm)
        phase1, phase2 = _prompts(settings["last_prompt"], seed=1)

        result["phase"] = "phase 1: 8x1001 + last prompt"
        t = time.perf_counter()
        params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, detokenize=False)
        outputs = llm.generate([{"prompt_token_ids": p} for p in phase1], params, use_tqdm=False)
        produced = [len(o.outputs[0].token_ids) for o in outputs]
        result["phase1"] = {"seconds": round(time.perf_counter() - t, 2), "prompt_tokens": sum(map(len, phase1)),
                            "produced": produced, "step_tokens": list(steps[:6]),
                            "cached_tokens": sum((o.num_cached_tokens or 0) for o in outputs)}
        if produced != [NEW_TOKENS] * len(phase1):
            raise RuntimeError(f"phase 1 produced {produced} tokens, expected {NEW_TOKENS} each")
        steps_before = len(steps)

        result["phase"] = "phase 2: 100 x 1000 tokens, shared prefixes, max_tokens=1"
        t = time.perf_counter()
        params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
        outputs = llm.generate([{"prompt_token_ids": p} for p in phase2], params, use_tqdm=False)
        produced = [len(o.outputs[0].token_ids) for o in outputs]
        phase2_steps = steps[steps_before:]
        result["phase2"] = {"seconds": round(time.perf_counter() - t, 2), "prompts": len(phase2),
                            "steps": len(phase2_steps), "max_step_tokens": max(phase2_steps, default=None),
                            "steps_of_8192": sum(1 for s in phase2_steps if s == BATCH_TOKENS),
                            "cached_tokens": sum((o.num_cached_tokens or 0) for o in outputs)}
        if produced != [1] * len(phase2):
            raise RuntimeError(f"phase 2 produced {sorted(set(produced))} tokens, expected 1 each")
        result["steps_of_8192"] = sum(1 for s in steps if s == BATCH_TOKENS)
        result["max_step_tokens"] = max(steps, default=None)
        result["outcome"] = "pass"
    except BaseException as error:  # the crash, when it surfaces as a Python error
        result["outcome"] = "error"
        result["error"] = f"{type(error).__name__}: {error}"[:2000]
        result["traceback_tail"] = traceback.format_exc().splitlines()[-25:]
    result["seconds"] = round(time.perf_counter() - start, 1)
    with open(result_path, "w") as handle:
        json.dump(result, handle, indent=2, default=str)
    sys.stdout.flush()
    # os._exit: vLLM's atexit/engine shutdown after a CUDA fault can hang; the result is written
    os._exit(0 if result["outcome"] == "pass" else 1)


# ---- the parent: launch, time out, classify ---------------------------------------------------------
CUDA_FAULT = re.compile(r"illegal memory access|device-side assert|misaligned address|unspecified launch "
                        r"failure|CUDA error|cudaErrorIllegal|an illegal instruction", re.IGNORECASE)


def _tail(path: str, lines: int = 30) -> list[str]:
    try:
        with open(path, errors="replace") as handle:
            return [line.rstrip("\n") for line in handle.readlines()[-lines:]]
    except OSError:
        return []


def launch(run: dict, out: str, timeout: float, sanitizer: str | None = None) -> dict:
    """Run one configuration in a child process (its own process group, killed whole on timeout)."""
    suffix = "-sanitize" if sanitizer else ""
    run_dir = os.path.join(out, "runs", run["name"] + suffix)
    os.makedirs(run_dir, exist_ok=True)
    spec_path, result_path, log_path = (os.path.join(run_dir, n) for n in ("spec.json", "result.json", "log.txt"))
    if os.path.exists(result_path):
        os.remove(result_path)
    with open(spec_path, "w") as handle:
        json.dump(dict(run, result_path=result_path), handle, indent=2)
    env = dict(os.environ)
    # a cache per run: parallel runs of one config would otherwise race on the same compile cache,
    # and a run must not reuse another's compiled artifacts (the crash may live in them)
    env["VLLM_CACHE_ROOT"] = os.path.join(run_dir, "vllm-cache")
    # Inductor compiles in a pool of one worker per core by default: 14 runs at once on 16 cores
    # would start hundreds of workers. One thread per run compiles the same code.
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    command = [sys.executable, os.path.abspath(__file__), "--child", spec_path]
    if sanitizer:
        env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"  # memcheck sees torch's tensors, not one pool
        command = [sanitizer, "--tool", "memcheck", "--print-limit", "30", "--target-processes", "all",
                   "--log-file", os.path.join(run_dir, "memcheck.txt")] + command
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the child's own session: vLLM's helpers too
            returncode = process.wait()
            timed_out = True
    seconds = round(time.perf_counter() - start, 1)
    record = {"name": run["name"] + suffix, "model": run["model"], "variant": run["variant"],
              "settings": run["settings"], "engine_kwargs": engine_kwargs(run["settings"]),
              "total_tokens": run["total_tokens"], "seconds": seconds, "returncode": returncode,
              "log": log_path}
    child = {}
    if os.path.exists(result_path):
        with open(result_path) as handle:
            child = json.load(handle)
    record.update({k: v for k, v in child.items() if k != "seconds"})
    log_tail = _tail(log_path)
    if timed_out:
        record["outcome"] = "timeout"
        record["last_lines"] = log_tail
    elif not child:  # died without writing: a signal, or a fault that aborted the process
        record["outcome"] = "crashed"
        if returncode < 0:
            record["signal"] = signal.Signals(-returncode).name
        record["last_lines"] = log_tail
    elif child.get("outcome") != "pass":
        record["last_lines"] = log_tail[-15:]
    text = " ".join([record.get("error", "")] + record.get("last_lines", []))
    record["cuda_fault"] = record["outcome"] in ("crashed",) or bool(CUDA_FAULT.search(text))
    if sanitizer:
        record["memcheck"] = os.path.join(run_dir, "memcheck.txt")
        record["memcheck_errors"] = [line for line in _tail(record["memcheck"], 400)
                                     if "Invalid" in line or "at " in line and "in " in line][:40]
    return record


def _summary_line(record: dict) -> str:
    keys = ("name", "model", "variant", "total_tokens", "outcome", "seconds", "cuda_fault", "signal", "error",
            "choices", "phase", "steps_of_8192", "max_step_tokens", "phase1", "phase2", "last_lines",
            "memcheck_errors")
    return json.dumps({k: record[k] for k in keys if k in record}, default=str)


def run_matrix(runs: list[dict], out: str, parallel: int, timeout: float, sanitize: bool,
               sanitize_timeout: float) -> list[dict]:
    models = {}
    for run in runs:  # write each model once, before any engine starts
        if run["model"] not in models:
            models[run["model"]] = write_model(MODELS[run["model"]], os.path.join(out, "models", run["model"]))
        run["model_dir"] = models[run["model"]]
    results = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        for record in pool.map(lambda r: launch(r, out, timeout), runs):
            print(_summary_line(record), flush=True)
            results.append(record)
            _save(out, results)
    if sanitize:
        sanitizer = _find_sanitizer()
        for run, record in zip(runs, list(results)):
            if not record["cuda_fault"]:
                continue
            if sanitizer is None:
                print(json.dumps({"name": run["name"], "sanitize": "compute-sanitizer not found"}), flush=True)
                continue
            record = launch(run, out, sanitize_timeout, sanitizer=sanitizer)
            print(_summary_line(record), flush=True)
            results.append(record)
            _save(out, results)
    return results


def _find_sanitizer() -> str | None:
    import shutil

    for candidate in (shutil.which("compute-sanitizer"), "/usr/local/cuda/bin/compute-sanitizer"):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def _save(out: str, results: list[dict]) -> None:
    with open(os.path.join(out, "results.json"), "w") as handle:
        json.dump(results, handle, indent=2, default=str)


# ---- CPU validation ----------------------------------------------------------------------------------
def cpu_check(out: str) -> list[str]:
    """Write both models and check them without a GPU. Returns the problems (empty: all good).
    Checks: transformers parses config.json; vLLM's CompressedTensorsConfig (when vLLM imports)
    parses the quantization config and yields the FP8 channel×token scheme, and its ignore logic
    leaves exactly lm_head and the routers unquantized; every tensor's name, shape and dtype match
    the checkpoint layout; the names match transformers' own model (experts un-fused to the
    per-expert names real checkpoints and vLLM's expert mapping use) and vLLM's expert mapping."""
    problems: list[str] = []
    for spec in MODELS.values():
        directory = write_model(spec, os.path.join(out, "models", spec["name"]))
        problems += [f"{spec['name']}: {p}" for p in _check_model(spec, directory)]
    return problems


def _check_model(spec: dict, directory: str) -> list[str]:
    from safetensors import safe_open

    problems = []
    expected = expected_tensors(spec)
    with safe_open(os.path.join(directory, "model.safetensors"), "pt") as handle:
        written = {name: (tuple(handle.get_slice(name).get_shape()), handle.get_slice(name).get_dtype())
                   for name in handle.keys()}
    dtype_names = {"bfloat16": "BF16", "float32": "F32", "float8_e4m3fn": "F8_E4M3"}
    for name in sorted(set(expected) | set(written)):
        if name not in written:
            problems.append(f"missing tensor {name}")
        elif name not in expected:
            problems.append(f"unexpected tensor {name}")
        elif (expected[name][0], dtype_names[expected[name][1]]) != written[name]:
            problems.append(f"{name}: written {written[name]}, expected {expected[name]}")
    problems += _check_against_transformers(spec, directory, set(written))
    problems += _check_against_vllm(spec, directory, set(written))
    return problems


def _check_against_transformers(spec: dict, directory: str, written: set[str]) -> list[str]:
    """transformers' config parse and its model's parameter names (meta device, no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    problems = []
    config = AutoConfig.from_pretrained(directory)
    if config.architectures != [spec["architecture"]]:
        problems.append(f"transformers reads architectures {config.architectures}")
    if getattr(config, "head_dim", None) != HEAD_DIM:
        problems.append(f"transformers reads head_dim {getattr(config, 'head_dim', None)}")
    experts = getattr(config, "num_experts", None) or getattr(config, "n_routed_experts", None)
    if experts != spec["experts"] or config.num_experts_per_tok != spec["topk"]:
        problems.append(f"transformers reads {experts} experts, top-{config.num_experts_per_tok}")
    config_plain = AutoConfig.from_pretrained(directory)
    config_plain.quantization_config = None  # names of the unquantized model; quantization adds scales
    if hasattr(config_plain, "__dict__"):
        config_plain.__dict__.pop("quantization_config", None)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config_plain)
    names = set()
    for name, param in model.state_dict().items():
        fused = re.match(r"(.*\.experts)\.(gate_up_proj|down_proj)$", name)
        if fused:  # transformers 5 fuses experts into 3-D tensors; checkpoints keep one per expert
            projections = ("gate_proj", "up_proj") if fused.group(2) == "gate_up_proj" else ("down_proj",)
            names |= {f"{fused.group(1)}.{e}.{p}.weight" for e in range(param.shape[0]) for p in projections}
        else:
            names.add(name)
    if "lm_head.weight" not in names:
        names.add("lm_head.weight")  # tied in some configs; untied here
    unscaled = {n for n in written if not n.endswith(".weight_scale")}
    for name in sorted(names - unscaled):
        if "rotary_emb" not in name:
            problems.append(f"transformers' model has {name}, the checkpoint does not")
    for name in sorted(unscaled - names):
        problems.append(f"checkpoint has {name}, transformers' model does not")
    return problems


def _check_against_vllm(spec: dict, directory: str, written: set[str]) -> list[str]:
    """vLLM's own parser and ignore logic, and its expert mapping; skipped (with a note on stderr)
    if vLLM cannot be imported here."""
    try:
        from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
            CompressedTensorsConfig,
        )
        from vllm.model_executor.layers.quantization.compressed_tensors.utils import (
            find_matched_target,
            should_ignore_layer,
        )
    except Exception as error:  # vLLM or its dependencies not importable on this machine
        print(f"note: vLLM's compressed-tensors classes not importable ({type(error).__name__}: {error}); "
              "skipped the vLLM checks", file=sys.stderr)
        return []
    problems = []
    with open(os.path.join(directory, "config.json")) as handle:
        raw = json.load(handle)["quantization_config"]
    config = CompressedTensorsConfig.from_config(raw)
    if config.get_name() != "compressed-tensors":
        problems.append(f"vLLM names the config {config.get_name()}")
    scheme = config.target_scheme_map.get("Linear")
    if scheme is None:
        return problems + [f"vLLM's target_scheme_map has no 'Linear': {list(config.target_scheme_map)}"]
    weights, inputs = scheme["weights"], scheme["input_activations"]
    # what CompressedTensorsW8A8Fp8MoEMethod needs for its per-channel path: channel weights,
    # dynamic token activations (else it asserts block strategy or raises for static inputs)
    def value(field):  # compressed-tensors stores enums as their values (use_enum_values)
        return str(getattr(field, "value", field))
    if (value(weights.strategy), weights.dynamic, weights.num_bits, value(weights.type)) != \
            ("channel", False, 8, "float"):
        problems.append(f"weights scheme {weights}")
    if (value(inputs.strategy), inputs.dynamic, inputs.num_bits) != ("token", True, 8):
        problems.append(f"input activation scheme {inputs}")
    if not config._is_fp8_w8a8(weights, inputs):
        problems.append("vLLM does not classify the scheme as FP8 W8A8")
    # which vLLM layers would be quantized: every Linear prefix; fused qkv / gate_up as vLLM fuses them
    fused = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    for name in sorted(n for n in written if n.endswith(".weight") and not n.endswith("norm.weight")
                       and "embed_tokens" not in n):
        prefix = name[: -len(".weight")]
        ignored = should_ignore_layer(prefix, ignore=config.ignore, fused_mapping=fused)
        quantized = (prefix + ".weight_scale") in written
        if ignored == quantized:
            problems.append(f"{prefix}: vLLM ignores it={ignored}, but the checkpoint "
                            f"{'has' if quantized else 'lacks'} a weight_scale")
        if not ignored:
            try:
                find_matched_target(prefix, ["Linear"], fused)
            except Exception:  # find_matched_target's signature differs between releases: not essential
                pass
    problems += _check_expert_mapping(spec, written)
    problems += _check_vllm_model_config(spec, directory)
    return problems


def _check_vllm_model_config(spec: dict, directory: str) -> list[str]:
    """vLLM's ModelConfig (no GPU needed): resolves the architecture in its registry, detects and
    verifies the quantization method, reads the head size the attention backend will get."""
    try:
        from vllm.config import ModelConfig

        config = ModelConfig(model=directory, skip_tokenizer_init=True, dtype="bfloat16", max_model_len=MAX_MODEL_LEN)
    except Exception as error:
        return [f"vLLM's ModelConfig refuses the model: {type(error).__name__}: {error}"[:500]]
    problems = []
    if list(config.architectures) != [spec["architecture"]]:
        problems.append(f"vLLM resolves architectures {config.architectures}")
    if config.quantization != "compressed-tensors":
        problems.append(f"vLLM detects quantization {config.quantization!r}")
    if config.get_head_size() != HEAD_DIM:
        problems.append(f"vLLM reads head size {config.get_head_size()}")
    return problems


def _check_expert_mapping(spec: dict, written: set[str]) -> list[str]:
    """Every per-expert checkpoint tensor must match one of vLLM's expert-mapping checkpoint names
    (RoutedExperts.make_expert_params_mapping with ckpt names gate_proj/down_proj/up_proj)."""
    try:
        from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
    except Exception as error:
        print(f"note: vLLM's RoutedExperts not importable ({type(error).__name__}); expert mapping not "
              "checked", file=sys.stderr)
        return []
    import torch

    try:
        if hasattr(RoutedExperts, "build_expert_params_mapping"):  # 0.26.0: no model needed
            mapping = RoutedExperts.build_expert_params_mapping("gate_proj", "down_proj", "up_proj", spec["experts"])
        else:  # the legacy entry point scans a model for LoRA prefixes: an empty module has none
            mapping = RoutedExperts.make_expert_params_mapping(torch.nn.Module(), "gate_proj", "down_proj",
                                                               "up_proj", spec["experts"])
    except Exception as error:
        return [f"could not build vLLM's expert mapping: {type(error).__name__}: {error}"]
    problems = []
    experts_seen = set()
    for name in sorted(n for n in written if ".experts." in n):
        expert = int(re.search(r"\.experts\.(\d+)\.", name).group(1))
        matches = [(param, expert_id, shard) for param, weight_name, expert_id, shard in mapping
                   if weight_name in name]
        if len(matches) != 1 or matches[0][1] != expert:
            problems.append(f"{name}: vLLM's expert mapping gives {matches}, expected one entry for expert {expert}")
        else:
            experts_seen.add(expert)
    if experts_seen != set(range(spec["experts"])):
        problems.append(f"experts loaded by the mapping: {len(experts_seen)} of {spec['experts']}")
    return problems


# ---- command line ------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="crash-repro-out", help="directory for models, logs, results.json")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run names (see --list), or a model or "
                        "variant name to take all its runs")
    parser.add_argument("--parallel", type=int, default=len(matrix()),
                        help="runs at once on the one GPU (default: the whole matrix; each run takes ~3 GB)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per run")
    parser.add_argument("--sanitize", action="store_true", help="re-run each faulted run under "
                        "compute-sanitizer memcheck, its report kept in runs/NAME-sanitize/memcheck.txt")
    parser.add_argument("--sanitize-timeout", type=float, default=540,
                        help="seconds per sanitized run (memcheck is 10-100x slower)")
    parser.add_argument("--list", action="store_true", help="print the matrix and exit")
    parser.add_argument("--cpu-check", action="store_true", help="write both models and validate them on CPU")
    parser.add_argument("--child", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args.child)
    runs = matrix()
    if args.only:
        wanted = set(args.only)
        runs = [r for r in runs if wanted & {r["name"], r["model"], r["variant"]}]
        unknown = wanted - {k for r in matrix() for k in (r["name"], r["model"], r["variant"])}
        if unknown:
            parser.error(f"unknown run names: {sorted(unknown)} (see --list)")
    if args.list:
        for run in runs:
            print(json.dumps({"name": run["name"], "total_tokens": run["total_tokens"],
                              "engine_kwargs": engine_kwargs(run["settings"])}))
        return 0
    os.makedirs(args.out, exist_ok=True)
    if args.cpu_check:
        problems = cpu_check(args.out)
        for problem in problems:
            print("PROBLEM", problem)
        print(f"cpu-check: {'FAILED' if problems else 'ok'} ({len(problems)} problems); models in "
              f"{os.path.join(args.out, 'models')}")
        return 1 if problems else 0
    results = run_matrix(runs, args.out, args.parallel, args.timeout, args.sanitize, args.sanitize_timeout)
    counts: dict[str, int] = {}
    for record in results:
        counts[record["outcome"]] = counts.get(record["outcome"], 0) + 1
    print(json.dumps({"summary": counts, "results": os.path.join(args.out, "results.json")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

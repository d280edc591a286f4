"""Do vLLM's engine modules import with the Python packages at hand? Run on the GPU machine after
tests/gpu/install_vllm_deps.sh (PYTHONPATH=/tmp/site), or here on CPU against vLLM's published wheel
to find what must be staged:

    python3 tests/gpu/vllm_imports.py [--cuda-platform] [--distributions FILE]

--cuda-platform: a machine without a GPU resolves vLLM's platform to "unspecified", and modules
that branch on the platform then import less; this sets vLLM's CudaPlatform first, as a GPU machine
would detect it. (Loading vLLM's .so files without a driver needs a libcuda.so.1 on
LD_LIBRARY_PATH: tests/gpu/stage_vllm_deps.sh --check builds a stub.)
--distributions FILE: write the installed distributions whose modules got imported, one a line.
The last line is the summary: "vllm imports: N of M modules import" (exit 1 when any fails).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import sys
import traceback

# What `vllm.LLM(...).generate(...)` of a Llama/Qwen3/Qwen3-MoE model imports on a CUDA machine:
# the engine, its worker and model runner, the models, FA2's backend and the compiled ops, the
# sampler, the structured-output backends and tokenizer modules the engine imports at start, and
# torch.compile's path (CUDA graphs and compilation on by default).
MODULES = (
    "vllm",
    "vllm._C_stable_libtorch",
    "vllm._moe_C_stable_libtorch",
    "vllm.cumem_allocator",
    "vllm.vllm_flash_attn",
    "vllm.entrypoints.llm",
    "vllm.engine.arg_utils",
    "vllm.config",
    "vllm.v1.engine.llm_engine",
    "vllm.v1.engine.core",
    "vllm.v1.engine.core_client",
    "vllm.v1.engine.processor",
    "vllm.v1.engine.input_processor",
    "vllm.v1.engine.output_processor",
    "vllm.v1.executor.abstract",
    "vllm.v1.executor.uniproc_executor",
    "vllm.v1.executor.multiproc_executor",
    "vllm.v1.worker.gpu_worker",
    "vllm.v1.worker.gpu_model_runner",
    "vllm.v1.core.sched.scheduler",
    "vllm.v1.core.kv_cache_utils",
    "vllm.v1.sample.sampler",
    "vllm.v1.sample.ops.topk_topp_sampler",
    "vllm.v1.attention.backends.flash_attn",
    "vllm.v1.attention.backends.fa_utils",
    "vllm.v1.attention.backends.triton_attn",
    "vllm.v1.attention.selector",
    "vllm.model_executor.model_loader",
    "vllm.model_executor.models.registry",
    "vllm.model_executor.models.llama",
    "vllm.model_executor.models.qwen3",
    "vllm.model_executor.models.qwen3_moe",
    "vllm.model_executor.layers.fused_moe",
    "vllm.model_executor.layers.fused_moe.fused_moe",
    "vllm.model_executor.layers.fused_moe.moe_permute_unpermute",
    "vllm.model_executor.layers.layernorm",
    "vllm.model_executor.layers.activation",
    "vllm.model_executor.layers.rotary_embedding",
    "vllm.model_executor.layers.quantization.fp8",
    "vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors",
    "vllm.compilation.backends",
    "vllm.compilation.decorators",
    "vllm.compilation.wrapper",
    "vllm.compilation.cuda_graph",
    "vllm.distributed.parallel_state",
    "vllm.v1.structured_output",
    "vllm.v1.structured_output.backend_xgrammar",
    "vllm.v1.structured_output.backend_guidance",
    "vllm.v1.structured_output.backend_outlines",
    "vllm.v1.structured_output.backend_lm_format_enforcer",
    "vllm.tokenizers",
    "vllm.tokenizers.hf",
    "vllm.tokenizers.mistral",
    "vllm.transformers_utils.config",
    "vllm.reasoning",
    "vllm.tool_parsers",
    "vllm.multimodal",
    "vllm.usage.usage_lib",
    "vllm.tracing",
)


def set_cuda_platform() -> None:
    """vLLM's CUDA platform answering device queries as an H200 (9.0) would, without a driver."""
    import vllm.platforms
    from vllm.platforms.cuda import CudaPlatform
    from vllm.platforms.interface import DeviceCapability

    class WithoutDriver(CudaPlatform):
        @classmethod
        def get_device_capability(cls, device_id: int = 0):
            return DeviceCapability(9, 0)

        @classmethod
        def get_device_name(cls, device_id: int = 0) -> str:
            return "NVIDIA H200 (assumed: no driver here)"

        @classmethod
        def get_device_total_memory(cls, device_id: int = 0) -> int:
            return 141 << 30

        @classmethod
        def device_count(cls) -> int:
            return 1

    vllm.platforms.current_platform = WithoutDriver()


def imported_distributions() -> list[str]:
    """Installed distributions that provide the top-level modules now in sys.modules."""
    providers = importlib.metadata.packages_distributions()
    names = set()
    for module in list(sys.modules):
        top = module.split(".")[0]
        names.update(providers.get(top, ()))
    return sorted(names, key=str.lower)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda-platform", action="store_true")
    parser.add_argument("--distributions")
    args = parser.parse_args(argv)
    if args.cuda_platform:
        # vLLM disables Triton when Triton sees no GPU driver, except where CUDA_VISIBLE_DEVICES is
        # empty (Ray's workers): keep Triton's kernels, as on the GPU machine
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
        set_cuda_platform()
    failed = []
    for name in MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name == name:  # gone in this vLLM release: say so, it is no missing dependency
                print(f"absent   {name}")
                continue
            failed.append(name)
            print(f"FAIL     {name}: ModuleNotFoundError: {error}")
        except Exception as error:  # the first line of what a user would see
            failed.append(name)
            print(f"FAIL     {name}: {type(error).__name__}: {' '.join(str(error).split())[:300]}")
            traceback.print_exc(limit=-3, file=sys.stderr)
        else:
            print(f"ok       {name}")
    if args.distributions:
        with open(args.distributions, "w", encoding="utf-8") as handle:
            handle.write("".join(f"{name}\n" for name in imported_distributions()))
    print(f"vllm imports: {len(MODULES) - len(failed)} of {len(MODULES)} modules import"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

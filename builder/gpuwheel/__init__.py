"""gpuwheel: GPU-specific wheels for vLLM and flash-attn, built, audited, smoke-tested, published."""

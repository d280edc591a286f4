"""tests/gpu/crash_repro.py on the CPU: its matrix, how it classifies a run's end, and the tiny FP8
MoE models it writes (checked against transformers and, where it imports, vLLM's own parsers).
The engine runs themselves need the GPU machine."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "gpu" / "crash_repro.py"


@pytest.fixture(scope="module")
def repro():
    spec = importlib.util.spec_from_file_location("crash_repro", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _need_model_packages():
    for name in ("torch", "safetensors", "transformers"):
        pytest.importorskip(name, reason=f"writing and checking the tiny models needs {name} "
                                         "(pip install torch safetensors transformers)")


def test_matrix_changes_one_thing_at_a_time(repro):
    runs = {run["name"]: run for run in repro.matrix()}
    assert len(runs) == 2 * len(repro.VARIANTS)
    for model in ("qwen3moe", "glm4moe"):
        base = repro.engine_kwargs(runs[f"{model}-base"]["settings"])
        assert runs[f"{model}-base"]["total_tokens"] == 8192
        assert runs[f"{model}-tokens8191"]["total_tokens"] == 8191
        assert runs[f"{model}-tokens8193"]["total_tokens"] == 8193
        assert base["max_num_batched_tokens"] == 8192 and base["enable_chunked_prefill"]
        assert base["enable_prefix_caching"] and base["max_model_len"] == 2100 and not base["enforce_eager"]
        assert "compilation_config" not in base and "moe_backend" not in base  # vLLM's defaults
        for variant, changed in (("eager", {"enforce_eager": True}),
                                 ("nocudagraph", {"compilation_config": {"cudagraph_mode": "NONE"}}),
                                 ("moe-triton", {"moe_backend": "triton"}),
                                 ("moe-cutlass", {"moe_backend": "cutlass"})):
            assert repro.engine_kwargs(runs[f"{model}-{variant}"]["settings"]) == dict(base, **changed)


def test_list_and_only(repro, capsys):
    assert repro.main(["--list", "--only", "glm4moe-base", "eager"]) == 0
    names = [json.loads(line)["name"] for line in capsys.readouterr().out.splitlines()]
    assert names == ["qwen3moe-eager", "glm4moe-base", "glm4moe-eager"]
    with pytest.raises(SystemExit):
        repro.main(["--list", "--only", "no-such-run"])


def _fake_interpreter(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fake-python"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.mark.parametrize("body, outcome", [
    ("echo 'CUDA error: an illegal memory access was encountered' >&2; kill -SEGV $$", "crashed"),
    ("sleep 30", "timeout"),
])
def test_launch_classifies_a_dead_child(repro, tmp_path, monkeypatch, body, outcome):
    """A child killed by a signal or past its timeout leaves no result file: the parent names it."""
    monkeypatch.setattr(sys, "executable", _fake_interpreter(tmp_path, body))
    run = dict(repro.matrix()[0], model_dir=str(tmp_path))
    record = repro.launch(run, str(tmp_path / "out"), timeout=2)
    assert record["outcome"] == outcome
    assert record["cuda_fault"] == (outcome == "crashed")
    if outcome == "crashed":
        assert record["signal"] == "SIGSEGV"
        assert any("illegal memory access" in line for line in record["last_lines"])


def test_launch_reads_the_child_result(repro, tmp_path, monkeypatch):
    """A child that wrote its result (an error surfacing in Python) is reported with it."""
    body = ('python3 -c "import json,sys; s=json.load(open(sys.argv[1])); json.dump({\'outcome\': \'error\', '
            '\'error\': \'RuntimeError: CUDA error: an illegal memory access\', \'phase\': \'phase 1\'}, '
            'open(s[\'result_path\'], \'w\'))" "$3"; exit 1')
    monkeypatch.setattr(sys, "executable", _fake_interpreter(tmp_path, body))
    run = dict(repro.matrix()[0], model_dir=str(tmp_path))
    record = repro.launch(run, str(tmp_path / "out"), timeout=20)
    assert (record["outcome"], record["phase"], record["cuda_fault"]) == ("error", "phase 1", True)


@pytest.fixture(scope="module")
def written_models(repro, tmp_path_factory):
    _need_model_packages()
    out = tmp_path_factory.mktemp("crash-repro")
    return {name: repro.write_model(spec, str(out / "models" / name)) for name, spec in repro.MODELS.items()}


def test_written_models_pass_the_cpu_checks(repro, written_models):
    for name, directory in written_models.items():
        assert repro._check_model(repro.MODELS[name], directory) == []
        config = json.loads(Path(directory, "config.json").read_text())
        quant = config["quantization_config"]
        assert quant["quant_method"] == "compressed-tensors" and quant["format"] == "float-quantized"
        assert quant["ignore"] == ["lm_head", "re:.*mlp.gate$"]
        assert config["head_dim"] == 128


def test_fp8_weights_dequantize_to_the_random_weights(repro, written_models):
    """weight_scale is per output channel and the e4m3 values use the format's range."""
    import torch
    from safetensors import safe_open

    with safe_open(os.path.join(written_models["qwen3moe"], "model.safetensors"), "pt") as handle:
        weight = handle.get_tensor("model.layers.1.mlp.experts.127.down_proj.weight")
        scale = handle.get_tensor("model.layers.1.mlp.experts.127.down_proj.weight_scale")
    assert weight.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert scale.shape == (weight.shape[0], 1)
    peaks = weight.to(torch.float32).abs().amax(dim=1)
    assert torch.allclose(peaks, torch.full_like(peaks, 448.0))  # each row's largest value hits e4m3's max


def test_checks_catch_a_wrong_layout(repro, written_models):
    """The validators are not vacuous: a renamed tensor, a quantized router, an expert index that
    vLLM's mapping would not find are all reported."""
    spec, directory = repro.MODELS["qwen3moe"], written_models["qwen3moe"]
    names = set(repro.expected_tensors(spec))
    renamed = (names - {"model.layers.0.self_attn.q_proj.weight"}) | {"model.layers.0.self_attn.query.weight"}
    assert repro._check_against_transformers(spec, directory, renamed)
    vllm = importlib.util.find_spec("vllm") is not None
    if not vllm:
        pytest.skip("vLLM not installed here: its ignore logic and expert mapping are not checked")
    quantized_router = names | {"model.layers.0.mlp.gate.weight_scale"}
    assert any("mlp.gate" in p for p in repro._check_against_vllm(spec, directory, quantized_router))
    out_of_range = names | {"model.layers.0.mlp.experts.128.up_proj.weight"}
    assert repro._check_expert_mapping(spec, out_of_range)


def test_moe_in_use_names_the_selected_kernel(repro):
    """What the worker reports for a layer holding vLLM's FP8 MoE method with its CUTLASS kernel
    (classes named as vLLM 0.26.0 names them; the GPU run reads the real ones)."""
    torch = pytest.importorskip("torch", reason="the MoE layer walk iterates torch modules (pip install torch)")
    import enum
    import types

    backend = enum.Enum("Fp8MoeBackend", {"VLLM_CUTLASS": "VLLM_CUTLASS"}).VLLM_CUTLASS
    wrapper_cls = type("TritonOrCutlassExperts", (), {})
    wrapper = wrapper_cls()
    wrapper.experts, wrapper.fallback_experts = type("CutlassExpertsFp8", (), {})(), type("TritonExperts", (), {})()
    method = type("CompressedTensorsW8A8Fp8MoEMethod", (), {})()
    method.fp8_backend, method.experts_cls = backend, wrapper_cls
    method.moe_kernel = types.SimpleNamespace(fused_experts=wrapper,
                                              prepare_finalize=type("MoEPrepareAndFinalizeNoDPEPModular", (), {})())
    model = torch.nn.Module()
    model.experts = type("RoutedExperts", (torch.nn.Module,), {})()
    model.experts.quant_method = method
    model.linear = torch.nn.Module()
    model.linear.quant_method = type("CompressedTensorsLinearMethod", (), {})()  # not a MoE layer
    worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(get_model=lambda: model))
    assert repro._moe_in_use(worker) == [{
        "layer": "experts", "layer_class": "RoutedExperts", "quant_method": "CompressedTensorsW8A8Fp8MoEMethod",
        "fp8_backend": "VLLM_CUTLASS", "experts_cls": "TritonOrCutlassExperts",
        "kernel_experts": "TritonOrCutlassExperts", "kernel_prepare_finalize": "MoEPrepareAndFinalizeNoDPEPModular",
        "wrapped_experts": "CutlassExpertsFp8", "wrapped_fallback_experts": "TritonExperts"}]

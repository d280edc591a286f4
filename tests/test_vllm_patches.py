"""The shipped vLLM patch sets, against the real sdists of the versions the recipes pin.

- every vLLM-tree patch applies with --fuzz=0 and leaves the lines it promises;
- patch 0001 (moe_permute, hardening for vllm issue 43396): the real upstream `moe_permute` from the
  sdist, run on CPU torch at the 8192-token shape (8 x 1001 + 184): with routing or per-token
  scales shorter than hidden_states pristine reads out of bounds and patched raises a clear
  ValueError; longer scales (and, where the op reads input's rows, longer routing) pass and give
  upstream's result; with rows that agree both equal a plain torch reference;
- patch 0002 (fused MoE, hardening): the real `invoke_fused_moe_triton_kernel` refuses tensors
  shorter than its kernel reads and launches longer ones exactly as upstream; the real
  `fused_experts_impl` refuses shorter routing and takes longer; the pinned kernels already use
  int64 token offsets;
- patch 0003 (vllm-flash-attn FA2 archs): applies to its pre-image and, through the sdist's own
  `cuda_archs_loose_intersection` run by real cmake, gives sm_120 native SASS where "8.0+PTX" gave
  only compute_80 PTX.

The CUDA op behind `torch.ops._moe_C.moe_permute` cannot run here; a CPU implementation that follows
its source (sort the routing rows of the tensor the sdist's op takes them from, fill permuted_idx for
local experts, leave the caller's sentinel elsewhere, every buffer indexed with bounds checks) is
registered under the sdist's own schema. The GPU runs of the real ops are in
tests/gpu/test_vllm_patch_kernels.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from gpuwheel.kinds import vllm as vllm_kind
from gpuwheel.patch_series import read_series
from vllm_patches_helpers import (
    MOE_DIR, PATCHES, apply_patch, extract, hunk_preimage, load_functions, op_schema, patch_files,
    pinned_vllm_versions, sorted_rows_of, vllm_sdist,
)

PINS = pinned_vllm_versions()
VERSIONS = sorted(PINS)
# The scheduled batch of vllm issue 43396: 8 requests of 1001 tokens and one of 184.
TOKENS = 8 * 1001 + 184
BINDINGS = {"0.26.0": "csrc/libtorch_stable/moe/torch_bindings.cpp"}
OP_SOURCES = {"0.26.0": "csrc/libtorch_stable/moe/moe_permute_unpermute_op.cu"}


def own_tree_patches(version: str):
    return [ref for ref in read_series(PATCHES / version, ("vllm-flash-attn",)) if not ref.tree]


@pytest.fixture(scope="session")
def trees(tmp_path_factory):
    """version → (pristine, patched) trees holding the files the patches touch (+ what tests read)."""
    built = {}

    def get(version: str) -> tuple[Path, Path]:
        if version not in built:
            sdist = vllm_sdist(version, PINS[version])
            names = {name for ref in own_tree_patches(version) for name in patch_files(ref.path)}
            names |= {BINDINGS.get(version, "csrc/moe/torch_bindings.cpp"), "cmake/utils.cmake"}
            root = tmp_path_factory.mktemp(f"vllm-{version}")
            pristine = extract(sdist, sorted(names), root / "pristine")
            patched = extract(sdist, sorted(names), root / "patched")
            for ref in own_tree_patches(version):
                result = apply_patch(ref.path, patched)
                assert result.returncode == 0, f"{version} {ref.name}: {result.stdout}{result.stderr}"
            built[version] = (pristine, patched)
        return built[version]
    return get


# ---------------------------------------------------------------- applying


# The fixes every set carries, then (0.26.0) the build-time and serving-profile patches.
SERIES = {"0.26.0": [("0001", ""), ("0002", ""), ("0003", "vllm-flash-attn"), ("0004", "vllm-flash-attn"),
                     ("0005", "vllm-flash-attn"), ("0006", ""), ("0007", ""), ("0008", ""), ("0009", ""),
                     ("0010", ""), ("0011", ""), ("0012", "vllm-flash-attn")],
          "0.33.0": [("0001", ""), ("0002", ""), ("0003", "vllm-flash-attn")]}


@pytest.mark.parametrize("version", VERSIONS)
def test_series_lists_its_patches_each_saying_what_it_is_for(version):
    refs = read_series(PATCHES / version, ("vllm-flash-attn",))
    assert [(r.name[:4], r.tree) for r in refs] == SERIES[version]
    for ref in refs:
        header = ref.path.read_text().split("\n--- a/", 1)[0]
        assert f"For: vLLM {version}" in header and ("Fixes" in header or "Why:" in header), \
            f"{ref.name}: header lacks what/for"


@pytest.mark.parametrize("version", VERSIONS)
def test_patches_apply_exactly_to_the_pinned_sdist(version, trees, tmp_path):
    pristine, _ = trees(version)
    tree = shutil.copytree(pristine, tmp_path / "tree")
    for ref in own_tree_patches(version):  # in the series' order, as the patch stage applies them
        result = apply_patch(ref.path, tree)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "fuzz" not in result.stdout and "FAILED" not in result.stdout


def op_source(tree: Path, version: str) -> str:
    return (tree / OP_SOURCES.get(version, "csrc/moe/moe_permute_unpermute_op.cu")).read_text()


@pytest.mark.parametrize("version", VERSIONS)
def test_patched_lines(version, trees):
    pristine, patched = trees(version)
    python = (patched / MOE_DIR / "moe_permute_unpermute.py").read_text()
    # upstream's gather stays: the checks before it keep every index below the scale's rows
    assert "a1q_scale = a1q_scale[permuted_idx.clamp(max=n_token * topk - 1) // topk]" in python
    assert "a1q_scale.size(0) < n_token" in python and "a1q_scale.size(0) != n_token" not in python
    op = op_source(patched, version)
    impl = op[op.index("void moe_permute_impl("):]
    checks = impl.index('"moe_permute: topk_ids has "')
    first_launch = min(impl.index(word) for word in ("moe_sort_routing(", "sortAndScanExpert(") if word in impl)
    assert checks < first_launch, "the row checks must run before the op touches memory"
    # refused are the row counts the op reads out of bounds: fewer where it sorts input's rows,
    # any other where it sorts topk_ids' own rows into buffers sized from input's
    if sorted_rows_of(op_source(pristine, version)) == "input":
        assert "topk_ids.size(0) < n_token" in python and "topk_ids.size(0) >= input.size(0)" in impl
    else:
        assert "topk_ids.size(0) != n_token" in python and "topk_ids.size(0) == input.size(0)" in impl
    fused = (patched / MOE_DIR / "fused_moe.py").read_text()
    assert "if topk_ids.size(0) < num_tokens:" in fused and "fused_moe: per-token A_scale" in fused


# ------------------------------------------------------- 0001 moe_permute on CPU


class MoePermuteOp:
    """`_moe_C::moe_permute` on CPU, registered under the sdist's schema, following its CUDA source.

    The routing sort walks `sorted_rows * topk` entries of topk_ids, where `sorted_rows` are the
    rows of the tensor the sdist's op reads them from (input in 0.26.0, topk_ids in 0.33.0), and
    stably sorts them by local expert (non-local go last), writing into a buffer sized like
    inv_permuted_idx; the expand step then walks `input rows * topk` destination rows, filling
    permuted_idx for local experts only (the rest keep the caller's sentinel). Every buffer is
    indexed explicitly, so what the CUDA op would read or write out of bounds raises IndexError.
    """

    library = None
    schema = None
    sorted_rows = "input"

    @classmethod
    def register(cls, torch, schema: str, sorted_rows: str) -> None:
        if cls.library is None:
            cls.library = torch.library.Library("_moe_C", "DEF")
            cls.library.define(schema)
            cls.library.impl("moe_permute", cls.run, "CPU")
            cls.schema = schema
        assert cls.schema == schema, "pinned versions disagree on the moe_permute schema"
        cls.sorted_rows = sorted_rows

    @staticmethod
    def run(input, topk_ids, token_expert_indices, expert_map, n_expert, n_local_expert, topk,
            permuted_input, expert_first_token_offset, inv_permuted_idx, permuted_idx):
        import torch
        sorted_rows = {"input": input, "topk_ids": topk_ids}[MoePermuteOp.sorted_rows].size(0)
        routes = torch.arange(sorted_rows * topk)
        experts = topk_ids.reshape(-1)[routes].long()
        local = experts if expert_map is None else expert_map[experts].long()
        local = torch.where(local < 0, n_local_expert, local)
        order = torch.sort(local, stable=True).indices
        never_written = 2**31 - 1  # what the expand step would read from an unwritten sort slot
        sorted_row_idx = torch.full((inv_permuted_idx.numel(),), never_written, dtype=torch.int64)
        sorted_row_idx[routes] = token_expert_indices.reshape(-1)[order].long()
        counts = torch.bincount(local[local < n_local_expert], minlength=n_local_expert)
        expert_first_token_offset.copy_(torch.cat([counts.new_zeros(1), counts.cumsum(0)]))
        valid = int(counts.sum())
        dest = torch.arange(input.size(0) * topk)
        source = sorted_row_idx[dest]
        inv_permuted_idx.view(-1)[source] = dest.to(torch.int32)
        permuted_idx[dest[:valid]] = source[:valid].to(torch.int32)
        permuted_input[dest[:valid]] = input[source[:valid] // topk]


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="CPU torch runs the real moe_permute (pip install torch)")


@pytest.fixture
def moe_permute(torch, trees):
    """version → (pristine, patched) real upstream `moe_permute` functions."""
    def get(version: str):
        pristine, patched = trees(version)
        MoePermuteOp.register(torch, op_schema(pristine / BINDINGS.get(version, "csrc/moe/torch_bindings.cpp"),
                                               "moe_permute"), sorted_rows_of(op_source(pristine, version)))
        return tuple(load_functions(tree / MOE_DIR / "moe_permute_unpermute.py", ("moe_permute",),
                                    {"torch": torch})["moe_permute"] for tree in (pristine, patched))
    return get


def routing(torch, rows: int, n_expert: int = 128, topk: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(rows, n_expert, generator=generator)
    return scores.topk(topk, dim=1).indices.to(torch.int32)


def fp8_inputs(torch, rows: int, hidden: int = 128):
    generator = torch.Generator().manual_seed(1)
    hidden_states = torch.randn(rows, hidden, generator=generator).to(torch.float8_e4m3fn)
    scale = torch.arange(rows, dtype=torch.float32).unsqueeze(1)  # row i's scale is i: shows the gather
    return hidden_states, scale


def reference_permute(torch, topk_ids, expert_map, n_local: int):
    """Tokens in permuted order, straight from the routing: expert by expert, rows ascending."""
    local = topk_ids.flatten().long()
    if expert_map is not None:
        local = expert_map[local].long()
    topk = topk_ids.size(1)
    return torch.cat([(local == e).nonzero().flatten() // topk for e in range(n_local)])


def assert_permuted_like_reference(torch, result, hidden_states, tokens, topk: int):
    permuted, permuted_scale, offsets, _, _ = result
    valid = tokens.numel()
    assert permuted_scale.shape == (hidden_states.size(0) * topk, 1)
    assert torch.equal(permuted_scale[:valid, 0].long(), tokens)
    assert torch.equal(permuted[:valid].view(torch.uint8), hidden_states[tokens].view(torch.uint8))
    assert int(offsets[-1]) == valid


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("expert_parallel", [False, True], ids=["all-experts", "half-local"])
def test_moe_permute_rows_agree_at_8192(version, expert_parallel, torch, moe_permute):
    pristine, patched = moe_permute(version)
    n_expert, topk = 128, 8
    topk_ids = routing(torch, TOKENS, n_expert, topk)
    hidden_states, scale = fp8_inputs(torch, TOKENS)
    expert_map, n_local = None, n_expert
    if expert_parallel:  # this rank holds experts 64..127: half the routed rows keep the sentinel
        n_local = n_expert // 2
        expert_map = torch.full((n_expert,), -1, dtype=torch.int32)
        expert_map[n_local:] = torch.arange(n_local, dtype=torch.int32)
    tokens = reference_permute(torch, topk_ids, expert_map, n_local)
    for moe in (pristine, patched):
        result = moe(hidden_states, scale, topk_ids, n_expert, n_local, expert_map)
        assert_permuted_like_reference(torch, result, hidden_states, tokens, topk)
        if expert_parallel:
            assert tokens.numel() < TOKENS * topk and bool((result[4][tokens.numel():] == TOKENS * topk).all())


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("scale_rows", [4096, 1])
def test_moe_permute_short_scale(version, scale_rows, torch, moe_permute):
    pristine, patched = moe_permute(version)
    topk_ids = routing(torch, TOKENS)
    hidden_states, scale = fp8_inputs(torch, TOKENS)
    short = scale[:scale_rows]
    with pytest.raises(IndexError, match="out of bounds"):  # the bug: on a GPU, an illegal memory access
        pristine(hidden_states, short, topk_ids, 128)
    with pytest.raises(ValueError, match=rf"a1q_scale has {scale_rows} rows but hidden_states has {TOKENS}"):
        patched(hidden_states, short, topk_ids, 128)


@pytest.mark.parametrize("version", VERSIONS)
def test_moe_permute_longer_scale_passes_as_upstream(version, torch, moe_permute):
    """A per-token scale padded past the batch (8704 rows for 8192 tokens): the gather reads rows up to
    8191 only, so upstream is right and the patched wrapper gives the same result."""
    pristine, patched = moe_permute(version)
    topk_ids = routing(torch, TOKENS)
    hidden_states, _ = fp8_inputs(torch, TOKENS)
    _, longer = fp8_inputs(torch, TOKENS + 512)
    tokens = reference_permute(torch, topk_ids, None, 128)
    results = [moe(hidden_states, longer, topk_ids, 128) for moe in (pristine, patched)]
    for result in results:
        assert_permuted_like_reference(torch, result, hidden_states, tokens, 8)
    assert all(torch.equal(p, q) for p, q in zip(results[0][1:], results[1][1:]))


@pytest.mark.parametrize("version", VERSIONS)
def test_moe_permute_short_routing(version, torch, moe_permute):
    """topk_ids (and its scale) cover 4096 tokens, hidden_states 8192: the op reads routing rows that
    do not exist (on the H100 with 0.20.0's op the sentinel it left made the scale gather read row
    8191 of a 4096-row scale)."""
    pristine, patched = moe_permute(version)
    hidden_states, scale = fp8_inputs(torch, TOKENS)
    topk_ids = routing(torch, 4096)
    with pytest.raises(IndexError, match="out of bounds"):
        pristine(hidden_states, scale[:4096], topk_ids, 128)
    message = (rf"topk_ids has 4096 rows but hidden_states has {TOKENS}: topk_ids \(4096, 8\), "
               rf"hidden_states \({TOKENS}, 128\)")
    with pytest.raises(ValueError, match=message):
        patched(hidden_states, scale[:4096], topk_ids, 128)


@pytest.mark.parametrize("version", VERSIONS)
def test_moe_permute_longer_routing(version, torch, trees, moe_permute):
    """topk_ids padded past the batch (8704 routing rows for 8192 tokens). 0.26.0's op sorts and
    expands input's rows: the extra rows are not read, upstream is right and the patch lets it pass.
    0.33.0's op sorts topk_ids' own rows into buffers sized from input's: out of bounds, refused."""
    pristine, patched = moe_permute(version)
    hidden_states, scale = fp8_inputs(torch, TOKENS)
    topk_ids = routing(torch, TOKENS + 512)
    if sorted_rows_of(op_source(trees(version)[0], version)) == "input":
        tokens = reference_permute(torch, topk_ids[:TOKENS], None, 128)
        results = [moe(hidden_states, scale, topk_ids, 128) for moe in (pristine, patched)]
        for result in results:
            assert_permuted_like_reference(torch, result, hidden_states, tokens, 8)
        assert all(torch.equal(p, q) for p, q in zip(results[0][1:], results[1][1:]))
    else:
        with pytest.raises(IndexError, match="out of bounds"):
            pristine(hidden_states, scale, topk_ids, 128)
        with pytest.raises(ValueError, match=f"topk_ids has {TOKENS + 512} rows but hidden_states has {TOKENS}"):
            patched(hidden_states, scale, topk_ids, 128)


@pytest.mark.parametrize("version", VERSIONS)
def test_moe_permute_per_tensor_scale_untouched(version, torch, moe_permute):
    _, patched = moe_permute(version)
    hidden_states, _ = fp8_inputs(torch, TOKENS)
    scale = torch.tensor([0.5])
    assert patched(hidden_states, scale, routing(torch, TOKENS), 128)[1] is scale


# ------------------------------------------------------- 0002 fused MoE guards


class RecordedLaunch:
    """Stands in for `fused_moe_kernel[grid](...)` (Triton cannot launch on CPU): records the call."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def invoke_kernel(torch, tree: Path):
    """The real upstream invoke_fused_moe_triton_kernel; the vLLM helpers it calls before the launch
    answer as on a plain CUDA build (no swap-AB, no tensor descriptors)."""
    launch = RecordedLaunch()
    namespace = {"torch": torch, "triton": SimpleNamespace(cdiv=lambda a, b: -(-a // b)), "fused_moe_kernel": launch,
                 "enable_swap_ab": lambda *a: False, "warn_if_moe_use_td_ineffective": lambda *a, **k: None,
                 "resolve_moe_use_td": lambda: False}
    load_functions(tree / MOE_DIR / "fused_moe.py", ("invoke_fused_moe_triton_kernel",), namespace)
    return namespace["invoke_fused_moe_triton_kernel"], launch


def fp8_launch_args(torch, tokens: int, topk: int, *, weight_rows: int | None = None, scale_rows: int | None = None):
    """Arguments of the second (w2) GEMM of an FP8 per-token MoE, as fused_experts_impl passes them."""
    a = torch.zeros(tokens * topk, 128, dtype=torch.float8_e4m3fn)
    w2 = torch.zeros(16, 256, 128, dtype=torch.float8_e4m3fn)
    c = torch.empty(tokens, topk, 256)
    a_scale = torch.ones(scale_rows or tokens * topk, 1)
    w_scale = torch.ones(16, 256, 1)
    weights = torch.ones(weight_rows or tokens, topk)
    sorted_ids = torch.zeros(tokens * topk + 16 * 15, dtype=torch.int32)
    expert_ids = torch.zeros(sorted_ids.numel() // 16, dtype=torch.int32)
    config = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 1}
    return (a, w2, c, a_scale, w_scale, weights, sorted_ids, expert_ids, torch.zeros(1, dtype=torch.int32),
            True, 1, config), dict(compute_type=None, use_fp8_w8a8=True, use_int8_w8a8=False,
                                   use_int8_w8a16=False, use_int4_w4a16=False, per_channel_quant=True)


@pytest.mark.parametrize("version", VERSIONS)
def test_fused_moe_refuses_short_topk_weights_and_scales(version, torch, trees):
    pristine_tree, patched_tree = trees(version)
    pristine, pristine_launch = invoke_kernel(torch, pristine_tree)
    patched, patched_launch = invoke_kernel(torch, patched_tree)
    args, kwargs = fp8_launch_args(torch, TOKENS, 8)
    patched(*args, **kwargs)
    assert len(patched_launch.calls) == 1, "consistent rows reach the kernel launch"
    short_weights, kwargs = fp8_launch_args(torch, TOKENS, 8, weight_rows=4096)
    pristine(*short_weights, **kwargs)
    assert len(pristine_launch.calls) == 1, "unpatched: launched with topk_weights shorter than the mask bound"
    with pytest.raises(ValueError, match=r"topk_weights \(4096, 8\) has fewer than 65536 entries"):
        patched(*short_weights, **kwargs)
    short_scale, kwargs = fp8_launch_args(torch, TOKENS, 8, scale_rows=4096)
    with pytest.raises(ValueError, match=r"per-token A_scale \(4096, 1\) has fewer rows than A \(65536, 128\)"):
        patched(*short_scale, **kwargs)
    assert len(patched_launch.calls) == 1


@pytest.mark.parametrize("version", VERSIONS)
def test_fused_moe_launches_longer_topk_weights_and_scales_as_upstream(version, torch, trees):
    """Weights and scales with rows past the batch: the kernel reads ids below A rows * top_k only."""
    args, kwargs = fp8_launch_args(torch, TOKENS, 8, weight_rows=TOKENS + 512, scale_rows=(TOKENS + 512) * 8)
    launches = []
    for tree in trees(version):
        invoke, launch = invoke_kernel(torch, tree)
        invoke(*args, **kwargs)
        assert len(launch.calls) == 1
        launches.append(launch.calls[0][1:])
    (pristine_args, pristine_kwargs), (patched_args, patched_kwargs) = launches
    assert pristine_kwargs == patched_kwargs
    assert all(p is q if torch.is_tensor(p) else p == q for p, q in zip(pristine_args, patched_args))


class ReachedConfig(Exception):
    """fused_experts_impl got past its argument checks (to the config lookup)."""


def fused_experts_impl(torch, tree: Path):
    """The real upstream fused_experts_impl, stopped at the config lookup that follows its checks."""
    def reached(**kwargs):
        raise ReachedConfig
    namespace = {"torch": torch, "MoEActivation": SimpleNamespace(from_str=lambda name: name),
                 "_get_config_dtype_str": reached}
    load_functions(tree / MOE_DIR / "fused_moe.py", ("fused_experts_impl",), namespace)
    return namespace["fused_experts_impl"]


@pytest.mark.parametrize("version", VERSIONS)
def test_fused_experts_refuses_short_routing_and_takes_longer(version, torch, trees):
    pristine, patched = (fused_experts_impl(torch, tree) for tree in trees(version))
    hidden_states = torch.zeros(TOKENS, 128, dtype=torch.bfloat16)
    w1, w2 = torch.zeros(16, 512, 128), torch.zeros(16, 128, 256)

    def call(impl, rows: int):
        topk_ids = routing(torch, rows, n_expert=16)
        return impl(hidden_states, w1, w2, torch.ones(rows, 8), topk_ids)

    for impl in (pristine, patched):
        for rows in (TOKENS, TOKENS + 512):  # longer routing: the kernels mask ids past TOKENS * top_k
            with pytest.raises(ReachedConfig):
                call(impl, rows)
    with pytest.raises(ReachedConfig):
        call(pristine, 4096)  # unpatched: on to the kernels, whose padding ids now count as tokens
    with pytest.raises(ValueError, match=rf"fused_experts: topk_ids has 4096 rows but hidden_states has {TOKENS}"):
        call(patched, 4096)


@pytest.mark.parametrize("version", VERSIONS)
def test_fused_moe_kernel_token_offsets_are_int64(version, trees):
    """Why 0002 is not an int32 fix: the pinned kernel widens token and expert offsets already, and at
    GLM-4.6's shapes (hidden 5120, top-8) 8192 tokens stay far below 2**31 elements anyway."""
    source = (trees(version)[0] / MOE_DIR / "fused_moe.py").read_text()
    kernel = source[source.index("def fused_moe_kernel("):]
    kernel = kernel[:kernel.index("\ndef ", 1)]
    assert "offs_token = offs_token.to(tl.int64)" in kernel
    assert "off_experts = tl.load(expert_ids_ptr + pid_m).to(tl.int64)" in kernel
    assert 8192 * 8 * 5120 < 2**31


# ------------------------------------------------------- 0003 vllm-flash-attn FA2 archs

def fa2_arch_list(cmake_text: str) -> str:
    match = re.search(r'cuda_archs_loose_intersection\(FA2_ARCHS\s+"([^"]+)"', cmake_text)
    assert match, "no FA2_ARCHS line"
    return match.group(1)


def cmake_values(utils: Path, body: str, names, tmp_path: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """Run `body` after vLLM's utils.cmake with real `cmake -P`: the value each variable of `names` ends with."""
    script = tmp_path / "probe.cmake"
    script.write_text(f'cmake_minimum_required(VERSION 3.20)\ninclude("{utils}")\n{body}\n'
                      + "".join(f'message("{name}=${{{name}}}")\n' for name in names))
    out = subprocess.run(["cmake", "-P", str(script)], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})}).stderr
    return dict(line.split("=", 1) for line in out.splitlines() if line.split("=", 1)[0] in names)


def loose_intersection(utils: Path, src: str, targets: list[str], tmp_path: Path) -> dict[str, str]:
    """target → vLLM's cuda_archs_loose_intersection(src, target)."""
    body = "".join(f'cuda_archs_loose_intersection(_out{i} "{src}" "{target}")\n' for i, target in enumerate(targets))
    values = cmake_values(utils, body, [f"_out{i}" for i in range(len(targets))], tmp_path)
    return {target: values[f"_out{i}"] for i, target in enumerate(targets)}


# 0.26.0's 0003 was made against the pinned fork, whose own utils.cmake maps a requested 9.0a onto
# 9.0 before FA2 is chosen: "9.0a" in the list keeps sm_90a (docs/patches.md).
FA2_LIST = {"0.26.0": "8.0;8.6;8.9;9.0a;10.0;11.0;12.0+PTX", "0.33.0": "8.0;8.6;8.9;9.0;10.0;11.0;12.0+PTX"}


@pytest.mark.parametrize("version", VERSIONS)
def test_fa2_patch_applies_to_its_preimage(version, tmp_path):
    patch = PATCHES / version / "0003-vllm-flash-attn-fa2-native-sass.patch"
    (name, before), = hunk_preimage(patch).items()
    (tmp_path / name).write_text(before)
    result = apply_patch(patch, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    after = (tmp_path / name).read_text()
    assert fa2_arch_list(before) == "8.0+PTX"
    assert fa2_arch_list(after) == FA2_LIST[version]


@pytest.mark.skipif(not shutil.which("cmake"), reason="needs cmake (apt-get install cmake)")
@pytest.mark.parametrize("version", VERSIONS)
def test_fa2_archs_through_vllm_loose_intersection(version, trees, tmp_path):
    utils = trees(version)[0] / "cmake" / "utils.cmake"
    patch = PATCHES / version / "0003-vllm-flash-attn-fa2-native-sass.patch"
    new = fa2_arch_list("".join(line[1:] for line in patch.read_text().splitlines(True) if line.startswith("+ ")))
    targets = ["12.0", "9.0", "9.0a", "10.3", "12.1a", "8.0;8.6;8.9;9.0;10.0;12.0", "7.5"]
    old_archs = loose_intersection(utils, "8.0+PTX", targets, tmp_path)
    new_archs = loose_intersection(utils, new, targets, tmp_path)
    assert old_archs["12.0"] == "8.0+PTX"  # failure 1: sm_120 runs compute_80 PTX through the driver's JIT
    hopper = "9.0a" if version == "0.26.0" else "9.0"
    assert new_archs == {"12.0": "12.0+PTX", "9.0": hopper, "9.0a": "9.0a", "10.3": "10.0", "12.1a": "12.0+PTX",
                         "8.0;8.6;8.9;9.0;10.0;12.0": ("9.0a;8.0;8.6;8.9;10.0;12.0+PTX" if hopper == "9.0a" else
                                                       "8.0;8.6;8.9;9.0;10.0;12.0+PTX"), "7.5": ""}


FORK_0260 = "caaa4eb59845388a20b1f435ecaafb4bd9517ad8"  # vLLM 0.26.0's vllm-flash-attn pin
FORK_SUPPORTED = "8.0;8.6;8.9;9.0;10.0;11.0;12.0"  # its CUDA_SUPPORTED_ARCHS with CUDA 13


@pytest.mark.skipif(not shutil.which("cmake"), reason="needs cmake (apt-get install cmake)")
def test_fa2_archs_through_the_forks_own_loose_intersection(real_cache, tmp_path):
    """What the build really runs: the fork's utils.cmake, after its supported-arch filter."""
    utils = real_cache / "sources" / "git" / FORK_0260 / "cmake" / "utils.cmake"
    if not utils.is_file():
        pytest.skip("the vllm-flash-attn tree at caaa4eb5 is not in the test cache: it comes from GitHub or a "
                    "mirror (gpuwheel fetch rtx6000pro-torch211 --dependency-dir MIRRORS)")
    targets = ["9.0a", "9.0", "12.0", "10.0a", "12.1"]
    supported = loose_intersection(utils, FORK_SUPPORTED, targets, tmp_path)
    assert supported["9.0a"] == "9.0"  # the filter drops the a: "9.0" in the FA2 list would give sm_90
    fa2 = {target: loose_intersection(utils, FA2_LIST["0.26.0"], [supported[target]], tmp_path)[supported[target]]
           for target in targets}
    assert fa2 == {"9.0a": "9.0a", "9.0": "9.0a", "12.0": "12.0+PTX", "10.0a": "10.0", "12.1": "12.0+PTX"}


# ------------------------------------------------------- 0004, 0005, 0012 on the pinned vllm-flash-attn tree

def fork_tree(real_cache: Path, tmp_path: Path) -> Path:
    """The files the fork's patches touch, copied from the pinned tree and patched in the series' order."""
    fork = real_cache / "sources" / "git" / FORK_0260
    if not (fork / "CMakeLists.txt").is_file():
        pytest.skip("the vllm-flash-attn tree at caaa4eb5 is not in the test cache: it comes from GitHub or a "
                    "mirror (gpuwheel fetch rtx6000pro-torch211 --dependency-dir MIRRORS)")
    refs = [ref for ref in read_series(PATCHES / "0.26.0", ("vllm-flash-attn",)) if ref.tree == "vllm-flash-attn"]
    tree = tmp_path / "fork"
    for name in {name for ref in refs for name in patch_files(ref.path)}:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(fork / name, tree / name)
    for ref in refs:
        result = apply_patch(ref.path, tree)
        assert result.returncode == 0 and "fuzz" not in result.stdout, f"{ref.name}: {result.stdout}{result.stderr}"
    return tree


def test_0012_refuses_every_call_that_would_append_keys(real_cache, tmp_path):
    """Appended keys come from knew_ptr, which only mha_fwd_kvcache sets: the refusal must come first
    there, and the split-KV launch must switch on the profile's APPEND_KV_SWITCH."""
    tree = fork_tree(real_cache, tmp_path)
    fork = real_cache / "sources" / "git" / FORK_0260
    setters = sorted(str(path.relative_to(fork)) for path in (fork / "csrc" / "flash_attn").rglob("*.c*")
                     if re.search(r"\bknew_ptr\s*=(?!=)", path.read_text(errors="replace")))
    assert setters == ["csrc/flash_attn/flash_api.cpp"]
    api = (tree / "csrc/flash_attn/flash_api.cpp").read_text()
    kvcache = api[api.index("mha_fwd_kvcache(at::Tensor &q,"):]
    refusal = kvcache.index("#ifdef FLASHATTENTION_DISABLE_APPEND_KV\n        // gpuwheel")
    assert refusal < kvcache.index("FLASH_NOT_BUILT(\"appending new keys") < kvcache.index("params.knew_ptr = ")
    launch = (tree / "csrc/flash_attn/src/flash_fwd_launch_template.h").read_text()
    assert "APPEND_KV_SWITCH(params.knew_ptr != nullptr, Append_KV" in launch and "BOOL_SWITCH(params.knew_ptr" not in launch
    cmake = (tree / "CMakeLists.txt").read_text()
    serving = cmake[cmake.index("if (DEFINED ENV{GPUWHEEL_VLLM_SERVING})"):cmake.index("message(STATUS \"FA2 serving profile")]
    assert "FLASHATTENTION_DISABLE_APPEND_KV" in serving and cmake.count("FLASHATTENTION_DISABLE_APPEND_KV") == 1


@pytest.mark.skipif(not shutil.which("g++"), reason="needs g++")
@pytest.mark.parametrize("disabled", [True, False])
def test_0012s_switch_never_names_an_appending_kernel(real_cache, tmp_path, disabled):
    """The patched static_switch.h, compiled and linked by g++: only kernel<false> exists, so the
    program links only where APPEND_KV_SWITCH never names kernel<true> (the profile), and upstream's
    BOOL_SWITCH, which names both, must fail to link."""
    tree = fork_tree(real_cache, tmp_path)
    program = tmp_path / "switch.cpp"
    program.write_text(
        "#include <stdexcept>\n#define TORCH_CHECK(cond, ...) if (!(cond)) throw std::runtime_error(\"refused\")\n"
        '#include "static_switch.h"\n'
        "template <bool Append> int kernel();\ntemplate <> int kernel<false>() { return 7; }\n"
        "int launch(bool knew) { return APPEND_KV_SWITCH(knew, Append_KV, [&] { return kernel<Append_KV>(); }); }\n"
        "int main() { return launch(true) == 7 && launch(false) == 7 ? 0 : 1; }\n")
    flags = ["-DFLASHATTENTION_DISABLE_APPEND_KV"] if disabled else []
    built = subprocess.run(["g++", "-std=c++17", *flags, "-I", str(tree / "csrc/flash_attn/src"), str(program),
                            "-o", str(tmp_path / "switch")], capture_output=True, text=True)
    if disabled:
        assert built.returncode == 0, built.stderr
        assert subprocess.run([str(tmp_path / "switch")]).returncode == 0
    else:
        assert built.returncode != 0 and "kernel<true>" in built.stderr


# ------------------------------------------------------- 0009 Marlin left out by the serving profile

MARLIN_LISTS = ("MARLIN_ARCHS", "MARLIN_SM75_ARCHS", "MARLIN_BF16_ARCHS", "MARLIN_FP8_ARCHS", "MARLIN_OTHER_ARCHS",
                "MARLIN_MOE_ARCHS", "MARLIN_MOE_SM75_ARCHS", "MARLIN_MOE_FP8_ARCHS", "MARLIN_MOE_OTHER_ARCHS")


def marlin_arch_lists(cmake_lists: str, utils: Path, archs: str, omit: str, tmp_path: Path) -> dict[str, str]:
    """The patched CMakeLists.txt's own Marlin arch blocks (dense and MoE), run by real cmake for
    CUDA 13 and `archs`, with GPUWHEEL_VLLM_OMIT=`omit`: each MARLIN_*_ARCHS list they leave."""
    blocks = [cmake_lists[cmake_lists.index(start):cmake_lists.index(end)] for start, end in (
        ("# marlin arches for fp16 output", "if (MARLIN_OTHER_ARCHS)"),
        ("# moe marlin arches", "if (MARLIN_MOE_OTHER_ARCHS)"))]
    body = f'set(CMAKE_CUDA_COMPILER_VERSION 13.0.2)\nset(CUDA_ARCHS "{archs}")\n' + "\n".join(blocks)
    return cmake_values(utils, body, MARLIN_LISTS, tmp_path, {"GPUWHEEL_VLLM_OMIT": omit})


@pytest.mark.skipif(not shutil.which("cmake"), reason="needs cmake (apt-get install cmake)")
def test_marlin_is_left_out_only_when_the_profile_omits_it(trees, tmp_path):
    pristine, patched = trees("0.26.0")
    utils, cmake_lists = pristine / "cmake" / "utils.cmake", (patched / "CMakeLists.txt").read_text()
    for archs in ("12.0", "9.0a"):
        built = marlin_arch_lists(cmake_lists, utils, archs, "fa3;flashmla", tmp_path)
        # the dense and MoE GEMMs and the shared sources compile for the target (an 8.0+PTX fallback
        # for 9.0a), the Turing and FP8-input variants only where the target has them
        assert built["MARLIN_OTHER_ARCHS"] and built["MARLIN_MOE_OTHER_ARCHS"] and built["MARLIN_ARCHS"], built
        assert built == marlin_arch_lists(cmake_lists, utils, archs, "marlinx;flashmla", tmp_path)  # no prefix match
        assert set(marlin_arch_lists(cmake_lists, utils, archs, "fa3;marlin", tmp_path).values()) == {""}
    assert marlin_arch_lists(cmake_lists, utils, "12.0", "", tmp_path)["MARLIN_FP8_ARCHS"] == "12.0f"


# ------------------------------------------------------- 0010 qutlass's SM100 sources only for SM100

def qutlass_sources(cmake_text: str, utils: Path, archs: str, tmp_path: Path) -> list[str]:
    """The patched qutlass.cmake's own arch selection and source list, run by real cmake for CUDA 13."""
    start = cmake_text.index("if(${CMAKE_CUDA_COMPILER_VERSION} VERSION_GREATER_EQUAL 13.0)\n  cuda_archs_loose_intersection(QUTLASS")
    block = cmake_text[start:cmake_text.index("  set(QUTLASS_INCLUDES")] + "endif()\n"
    body = f'set(CMAKE_CUDA_COMPILER_VERSION 13.0.2)\nset(CUDA_ARCHS "{archs}")\nset(qutlass_SOURCE_DIR /q)\n{block}'
    sources = cmake_values(utils, body, ["QUTLASS_SOURCES"], tmp_path)["QUTLASS_SOURCES"]
    return [Path(source).name for source in sources.split(";") if source]


@pytest.mark.skipif(not shutil.which("cmake"), reason="needs cmake (apt-get install cmake)")
def test_qutlass_compiles_its_sm100_sources_only_for_sm100(trees, tmp_path):
    pristine, patched = trees("0.26.0")
    utils = pristine / "cmake" / "utils.cmake"
    before = (pristine / "cmake" / "external_projects" / "qutlass.cmake").read_text()
    after = (patched / "cmake" / "external_projects" / "qutlass.cmake").read_text()
    sm100 = {"fused_quantize_mx_sm100.cu", "fused_quantize_nv_sm100.cu"}
    assert sm100 <= set(qutlass_sources(before, utils, "12.0", tmp_path))  # upstream: dead code for 12.0
    for_120 = qutlass_sources(after, utils, "12.0", tmp_path)
    assert not sm100 & set(for_120) and "gemm.cu" in for_120 and "bindings.cpp" in for_120
    assert qutlass_sources(after, utils, "10.0", tmp_path) == qutlass_sources(before, utils, "10.0", tmp_path)
    assert sm100 <= set(qutlass_sources(after, utils, "10.0;12.0", tmp_path))  # both asked: QuTLASS picks SM100
    assert qutlass_sources(after, utils, "9.0a", tmp_path) == []  # no QuTLASS for Hopper at all


# ------------------------------------------- 0008 + 0011 the order ninja starts the compiles in

def ninja_112() -> str | None:
    """A ninja that schedules by the longest chain of steps (>= 1.12: the `ninja` wheel of the test extras)."""
    try:
        import ninja
    except ImportError:
        return None
    binary = Path(ninja.BIN_DIR) / "ninja"
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    return str(binary) if tuple(int(part) for part in re.findall(r"\d+", version)[:2]) >= (1, 12) else None


def compile_order_project(cmake_lists: str, root: Path, targets: dict[str, list[str]]) -> Path:
    """A CMake project shaped like vLLM's build graph: spinloop, the C-compiled stand-ins of `targets`
    (the attention library in a subdirectory, as vllm-flash-attn is) and the patched CMakeLists.txt's
    own tail after vllm-flash-attn is included (patches 0008 and 0011)."""
    anchor = "    include(cmake/external_projects/vllm_flash_attn.cmake)\n"
    tail = cmake_lists[cmake_lists.index(anchor) + len(anchor):cmake_lists.rindex("endif ()")]
    (root / "fa").mkdir(parents=True)
    lists = {".": ["cmake_minimum_required(VERSION 3.20)", "project(order C)",
                   "add_library(spinloop MODULE spinloop.cpp)", "add_subdirectory(fa)"], "fa": []}
    (root / "spinloop.cpp").write_text("int spinloop;\n")
    for target, sources in targets.items():
        where = "fa" if target == "_vllm_fa2_C" else "."
        for index, name in enumerate(sources):  # each its own C symbol, compiled as C whatever its suffix
            (root / where / name).write_text(f"int {target}_{index};\n")
        lists[where] += [f"add_library({target} MODULE {' '.join(sources)})",
                         f"set_source_files_properties({' '.join(sources)} PROPERTIES LANGUAGE C)"]
    # DeepGEMM's C++ extension: a custom command behind a custom target, as deepgemm.cmake makes it
    lists["."] += ['add_custom_command(OUTPUT "${CMAKE_BINARY_DIR}/deepgemm_C/.built" '
                   'COMMAND "${CMAKE_COMMAND}" -E touch "${CMAKE_BINARY_DIR}/deepgemm_C/.built" VERBATIM)',
                   'add_custom_target(_deep_gemm_C ALL DEPENDS "${CMAKE_BINARY_DIR}/deepgemm_C/.built")',
                   "set_source_files_properties(spinloop.cpp PROPERTIES LANGUAGE C)", tail]
    for where, lines in lists.items():
        (root / where / "CMakeLists.txt").write_text("\n".join(lines) + "\n")
    return root


def ninja_start_order(project: Path, ninja: str, env: dict[str, str]) -> list[tuple[str, str]]:
    """(target, file name) of each object, and ("_deep_gemm_C", ".built") for DeepGEMM's step, in the
    order `ninja -n -j1` starts them."""
    build = project / "build"
    subprocess.run(["cmake", "-S", project, "-B", build, "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"],
                   check=True, capture_output=True, env={**os.environ, **env})
    dry = subprocess.run([ninja, "-n", "-j1"], cwd=build, check=True, capture_output=True, text=True).stdout
    steps = re.finditer(r"CMakeFiles/([^/ ]+)\.dir/(?:[^ ]*/)?([^/ ]+)\.o\b|deepgemm_C/\.built", dry)
    return [(m[1], m[2]) if m[1] else ("_deep_gemm_C", ".built") for m in steps]


@pytest.mark.skipif(not shutil.which("cmake"), reason="needs cmake (apt-get install cmake)")
@pytest.mark.skipif(not ninja_112(), reason="needs ninja >= 1.12 (pip install ninja)")
def test_ninja_starts_the_compiles_in_the_measured_order(trees, tmp_path):
    _, patched = trees("0.26.0")
    cmake_lists, ninja = (patched / "CMakeLists.txt").read_text(), ninja_112()
    table = (vllm_kind.COMPILE_ORDER_DIR / "0.26.0-12.0.tsv").read_text()
    lines = [line.split("\t") for line in table.splitlines() if not line.startswith("#")]
    listed = [(target, name) for _, target, name in lines]
    targets: dict[str, list[str]] = {"_C_stable_libtorch": [], "_moe_C_stable_libtorch": [], "_vllm_fa2_C": []}
    for target, name in listed:
        # as a build that omits Marlin: the table's Marlin lines order nothing; _qutlass_C is no target here
        if target in targets and "marlin" not in name and name not in targets[target]:
            targets[target].append(name)
    for target in targets:  # sources the table does not know, first in CMake's own order
        targets[target].insert(0, f"unlisted_{target}.cu")
    project = compile_order_project(cmake_lists, tmp_path / "project", targets)
    env = {vllm_kind.COMPILE_ORDER_ENV: vllm_kind.COMPILE_ORDER_FILE}
    for relative, text in vllm_kind.tree_files("0.26.0", {**env, "TORCH_CUDA_ARCH_LIST": "12.0"}).items():
        (project / relative).write_text(text)  # as the patch stage writes it into vLLM's tree

    ordered = ninja_start_order(project, ninja, env)
    # DeepGEMM's step ranks with the first line (CMake hands its target-level dependency to every stamp)
    assert ("_deep_gemm_C", ".built") in ordered[:2] and ("_deep_gemm_C", ".built") in listed
    ordered.remove(("_deep_gemm_C", ".built"))
    built = [(target, name) for target, name in listed if name in targets.get(target, ())]
    assert ordered[:len(built)] == list(dict.fromkeys(built))  # the table's order, across targets
    assert {name for _, name in ordered[len(built):]} == {f"unlisted_{t}.cu" for t in targets} | {"spinloop.cpp"}
    # and the build itself runs: a stamp for each line of a target the build has, every library linked
    subprocess.run([ninja], cwd=project / "build", check=True, capture_output=True)
    stamps = list((project / "build" / "gpuwheel-compile-order").glob("*.stamp"))
    assert len(stamps) == sum(target in targets or target == "_deep_gemm_C" for target, _ in listed)

    # Without the table, 0008 alone: the attention library's objects first, then CMake's order.
    plain = ninja_start_order(compile_order_project(cmake_lists, tmp_path / "plain", targets), ninja, {})
    plain.remove(("_deep_gemm_C", ".built"))
    fa2 = len(targets["_vllm_fa2_C"])
    assert {target for target, _ in plain[:fa2]} == {"_vllm_fa2_C"}
    assert [name for target, name in plain if target == "_C_stable_libtorch"] == targets["_C_stable_libtorch"]

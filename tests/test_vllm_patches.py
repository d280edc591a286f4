"""The shipped vLLM patch sets, against the real sdists of the versions the recipes pin.

- every vLLM-tree patch applies with --fuzz=0 and leaves the lines it promises;
- patch 0001 (moe_permute, vllm issue 43396): the real upstream `moe_permute` from the sdist, run on
  CPU torch at the crashing 8192-token shape (8 x 1001 + 184): pristine reads out of bounds when row
  counts disagree, patched raises a clear ValueError and gives the same results as a plain torch
  reference when they agree;
- patch 0002 (fused MoE): the real `invoke_fused_moe_triton_kernel` refuses tensors shorter than
  its kernel reads; the pinned kernels already use int64 token offsets;
- patch 0003 (vllm-flash-attn FA2 archs): applies to its pre-image and, through the sdist's own
  `cuda_archs_loose_intersection` run by real cmake, gives sm_120 native SASS where "8.0+PTX" gave
  only compute_80 PTX.

The CUDA op behind `torch.ops._moe_C.moe_permute` cannot run here; a CPU implementation of its
contract (sort routed rows by expert, fill permuted_idx for local experts, leave the caller's
sentinel elsewhere) is registered under the sdist's own schema. The GPU runs of the real ops are in
tests/gpu/test_vllm_patch_kernels.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from gpuwheel.patches import read_series
from vllm_patches_helpers import (
    MOE_DIR, PATCHES, apply_patch, extract, hunk_preimage, load_functions, op_schema, patch_files,
    pinned_vllm_versions, vllm_sdist,
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


@pytest.mark.parametrize("version", VERSIONS)
def test_series_lists_the_three_patches(version):
    refs = read_series(PATCHES / version, ("vllm-flash-attn",))
    assert [(r.name[:4], r.tree) for r in refs] == [("0001", ""), ("0002", ""), ("0003", "vllm-flash-attn")]
    for ref in refs:
        header = ref.path.read_text().split("\n--- a/", 1)[0]
        assert f"For: vLLM {version}" in header and "Fixes" in header, f"{ref.name}: header lacks what/for"


@pytest.mark.parametrize("version", VERSIONS)
def test_patches_apply_exactly_to_the_pinned_sdist(version, trees):
    pristine, _ = trees(version)
    for ref in own_tree_patches(version):
        result = apply_patch(ref.path, pristine, "--dry-run")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "fuzz" not in result.stdout and "FAILED" not in result.stdout


@pytest.mark.parametrize("version", VERSIONS)
def test_patched_lines(version, trees):
    _, patched = trees(version)
    python = (patched / MOE_DIR / "moe_permute_unpermute.py").read_text()
    assert "permuted_idx.clamp(max=scale_rows * topk - 1) // topk" in python
    assert "permuted_idx.clamp(max=n_token * topk - 1)" not in python
    op = (patched / OP_SOURCES.get(version, "csrc/moe/moe_permute_unpermute_op.cu")).read_text()
    impl = op[op.index("void moe_permute_impl("):]
    checks = impl.index('"moe_permute: topk_ids has "')
    first_launch = min(impl.index(word) for word in ("moe_sort_routing(", "sortAndScanExpert(") if word in impl)
    assert checks < first_launch, "the row checks must run before the op touches memory"
    fused = (patched / MOE_DIR / "fused_moe.py").read_text()
    assert "fused_experts: topk_ids has" in fused and "fused_moe: per-token A_scale" in fused


# ------------------------------------------------------- 0001 moe_permute on CPU


class MoePermuteOp:
    """`_moe_C::moe_permute`'s contract on CPU, registered under the sdist's schema.

    Routed rows (token * topk + k) are stably sorted by local expert (non-local experts go last);
    permuted_idx gets the source row of each of the first `valid` permuted rows, the rest keep the
    caller's sentinel; the number of routing rows is topk_ids' own, as in the CUDA op's sort.
    """

    library = None
    schema = None

    @classmethod
    def register(cls, torch, schema: str) -> None:
        if cls.library is None:
            cls.library = torch.library.Library("_moe_C", "DEF")
            cls.library.define(schema)
            cls.library.impl("moe_permute", cls.run, "CPU")
            cls.schema = schema
        assert cls.schema == schema, "pinned versions disagree on the moe_permute schema"

    @staticmethod
    def run(input, topk_ids, token_expert_indices, expert_map, n_expert, n_local_expert, topk,
            permuted_input, expert_first_token_offset, inv_permuted_idx, permuted_idx):
        import torch
        experts = topk_ids.flatten().long()
        local = experts if expert_map is None else expert_map[experts].long()
        local = torch.where(local < 0, n_local_expert, local)
        order = torch.sort(local, stable=True).indices
        valid = int((local < n_local_expert).sum())
        counts = torch.bincount(local[local < n_local_expert], minlength=n_local_expert)
        expert_first_token_offset.copy_(torch.cat([counts.new_zeros(1), counts.cumsum(0)]))
        inv_permuted_idx.view(-1)[order] = torch.arange(order.numel(), dtype=torch.int32)
        permuted_idx[:valid] = order[:valid].to(torch.int32)
        permuted_input[:valid] = input[order[:valid] // topk]


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="CPU torch runs the real moe_permute (pip install torch)")


@pytest.fixture
def moe_permute(torch, trees):
    """version → (pristine, patched) real upstream `moe_permute` functions."""
    def get(version: str):
        pristine, patched = trees(version)
        MoePermuteOp.register(torch, op_schema(pristine / BINDINGS.get(version, "csrc/moe/torch_bindings.cpp"),
                                               "moe_permute"))
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
    valid = tokens.numel()
    for moe in (pristine, patched):
        permuted, permuted_scale, offsets, _, permuted_idx = moe(
            hidden_states, scale, topk_ids, n_expert, n_local, expert_map)
        assert permuted_scale.shape == (TOKENS * topk, 1)
        assert torch.equal(permuted_scale[:valid, 0].long(), tokens)
        assert torch.equal(permuted[:valid].view(torch.uint8), hidden_states[tokens].view(torch.uint8))
        assert int(offsets[-1]) == valid
        if expert_parallel:
            assert valid < TOKENS * topk and bool((permuted_idx[valid:] == TOKENS * topk).all())


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
def test_moe_permute_short_routing(version, torch, moe_permute):
    """topk_ids (and its scale) cover 4096 tokens, hidden_states 8192: unfilled permuted_idx entries
    hold the sentinel 8192 * topk, which the clamp turns into row 8191 of a 4096-row scale."""
    pristine, patched = moe_permute(version)
    hidden_states, scale = fp8_inputs(torch, TOKENS)
    topk_ids = routing(torch, 4096)
    with pytest.raises(IndexError, match="index 8191 is out of bounds"):
        pristine(hidden_states, scale[:4096], topk_ids, 128)
    message = (rf"topk_ids has 4096 rows but hidden_states has {TOKENS}: topk_ids \(4096, 8\), "
               rf"hidden_states \({TOKENS}, 128\)")
    with pytest.raises(ValueError, match=message):
        patched(hidden_states, scale[:4096], topk_ids, 128)
    with pytest.raises(ValueError, match=f"topk_ids has {TOKENS + 8} rows"):
        patched(hidden_states, scale, routing(torch, TOKENS + 8), 128)


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

LOOSE_INTERSECTION = """cmake_minimum_required(VERSION 3.20)
include("{utils}")
foreach(_target {targets})
  cuda_archs_loose_intersection(_out "{src}" "${{_target}}")
  message("${{_target}}=${{_out}}")
endforeach()
"""


def fa2_arch_list(cmake_text: str) -> str:
    match = re.search(r'cuda_archs_loose_intersection\(FA2_ARCHS\s+"([^"]+)"', cmake_text)
    assert match, "no FA2_ARCHS line"
    return match.group(1)


def loose_intersection(utils: Path, src: str, targets: list[str], tmp_path: Path) -> dict[str, str]:
    script = tmp_path / "probe.cmake"
    script.write_text(LOOSE_INTERSECTION.format(utils=utils, src=src, targets=" ".join(f'"{t}"' for t in targets)))
    out = subprocess.run(["cmake", "-P", str(script)], capture_output=True, text=True, check=True).stderr
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.mark.parametrize("version", VERSIONS)
def test_fa2_patch_applies_to_its_preimage(version, tmp_path):
    patch = PATCHES / version / "0003-vllm-flash-attn-fa2-native-sass.patch"
    (name, before), = hunk_preimage(patch).items()
    (tmp_path / name).write_text(before)
    result = apply_patch(patch, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    after = (tmp_path / name).read_text()
    assert fa2_arch_list(before) == "8.0+PTX"
    assert fa2_arch_list(after) == "8.0;8.6;8.9;9.0;10.0;11.0;12.0+PTX"


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
    assert new_archs == {"12.0": "12.0+PTX", "9.0": "9.0", "9.0a": "9.0a", "10.3": "10.0", "12.1a": "12.0+PTX",
                         "8.0;8.6;8.9;9.0;10.0;12.0": "8.0;8.6;8.9;9.0;10.0;12.0+PTX", "7.5": ""}

"""Helpers for the vLLM patch tests: the pinned sdists (downloaded once, cached), pristine and
patched copies of the files the shipped patches touch, and the real upstream Python functions
loaded from those files with torch.

Cache: $GPUWHEEL_TEST_SOURCES, else ~/.cache/gpuwheel-test-sources (kept between runs).
"""

from __future__ import annotations

import ast
import __future__
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import requests

from gpuwheel.cache import sha256_file

REPO = Path(__file__).resolve().parents[1]
PATCHES = REPO / "patches" / "vllm"
SIMPLE_INDEX = "https://pypi.org/simple/vllm/"
MOE_DIR = "vllm/model_executor/layers/fused_moe"


def pinned_vllm_versions() -> dict[str, str]:
    """version → sdist sha256, for every vLLM the shipped base recipes pin."""
    pins = {}
    for base in sorted((REPO / "recipes" / "_base").glob("*.toml")):
        for package in tomllib.loads(base.read_text(encoding="utf-8")).get("package", []):
            if package["name"] == "vllm":
                pins[package["version"]] = package["source"]["sha256"]
    return pins


def cache_dir() -> Path:
    root = Path(os.environ.get("GPUWHEEL_TEST_SOURCES", Path.home() / ".cache" / "gpuwheel-test-sources"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def vllm_sdist(version: str, sha256: str) -> Path:
    """The vLLM sdist from PyPI, verified; downloaded once into the cache (atomic rename)."""
    return vllm_dist(f"vllm-{version}.tar.gz", sha256)


def vllm_dist(filename: str, sha256: str) -> Path:
    """One file of vLLM's PyPI project (sdist or wheel), verified; downloaded once into the cache."""
    path = cache_dir() / filename
    if path.exists() and sha256_file(path) == sha256:  # streamed: wheels are hundreds of MB
        return path
    index = requests.get(SIMPLE_INDEX, headers={"Accept": "application/vnd.pypi.simple.v1+json"}, timeout=60)
    index.raise_for_status()
    url = next(f["url"] for f in index.json()["files"] if f["filename"] == path.name)
    partial = path.with_suffix(".part")
    digest = hashlib.sha256()
    with requests.get(url, stream=True, timeout=120) as response, partial.open("wb") as out:
        response.raise_for_status()
        for chunk in response.iter_content(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != sha256:
        partial.unlink()
        raise AssertionError(f"{path.name}: sha256 {digest.hexdigest()} != pinned {sha256}")
    partial.replace(path)
    return path


def patch_files(patch: Path) -> list[str]:
    """Paths (relative, -p1) a unified diff changes; files it creates (--- /dev/null) are not among them."""
    lines = patch.read_text().splitlines()
    return [line[6:].split("\t")[0].strip() for before, line in zip(lines, lines[1:])
            if line.startswith("+++ b/") and not before.startswith("--- /dev/null")]


def extract(sdist: Path, names: list[str], dest: Path) -> Path:
    """Extract just `names` (paths inside the sdist's top folder) into dest; returns dest."""
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        wanted = {f"{top}/{name}" for name in names}
        members = [m for m in tar.getmembers() if m.name in wanted]
        assert len(members) == len(wanted), f"{sdist.name} lacks {wanted - {m.name for m in members}}"
        for member in members:
            member.name = member.name[len(top) + 1:]
        tar.extractall(dest, members=members, filter="data")
    return dest


def vllm_files(version: str, names: list[str], dest: Path) -> Path:
    """`names` from the pinned vLLM sdist into dest. Offline (the GPU machine), an extracted copy at
    <cache>/vllm-<version>/ serves instead; `python tests/vllm_patches_helpers.py DIR` writes one."""
    extracted = cache_dir() / f"vllm-{version}"
    if extracted.is_dir():
        for name in names:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(extracted / name, dest / name)
        return dest
    return extract(vllm_sdist(version, pinned_vllm_versions()[version]), names, dest)


def apply_patch(patch: Path, tree: Path, *extra: str) -> subprocess.CompletedProcess:
    """GNU patch with exact semantics (-p1, no fuzz), as the build applies it."""
    return subprocess.run(["patch", "-p1", "--fuzz=0", "--batch", "--forward", *extra, "-i", str(patch)],
                          cwd=tree, capture_output=True, text=True)


def hunk_preimage(patch: Path) -> dict[str, str]:
    """For each file, the text the patch's hunks expect (context and removed lines, in order)."""
    images: dict[str, list[str]] = {}
    current = None
    for line in patch.read_text().splitlines():
        if line.startswith("+++ b/"):
            current = images.setdefault(line[6:].split("\t")[0].strip(), [])
        elif current is not None and line.startswith((" ", "-")) and not line.startswith("---"):
            current.append(line[1:])
    return {name: "\n".join(lines) + "\n" for name, lines in images.items()}


def load_functions(source_file: Path, names: tuple[str, ...], namespace: dict, *, lazy_annotations: bool = True
                   ) -> dict:
    """Exec the named top-level classes/functions of a real upstream file, with the given globals.

    With lazy_annotations (as under `from __future__ import annotations`) the vLLM-only names the
    annotations mention need not exist; Triton kernels need them evaluated (tl.constexpr).
    Everything else runs as written upstream, with the file's own name and line numbers.
    """
    tree = ast.parse(source_file.read_text(encoding="utf-8"))
    nodes = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in names]
    assert {n.name for n in nodes} == set(names), f"{source_file} lacks {set(names) - {n.name for n in nodes}}"
    module = ast.Module(body=nodes, type_ignores=[])
    flags = __future__.annotations.compiler_flag if lazy_annotations else 0
    code = compile(module, str(source_file), "exec", flags=flags, dont_inherit=True)
    namespace.setdefault("__name__", source_file.stem)  # Triton resolves called kernels by __module__
    exec(code, namespace)
    return namespace


def op_schema(bindings: Path, op: str) -> str:
    """The schema string an `m.def("...")` in vLLM's torch_bindings.cpp gives `op` (literals joined)."""
    text = bindings.read_text(encoding="utf-8")
    start = text.index(f'"{op}(Tensor')
    end = text.index(");", start)
    return "".join(re.findall(r'"([^"]*)"', text[start:end]))


def sorted_rows_of(op_text: str) -> str:
    """Whose rows the moe_permute op's routing sort walks: the tensor the `n_token` before its
    sortAndScanExpert call is read from ("input" in 0.26.0's moe_permute_impl, "topk_ids" in
    0.33.0's moe_sort_routing, whose buffers the wrapper sizes from input's rows)."""
    before_sort = op_text[:op_text.index("sortAndScanExpert(")]
    return re.findall(r"auto n_token = (\w+)\.sizes\(\)\[0\];", before_sort)[-1]


# Files the GPU tests read from each pinned vLLM (the GPU machine has no network: carry these).
GPU_TEST_FILES = {
    "0.26.0": [f"{MOE_DIR}/moe_permute_unpermute.py", f"{MOE_DIR}/fused_moe.py", f"{MOE_DIR}/utils.py",
               "csrc/libtorch_stable/moe/moe_permute_unpermute_op.cu", "csrc/libtorch_stable/moe/torch_bindings.cpp",
               *(f"csrc/libtorch_stable/moe/permute_unpermute_kernels/{n}" for n in (
                   "dispatch.h", "moe_permute_unpermute_kernel.cu", "moe_permute_unpermute_kernel.h",
                   "moe_permute_unpermute_kernel.inl")),
               "csrc/libtorch_stable/torch_utils.h", "csrc/core/registration.h"],
    "0.33.0": [f"{MOE_DIR}/moe_permute_unpermute.py", f"{MOE_DIR}/fused_moe.py", f"{MOE_DIR}/utils.py",
               "csrc/moe/moe_permute_unpermute_op.cu", "csrc/moe/torch_bindings.cpp",
               *(f"csrc/moe/permute_unpermute_kernels/{n}" for n in (
                   "dispatch.h", "moe_permute_unpermute_kernel.cu", "moe_permute_unpermute_kernel.h",
                   "moe_permute_unpermute_kernel.inl")),
               "csrc/torch_utils.h", "csrc/core/registration.h"],
}

if __name__ == "__main__":
    # Write <DIR>/vllm-<version>/ with the files the GPU tests need, for a machine without network.
    for version, names in GPU_TEST_FILES.items():
        extract(vllm_sdist(version, pinned_vllm_versions()[version]), names, Path(sys.argv[1]) / f"vllm-{version}")

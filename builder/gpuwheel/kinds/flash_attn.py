"""What gpuwheel knows about building flash-attn 2.x: its own arch variable, the inference profile
(read by gpuwheel's patch set, patches/flash-attn/<version>/), job memory and its smoke groups.
"""

from __future__ import annotations

from pathlib import Path

from gpuwheel import facts
from gpuwheel.errors import RecipeError
from gpuwheel.kinds.base import Kind, SmokeGroup, archs, plan_env
from gpuwheel.provenance import Provenance
from gpuwheel.recipe_values import InferenceProfile, PackageRecipe, Recipe, typo_hint

# FLASH_ATTN_CUDA_ARCHS values its setup.py turns into `code=sm_NN` (SASS only, no PTX), and the
# toolkit each needs (setup.py checks bare-metal nvcc ≥ 11.8 / 12.8).
ARCHS: dict[int, str] = {80: "11.7", 90: "11.8", 100: "12.8", 120: "12.8"}
# Features the inference profile may switch off (FLASHATTENTION_DISABLE_<NAME>).
FEATURES = ("dropout", "alibi", "softcap", "local", "uneven_k")
HEAD_DIMS = (32, 64, 96, 128, 192, 256)  # its kernel buckets


def native_arch(arch: facts.Arch) -> int | None:
    """The FLASH_ATTN_CUDA_ARCHS entry whose SASS runs on `arch` natively, if any."""
    fitting = [n for n in ARCHS if facts.runs_natively(facts.Arch(n // 10, n % 10), arch)]
    return max(fitting) if fitting else None


def inference_profile(spec: dict, where) -> InferenceProfile:
    """[package.inference] checked: `where(key)` names the file:line of a key for errors."""
    head_dims = tuple(spec.get("head_dims", HEAD_DIMS))
    disable = tuple(spec.get("disable", ()))
    for dim in head_dims:
        if dim not in HEAD_DIMS:
            raise RecipeError(
                f"{where('inference.head_dims')}: head dim {dim} is not built by flash-attn",
                hint=f"choose from {', '.join(map(str, HEAD_DIMS))}",
            )
    for feature in disable:
        if feature not in FEATURES:
            raise RecipeError(
                f"{where('inference.disable')}: unknown feature '{feature}'",
                hint=typo_hint(feature, FEATURES, f"choose from {', '.join(FEATURES)}"),
            )
    return InferenceProfile(head_dims=tuple(sorted(set(head_dims))), disable=tuple(sorted(set(disable))))


def build_env(package: PackageRecipe, recipe: Recipe) -> dict[str, str]:
    fa = sorted({n for a in archs(recipe) if (n := native_arch(a)) is not None})
    env = {
        "FLASH_ATTN_CUDA_ARCHS": ";".join(str(n) for n in fa),
        "FLASH_ATTENTION_FORCE_BUILD": "TRUE",  # never download a prebuilt wheel
    }
    if package.profile == "inference" and package.inference:
        # Read by gpuwheel's flash-attn patch (patches/flash-attn/<v>/): prune TUs and switches.
        env["GPUWHEEL_FA_INFERENCE"] = "1"
        env["GPUWHEEL_FA_HEAD_DIMS"] = ";".join(str(d) for d in package.inference.head_dims)
        # Backward kernels and dropout are training-only: the profile always drops them.
        disabled = ("backward", "dropout", *(f for f in package.inference.disable if f != "dropout"))
        env["GPUWHEEL_FA_DISABLE"] = ";".join(f.upper() for f in disabled)
    return env


def problems(package: PackageRecipe, recipe: Recipe, notes: list[str]) -> list[str]:
    found = []
    for arch in archs(recipe):
        if native_arch(arch) is None:
            found.append(
                f"flash-attn has no kernels that run on {arch} (it builds "
                f"{', '.join(f'sm_{n}' for n in ARCHS)}): drop {arch}"
            )
    if package.profile == "inference" and package.inference and "uneven_k" in package.inference.disable:
        bad = [d for d in package.inference.head_dims if d % 32 or (d > 128 and d % 64)]
        if bad:
            found.append(
                f"flash-attn: disabling uneven_k needs head dims that are multiples of 32 "
                f"up to 128 and of 64 above; {bad} are not"
            )
    return found


def built_head_dims(provenance: Provenance | None) -> list[int] | None:
    """The head dims the plan built (GPUWHEEL_FA_HEAD_DIMS), or None when the wheel does not say."""
    text = plan_env(provenance, "GPUWHEEL_FA_HEAD_DIMS")
    if not text:
        return None
    try:
        return [int(part) for part in text.replace(",", ";").split(";") if part.strip()]
    except ValueError:
        return None


def smoke_groups(
    project: str, provenance: Provenance | None, shared_objects: tuple[str, ...], work: Path
) -> tuple[SmokeGroup, ...]:
    head_dims = built_head_dims(provenance)
    disabled = [f for f in (plan_env(provenance, "GPUWHEEL_FA_DISABLE") or "").split(";") if f]
    return (
        SmokeGroup(
            "flash-attn", {"head_dims": head_dims}, "flash_attn_varlen_func, flash_attn_with_kvcache at 8192 tokens"
        ),
        SmokeGroup(
            "flash-attn-errors",
            {"head_dims": head_dims, "disabled": disabled},
            "what the build left out raises a Python exception",
        ),
    )


KIND = Kind(
    name="flash-attn",
    build_env=build_env,
    problems=problems,
    profiles=("inference",),
    # Measured 4.2–6.2 GB per TU at one arch, ~8 GB with four archs at --threads 2.
    job_memory_gb=(5.0, 1.5),
    smoke_groups=smoke_groups,
)

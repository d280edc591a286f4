#!/bin/bash
# The flash-attn 2.8.3 inference profile built for sm_90 on the GPU machine, against that machine's own
# torch (2.11.0+cu130 at python3, no venv), then run against torch SDPA. One call of at most 10 minutes.
#
# The GPU machine has no network: carry the sdist in an ignored folder, e.g.
#   mkdir -p .device-carry && echo .device-carry >> .git/info/exclude
#   cp ~/.cache/gpuwheel-test-sources/sources/**/flash_attn-2.8.3.tar.gz .device-carry/   (8.4 MB)
# then with the device tool (carry [".device-carry"]):
#   bash benchmarks/gpu_flash_attn_h100.sh .device-carry/flash_attn-2.8.3.tar.gz
# Figures (build time, peak RSS, the SDPA comparison) land in $OUT (or /tmp/fa-h100): build.log, time.txt,
# smoke.txt. Environment overrides: HEAD_DIMS (default 128), MAX_JOBS (default 16).
set -euo pipefail

SDIST=${1:?usage: $0 flash_attn-2.8.3.tar.gz}
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/fa-h100}
WORK=$(mktemp -d)
mkdir -p "$OUT"
echo "1e71dd64a9e0280e0447b8a0c2541bad4bf6ac65bdeaa2f90e51a9e57de0370d  $SDIST" | sha256sum -c --quiet

tar -xzf "$SDIST" -C "$WORK"
cd "$WORK/flash_attn-2.8.3"
grep -v '^\s*\(#\|$\)' "$REPO/patches/flash-attn/2.8.3/series" | while read -r name _; do
  patch -p1 --fuzz=0 --forward --quiet < "$REPO/patches/flash-attn/2.8.3/$name"
done

# The profile as the plan emits it, for one arch and the chosen head dims, every optional feature off.
export FLASH_ATTN_CUDA_ARCHS=90 FLASH_ATTENTION_FORCE_BUILD=TRUE GPUWHEEL_FA_INFERENCE=1 \
  GPUWHEEL_FA_HEAD_DIMS="${HEAD_DIMS:-128}" GPUWHEEL_FA_DISABLE="BACKWARD;DROPOUT;ALIBI;SOFTCAP;LOCAL;UNEVEN_K" \
  MAX_JOBS="${MAX_JOBS:-16}" NVCC_THREADS=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"
nproc > "$OUT/machine.txt"; free -g >> "$OUT/machine.txt"; nvidia-smi -L >> "$OUT/machine.txt"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' >> "$OUT/machine.txt"

start=$(date +%s)
if [ -x /usr/bin/time ]; then
  /usr/bin/time -v -o "$OUT/time.txt" python3 -m pip wheel --no-build-isolation --no-deps -v -w "$OUT/wheels" . \
    > "$OUT/build.log" 2>&1
else
  python3 -m pip wheel --no-build-isolation --no-deps -v -w "$OUT/wheels" . > "$OUT/build.log" 2>&1
fi
echo "build wall $(( $(date +%s) - start )) s" | tee -a "$OUT/time.txt"

python3 -m pip install -q --no-deps --target "$WORK/site" "$OUT"/wheels/flash_attn-*.whl
cd "$REPO"
first_dim=${GPUWHEEL_FA_HEAD_DIMS%%;*}
PYTHONPATH="$WORK/site" python3 benchmarks/flash_attn_vs_sdpa.py --head-dim "$first_dim" 2>&1 | tee "$OUT/smoke.txt"

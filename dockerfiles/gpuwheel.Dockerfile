# gpuwheel itself in a container, installed from its built wheel (no checkout inside):
#   python3 -m build --outdir dist && docker build -f dockerfiles/gpuwheel.Dockerfile -t gpuwheel dist/
#   docker run --rm gpuwheel targets
# The context is a folder holding gpuwheel-*.whl. BASE is any Debian or Ubuntu image with apt; where no
# registry can be reached, `gpuwheel toolchain base-image` makes one. For an offline pip, put the
# dependency wheels beside gpuwheel's (pip download -d dist dist/gpuwheel-*.whl) and pass
# --build-arg PIP_ARGS=--no-index.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
ARG PIP_ARGS=""
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 PATH=/opt/gpuwheel/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# python3-venv for gpuwheel's own venv; patch and git apply patch sets and fetch git sources.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv patch git ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY *.whl /tmp/wheels/
RUN python3 -m venv /opt/gpuwheel \
 && /opt/gpuwheel/bin/pip install --no-cache-dir --no-input --disable-pip-version-check ${PIP_ARGS} \
    --find-links /tmp/wheels /tmp/wheels/gpuwheel-*.whl \
 && rm -rf /tmp/wheels
WORKDIR /work
ENTRYPOINT ["gpuwheel"]
CMD ["--help"]

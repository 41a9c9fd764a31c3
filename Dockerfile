# syntax=docker/dockerfile:1
#
# cappy-serve images, two targets from one file:
#   (default, last stage "export")  serves an export directory, or exports a checkpoint or hub id
#                                   once at first start (a CPU torch inside for `cappy export`)
#   --target serve                  serves export directories only: no torch, under half the size
# and two ONNX Runtime builds (EXTRAS):
#   gpu (default)  onnxruntime-gpu with CUDA 13 / cuDNN 9 from PyPI; on a host without a GPU it
#                  serves on its CPU provider
#   cpu            ONNX Runtime CPU + OpenVINO (bf16 where the CPU has it)
#
#   docker build -t cappy-serve:gpu .
#   docker build --build-arg EXTRAS=cpu -t cappy-serve:cpu .
#   docker build --build-arg EXTRAS=cpu --target serve -t cappy-serve:cpu-serve .
#
# Run with an export directory mounted read-only (or a hub id, exported once into the cache
# volume by the default target):
#   docker run --gpus all -p 8000:8000 --read-only --tmpfs /tmp -v cappy-cache:/var/cache/cappy \
#       -v "$PWD/exports/cappy-large:/models/cappy-large:ro" -e CAPPY_MODEL=/models/cappy-large \
#       cappy-serve:gpu
#
# Stages are ordered so that the classic builder (DOCKER_BUILDKIT=0), which builds every stage
# before the target, builds no torch for `--target serve`.

ARG PYTHON_IMAGE=python:3.11-slim

# --- the project's files, listed once for both build stages -----------------------------------
FROM scratch AS source
COPY pyproject.toml README.md /src/
COPY cappy /src/cappy
COPY service /src/service
COPY model_export /src/model_export
COPY adapt /src/adapt

# --- serve-deps: a virtual environment with what serving needs (no torch) -----------------------
FROM ${PYTHON_IMAGE} AS serve-deps

# gpu | cpu: the package extra that brings ONNX Runtime.
ARG EXTRAS=gpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src

# Dependencies first, from pyproject.toml alone (the package itself is still empty, its readme a
# placeholder): cached while only the source or the documentation changes. gpu:
# onnxruntime-gpu[cuda,cudnn] brings the CUDA and cuDNN libraries from PyPI, so the slim base
# needs no CUDA toolkit; the host's driver comes in through the NVIDIA container toolkit.
# DL3013: "." is this project.
COPY --from=source /src/pyproject.toml ./
# hadolint ignore=DL3013
RUN if [ "${EXTRAS}" != "gpu" ] && [ "${EXTRAS}" != "cpu" ]; then \
        echo "EXTRAS must be gpu or cpu, not ${EXTRAS}" >&2; exit 1; \
    fi \
    && touch README.md \
    && python -m venv /opt/venv \
    && pip install --no-cache-dir ".[${EXTRAS}]"

# --- serve-build: the package on top ------------------------------------------------------------
FROM serve-deps AS serve-build

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY --from=source /src /src
# The directories of the NVIDIA libraries go to the dynamic loader (empty for cpu): ONNX Runtime
# finds them even before preload_dlls() runs. DL3013: "." is this project.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-deps --force-reinstall . \
    && cappy --help > /dev/null \
    && find /opt/venv -path '*/nvidia/*' -name 'lib*.so*' -printf '%h\n' | sort -u \
        > /opt/venv/nvidia-libs.conf

# --- runtime: what both targets share -----------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG EXTRAS=gpu
LABEL org.opencontainers.image.title="cappy-serve" \
      org.opencontainers.image.description="Cappy instruction-response scorer: /score, /select, /v1/rerank, best-of-17 proxy" \
      org.opencontainers.image.licenses="Apache-2.0" \
      cappy.extras="${EXTRAS}"

# The cache volume's mount point stays empty (the service and the hub client create their
# folders in it): replicas that first mount a fresh named volume at once each copy the image's
# content there, and Docker's copy races on every subfolder ("failed to mkdir ...: file exists",
# moby/moby#43068). An empty folder copies only its owner.
RUN groupadd --system --gid 10001 cappy \
    && useradd --system --uid 10001 --gid cappy --home-dir /home/cappy --create-home \
        --shell /usr/sbin/nologin cappy \
    && mkdir -p /var/cache/cappy \
    && chown cappy:cappy /var/cache/cappy

# A server sends no usage telemetry, and on a read-only root ONNX Runtime cannot keep its
# telemetry id (a warning at start): its switch here. (The service declines OpenVINO's itself.)
# Only what a container changes: where it binds and where it caches. Every other default
# (batch limits per device, queue, timeouts) is the service's own (service/settings.py).
# DL3064 sees "TOKEN" in TOKENIZERS_PARALLELISM: no secret here. API keys (CAPPY_API_KEYS) are
# given at run time, never baked into the image.
# hadolint ignore=DL3064
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TOKENIZERS_PARALLELISM=false \
    HF_HOME=/var/cache/cappy/huggingface \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    ORT_DISABLE_TELEMETRY=1 \
    CAPPY_MODEL=btan2/cappy-large \
    CAPPY_CACHE_DIR=/var/cache/cappy/exports \
    CAPPY_HOST=0.0.0.0 \
    CAPPY_PORT=8000

# Exports of checkpoints and hub ids (and the hub download cache) survive restarts here.
VOLUME ["/var/cache/cappy"]
WORKDIR /home/cappy
EXPOSE 8000

# Liveness: /health is 200 while a first-start export runs, while the model loads and once it
# serves; 503 after a failed export or load. (Readiness, for a load balancer, is /ready.)
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('CAPPY_PORT', '8000'), timeout=4)"]

# uvicorn drains in-flight requests on SIGTERM for up to CAPPY_GRACEFUL_SHUTDOWN_S.
STOPSIGNAL SIGTERM
CMD ["cappy", "serve", "--host", "0.0.0.0"]

# --- serve: export directories only -------------------------------------------------------------
FROM runtime AS serve

COPY --from=serve-build /opt/venv /opt/venv
RUN cp /opt/venv/nvidia-libs.conf /etc/ld.so.conf.d/zz-cappy-nvidia.conf && ldconfig
LABEL cappy.target="serve"
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001

# --- export-build: plus torch, transformers and onnx for `cappy export` -------------------------
FROM serve-deps AS export-build

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG EXTRAS=gpu
# torch is only used by `cappy export`; its CPU build is enough in both images and is far
# smaller than the CUDA one. DL3013: the version is in TORCH_SPEC; "." is this project.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}" \
    && pip install --no-cache-dir ".[${EXTRAS},export]"

COPY --from=source /src /src
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-deps --force-reinstall . \
    && cappy export --help > /dev/null \
    && find /opt/venv -path '*/nvidia/*' -name 'lib*.so*' -printf '%h\n' | sort -u \
        > /opt/venv/nvidia-libs.conf

# --- export (default): serves a directory, or exports a checkpoint or hub id at first start -----
FROM runtime AS export

COPY --from=export-build /opt/venv /opt/venv
RUN cp /opt/venv/nvidia-libs.conf /etc/ld.so.conf.d/zz-cappy-nvidia.conf && ldconfig
LABEL cappy.target="export"
USER 10001:10001

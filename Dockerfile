# The LLM microservice (`twinserve serve`) as a container image; see docs/containers.md.
#
#   docker build -t twinserve:cpu .                                  # CPU (default)
#   docker build -t twinserve:cuda --build-arg VARIANT=cuda .        # CUDA
#
# BuildKit (the default builder since Docker 23) is needed: COPY --chmod, and a base stage
# chosen by VARIANT.
#
# `docker run IMAGE serve` is SageMaker's start command: 0.0.0.0:8080, the model from
# /opt/ml/model or HF_MODEL_ID (docker/entrypoint.sh). Any other command runs as given.

ARG VARIANT=cpu
# the CPU image runs the Python CI tests on (3.11); the CUDA image its distribution's (3.12)
ARG CPU_BASE=python:3.11-slim-trixie
ARG CUDA_BASE=nvidia/cuda:13.0.0-runtime-ubuntu24.04
# torch 2.13.0's CUDA build on PyPI is CUDA 13.0; the CUDA base matches it
ARG CPU_TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG CUDA_TORCH_INDEX=https://download.pytorch.org/whl/cu130

FROM ${CPU_BASE} AS base-cpu
ARG CPU_TORCH_INDEX
ENV TORCH_INDEX_URL=${CPU_TORCH_INDEX}

FROM ${CUDA_BASE} AS base-cuda
ARG CUDA_TORCH_INDEX
ENV TORCH_INDEX_URL=${CUDA_TORCH_INDEX}
# the distribution's Python (3.12 on Ubuntu 24.04), unpinned: the base tag fixes the release.
# torch's wheel brings its own CUDA libraries; the base brings the NVIDIA runtime setup.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# a stage of this file, not an image (DL3006); BuildKit builds only the base VARIANT names
# hadolint ignore=DL3006
FROM base-${VARIANT}
ARG VARIANT
ARG TORCH_VERSION=2.13.0
LABEL org.opencontainers.image.title="twinserve" \
      org.opencontainers.image.description="twinserve LLM microservice (TGI, OpenAI and SageMaker routes)" \
      io.twinserve.variant="${VARIANT}"

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, pinned, from its own index: met only as the package's `torch>=2.5`, pip would
# take PyPI's default (multi-GB CUDA) build even in the CPU image
RUN python3 -m venv /opt/venv \
    && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# then the package itself, without the dev extras (the torch above already satisfies it)
COPY pyproject.toml README.md /opt/twinserve/
COPY src /opt/twinserve/src
RUN pip install /opt/twinserve

COPY --chmod=755 docker/entrypoint.sh /usr/local/bin/twinserve-entrypoint

# numeric, so that an orchestrator can check it is not root (Kubernetes' runAsNonRoot); the
# cache folder exists and is the user's, so a named volume mounted on it is writable
RUN groupadd --gid 10001 twinserve \
    && useradd --create-home --uid 10001 --gid 10001 --shell /bin/bash twinserve \
    && install -d -o 10001 -g 10001 /home/twinserve/.cache
USER 10001:10001
WORKDIR /home/twinserve

# In the container a server listens on all interfaces, on 8080: `serve` and `twinserve serve`
# without flags alike (PORT=... moves both, as in TGI's image). Caches live in the home: mount
# a volume on /home/twinserve/.cache to keep downloaded models between runs.
ENV TWINSERVE_HOST=0.0.0.0 \
    PORT=8080 \
    TWINSERVE_HOME=/home/twinserve/.cache/twinserve \
    HF_HOME=/home/twinserve/.cache/huggingface

EXPOSE 8080
# /ping is 200 once the model is loaded (503 while loading or draining); the start period
# covers a model download. The port is found as docker/entrypoint.sh finds it for `serve`.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; e = os.environ.get; u.urlopen('http://127.0.0.1:%s/ping' % (e('SAGEMAKER_BIND_TO_PORT') or e('TWINSERVE_PORT') or e('PORT') or 8080), timeout=4)"]

ENTRYPOINT ["/usr/local/bin/twinserve-entrypoint"]
CMD ["serve"]

# syntax=docker/dockerfile:1
# Two targets:
#   worker  - CUDA runtime + cuDNN (what onnxruntime-gpu needs), onnxruntime-gpu, no torch
#   trainer - the worker plus torch/torchvision (CUDA build) and onnx, for training and export
# onnxruntime-gpu 1.31 is built for CUDA 13 and cuDNN 9: keep the base image's majors in step.
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

FROM ${CUDA_RUNTIME_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates tini \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && groupadd --system --gid 10001 bonexray \
    && useradd --system --uid 10001 --gid bonexray --home-dir /home/bonexray --create-home bonexray
WORKDIR /app

FROM base AS worker
COPY pyproject.toml README.md constraints.txt ./
COPY bonexray ./bonexray
# Every package at the version in constraints.txt ('make lock'), so that images built on
# different days run the same Celery, kombu, SQLAlchemy; onnxruntime-gpu in particular at
# the release built for this image's CUDA 13 / cuDNN 9.
RUN pip install -c constraints.txt ".[dicom]" "onnxruntime-gpu==1.31.*" \
    && python -c "import onnxruntime, pydicom, gdcm, bonexray.worker.tasks"
USER bonexray
# A worker is healthy when its Celery node answers a ping through the broker.
HEALTHCHECK --interval=30s --timeout=20s --start-period=60s --retries=3 \
    CMD celery -A bonexray.worker.app inspect ping -d "celery@$(hostname)" --timeout 10 || exit 1
ENTRYPOINT ["tini", "--"]
CMD ["bonexray", "worker", "--pool", "prefork", "--concurrency", "1"]

FROM worker AS trainer
USER root
RUN pip install -c constraints.txt ".[train]"
USER bonexray
HEALTHCHECK NONE
CMD ["bonexray", "--help"]

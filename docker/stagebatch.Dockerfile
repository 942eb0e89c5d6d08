# The stagebatch project in a CPU container, two targets:
#   loadtest: Locust master/worker (tritonclient gRPC, no torch): small.
#   builder:  `stagebatch build --target gpu` (exports with torch CPU, slices, verifies with
#             onnxruntime CPU): about 2 GB, most of it torch.
# Build context: the repository root (docker/stagebatch.Dockerfile.dockerignore keeps .venv,
# model repositories and results out of it).
FROM python:3.10-slim AS base
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
WORKDIR /opt/stagebatch
COPY . /opt/stagebatch

FROM base AS loadtest
# Only what the Locust side imports, with the project's own version ranges; the package itself
# without its dependencies (torch, transformers, onnx are for building models, not for load).
COPY docker/loadtest-requirements.txt /tmp/loadtest-requirements.txt
RUN pip install -r /tmp/loadtest-requirements.txt && pip install --no-deps -e .
EXPOSE 8089 5557

FROM base AS builder
# torch from its CPU-only index (the default Linux wheel pulls ~3 GB of CUDA libraries that a CPU
# export does not need), then the project with the `cpu` extra (onnxruntime for verification).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch>=2.9" \
    && pip install -e ".[cpu]"

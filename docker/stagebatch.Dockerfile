# The stagebatch project in a CPU container, two targets:
#   loadtest: Locust master/worker (tritonclient gRPC; no torch, onnx or the embedded server).
#   builder:  `stagebatch build --target gpu` (exports with torch CPU, slices, verifies with
#             onnxruntime CPU): large (torch, the export tool chain, the whole project's dependencies).
# Python 3.11: the version the project is developed and tested with (only backends/ must also run
# on the Triton image's 3.10). Build context: the repository root (docker/stagebatch.Dockerfile.dockerignore,
# read by BuildKit, keeps .venv, model repositories, results and .env out of it).
FROM python:3.11-slim AS base
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
WORKDIR /opt/stagebatch

FROM base AS loadtest
# Only what the Locust side imports, with the project's own version ranges; then the package itself
# without its dependencies (torch, transformers, onnx build models; they are not needed for load).
# Dependencies first: their layer survives source changes.
COPY docker/loadtest-requirements.txt /tmp/loadtest-requirements.txt
RUN pip install -r /tmp/loadtest-requirements.txt
COPY . /opt/stagebatch
RUN pip install --no-deps -e .
EXPOSE 8089 5557

FROM base AS builder
# torch from its CPU-only index (the default Linux wheel pulls gigabytes of CUDA libraries that a CPU
# export does not need), then the project with the `cpu` extra (onnxruntime for verification).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch>=2.9"
COPY . /opt/stagebatch
RUN pip install -e ".[cpu]"

# Triton Inference Server 2.51.0 (NGC 24.10: CUDA 12.6, cuDNN 9, Ubuntu 22.04, Python 3.10, ONNX
# Runtime backend 1.19.2) plus what the stagebatch Python-backend models import. The models
# themselves (and the backends/ package copied into each Python model) come from the mounted
# repository built with `stagebatch build --target gpu`.
FROM nvcr.io/nvidia/tritonserver:24.10-py3

COPY triton-requirements.txt check_triton_python.py /opt/stagebatch/
RUN python3 -m pip install --no-cache-dir -r /opt/stagebatch/triton-requirements.txt \
    && python3 /opt/stagebatch/check_triton_python.py

"""stagebatch: stage-level batching on NVIDIA Triton Inference Server, and its characterization."""

__version__ = "0.1.0"

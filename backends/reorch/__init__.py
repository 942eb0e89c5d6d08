"""Stage reorchestrator: runs a model's ONNX stages itself and re-forms batches between them.

``scheduler`` and ``policies`` are pure (no Triton, no onnxruntime); ``tensors`` and ``executor``
move numpy data and run stage sessions; ``engine`` joins them with threads; ``model`` is the Triton
Python-backend glue; ``deploy`` writes a ``NAME_reorch`` model into a repository (host side).
"""

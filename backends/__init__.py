"""Code that runs inside Triton's Python backend (Python 3.10 and 3.11).

The repository builder copies this whole package into each Python model's version directory, so
a built model repository is self-contained. Nothing here imports ``stagebatch``.
"""

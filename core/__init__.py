"""The core: the Triton server launcher and supervisor, errors, and the writer of Triton model repositories.

Everything above it (slicing, loadtest, tuning, the CLI) imports it; it imports only ``backends``.
"""

"""The load generator's tiny test models: they live in :mod:`loadtest.tiny_models` (the bench uses them too)."""

from loadtest.tiny_models import ECHO_DECOUPLED_MODEL, ERROR_LENGTH, build_repository

__all__ = ["ECHO_DECOUPLED_MODEL", "ERROR_LENGTH", "build_repository"]

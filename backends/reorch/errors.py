"""Errors of the reorchestrator.

The reorchestrator runs inside Triton's Python backend, where the ``stagebatch`` package may be absent
(the NGC image has only the copied ``backends`` package). Where ``stagebatch`` is importable we raise
its classes, so host-side callers (the builder, tests) can catch ``StagebatchError``; otherwise
same-named stand-ins with the same hierarchy.
"""

from __future__ import annotations

try:  # host side and the local embedded server: the real hierarchy
    from stagebatch.errors import ConfigValidationError, StageContractError, StagebatchError
except ImportError:  # pragma: no cover - inside a server image without stagebatch installed

    class StagebatchError(Exception):  # type: ignore[no-redef]
        """Base class of every error stagebatch raises on purpose."""

    class ConfigValidationError(StagebatchError):  # type: ignore[no-redef]
        """A configuration, plan or parameter value breaks a rule."""

    class StageContractError(StagebatchError):  # type: ignore[no-redef]
        """A stage broke its contract."""


class BadRequestError(ValueError):
    """A client request is malformed (answered with INVALID_ARG; never a server fault)."""


__all__ = ["BadRequestError", "ConfigValidationError", "StageContractError", "StagebatchError"]

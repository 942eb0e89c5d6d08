"""Errors of the reorchestrator (the backends' own base, ``backends.common.errors``, re-exported)."""

from __future__ import annotations

from backends.common.errors import ConfigValidationError, StagebatchError, StageContractError


class BadRequestError(ValueError):
    """A client request is malformed (answered with INVALID_ARG; never a server fault)."""


__all__ = ["BadRequestError", "ConfigValidationError", "StageContractError", "StagebatchError"]

"""The error base of code that runs inside Triton (``backends/``): standard library only.

``core.errors`` re-exports these classes and adds the host-only ones, so a host caller that
catches ``StagebatchError`` catches what the backends raise too, and the hierarchy is the same
inside a server image that has only the copied ``backends`` package.
"""

from __future__ import annotations


class StagebatchError(Exception):
    """Base class of every error stagebatch raises on purpose."""


class ConfigValidationError(StagebatchError):
    """A configuration, plan or parameter value breaks a rule."""


class StageContractError(StagebatchError):
    """A stage broke its contract (e.g. returned a different number of rows than it was given)."""


__all__ = ["ConfigValidationError", "StageContractError", "StagebatchError"]

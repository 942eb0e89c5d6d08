"""One small error hierarchy for stagebatch.

Library code raises these; only the CLI layer (``stagebatch.cli``) turns them into a
one-line message and an exit code. Messages name the field, its value, the rule and the fix.
"""

from __future__ import annotations


class StagebatchError(Exception):
    """Base class of every error stagebatch raises on purpose."""


class ConfigValidationError(StagebatchError):
    """A configuration, plan or parameter value breaks a rule."""


class BadParameterError(ConfigValidationError):
    """A command-line or API argument is invalid."""


class SliceError(StagebatchError):
    """A model cannot be analysed, cut or verified as asked."""


class ServerStartError(StagebatchError):
    """The Triton server could not be started, or a model failed to load."""


class StageContractError(StagebatchError):
    """A stage broke its contract (e.g. returned a different number of rows than it was given)."""

"""One small error hierarchy for stagebatch.

Library code raises these; only the CLI layer (``stagebatch.cli``) turns them into a
one-line message and an exit code. Messages name the field, its value, the rule and the fix.
"""

from __future__ import annotations

# The base and the classes code inside Triton raises live in the leaf package ``backends`` (which
# may import nothing of the host); re-exported here so there is one hierarchy.
from backends.common.errors import ConfigValidationError, StagebatchError, StageContractError


class BadParameterError(ConfigValidationError):
    """A command-line or API argument is invalid."""


class SliceError(StagebatchError):
    """A model cannot be analysed, cut or verified as asked."""


class ServerStartError(StagebatchError):
    """The Triton server could not be started, or a model failed to load."""


__all__ = ["BadParameterError", "ConfigValidationError", "ServerStartError", "SliceError",
           "StageContractError", "StagebatchError"]

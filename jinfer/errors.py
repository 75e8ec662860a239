"""One error hierarchy for jinfer.

Every error jinfer raises on purpose is a `JinferError`. Errors caused by bad user input also
subclass `ValueError` (or `FileNotFoundError`) so generic handlers keep working.
"""

from __future__ import annotations


class JinferError(Exception):
    """Base class of every error jinfer raises on purpose."""


class ConfigError(JinferError, ValueError):
    """A configuration value (model config, engine config, CLI flag) is invalid."""


class MeshError(ConfigError):
    """A mesh description does not match the available devices or is malformed."""


class ShardingError(ConfigError):
    """Sharding rules map two logical axes of one tensor onto the same mesh axis, or similar."""


class UnknownModelError(ConfigError):
    """A config or name refers to a model class or known model that is not registered."""


class CheckpointError(JinferError):
    """Base class of model-directory / checkpoint errors. Messages name the path involved."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A model directory, its config or its parameter files are missing."""


class IncompleteCheckpointError(CheckpointError):
    """A model directory was never finished (a save was interrupted)."""


class CorruptCheckpointError(CheckpointError):
    """Stored bytes do not match the recorded hash, or a data file cannot be read."""


class ParamMismatchError(CheckpointError, ValueError):
    """Parameters on disk do not match the model: missing, extra, wrong shape or dtype."""


class InputError(JinferError, ValueError):
    """A request is invalid. Raised before any device work; the engine keeps serving."""


class EmptyInputError(InputError):
    """An example or prompt is empty."""


class SequenceTooLongError(InputError):
    """An example or prompt is longer than the largest compiled bucket or the cache allows."""


class InvalidTokenError(InputError):
    """A token id is outside the model's vocabulary."""


class InvalidSamplingParamsError(InputError):
    """A sampling parameter is outside its valid range."""


class OverloadedError(JinferError):
    """The request queue is full; retry later or raise the queue size."""


class EngineClosedError(JinferError):
    """The engine was closed; it accepts no more requests."""


class ConversionError(JinferError):
    """A checkpoint cannot be converted to a jinfer model directory."""


class UnsupportedArchitectureError(ConversionError, ValueError):
    """The source checkpoint's architecture is not supported by any converter."""


class MissingTensorError(ConversionError):
    """The source checkpoint lacks a tensor the architecture needs."""


class CheckpointKeyError(CheckpointError, ValueError):
    """A key path selected from a training checkpoint is not in it (the message lists the keys)."""

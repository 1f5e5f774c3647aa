"""Error types. Every message names the problem and the fix (which file, field or value, what is allowed)."""

from __future__ import annotations


class EmbeddingTrainerError(Exception):
    """Base class for errors a user can act on."""


class ConfigError(EmbeddingTrainerError, ValueError):
    """A configuration field has a value that is not allowed."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class DatasetError(EmbeddingTrainerError):
    """The image folder, an image, a caption or a template cannot be used.

    Messages start with the config field they are about (``"images: folder ... does not exist"``); ``field`` is that
    name, so the API and the tab can point at the field as for a ``ConfigError``.
    """

    def __init__(self, message: str):
        head, sep, _ = message.partition(": ")
        self.field = head if sep and head.isidentifier() else None
        super().__init__(message)


class EmbeddingFileError(EmbeddingTrainerError):
    """An embedding file cannot be read, does not fit the model, or would overwrite an existing file."""


class TrainingError(EmbeddingTrainerError):
    """The run stopped because training cannot go on (NaN loss, no gradient, host failure)."""


class LostProcessesError(TrainingError):
    """A data-parallel run lost one of its other processes (it failed, was killed or its connection broke)."""


class HostError(EmbeddingTrainerError):
    """The model given to the trainer is not one it supports, or the host refused an operation."""

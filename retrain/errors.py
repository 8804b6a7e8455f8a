"""Errors a user can act on.

Library code raises these; the command line turns each into one ``Error: ...`` line on
stderr and exit code 1. Anything else that escapes is a bug.
"""


class RetrainError(Exception):
    """Base class: a failure the user can fix (bad input, bad module, bad option)."""


class DatasetError(RetrainError):
    """The image folder cannot be used as given."""


class ModuleError(RetrainError):
    """The module handle cannot be resolved, trusted or used as a feature extractor."""


class ConfigError(RetrainError):
    """An option value is out of range or inconsistent with another."""


class ModelError(RetrainError):
    """A trained model (output folder, SavedModel or .tflite) cannot be loaded or used."""


class OutputError(RetrainError):
    """The output location cannot be written safely."""


class AccuracyError(RetrainError):
    """The trained model is below the accuracy the user asked for (--min-accuracy)."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (or its type name), for one-line user errors."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__

"""One exception type per kind of user error.

The CLI turns any :class:`WsiudaError` into a single line on stderr and a non-zero exit code; anything else
is a bug and keeps its traceback. Messages name the file and say how to fix the problem.
"""

from __future__ import annotations


class WsiudaError(Exception):
    """Base class of every error a user can cause and fix."""


class SlideError(WsiudaError):
    """A slide cannot be opened or read, or lacks what the command needs (e.g. its resolution)."""


class DataError(WsiudaError):
    """A training or evaluation folder is empty, malformed, or has mismatched image/mask pairs."""


class ModelError(WsiudaError):
    """A model file is missing, incompatible, or unsafe to load."""


MODEL_FILE_FIX = "pass a model.pt written by `wsiuda adapt` or `wsiuda train`"
"""What a user can do about a model file that cannot be used."""


class OutputError(WsiudaError):
    """An output path cannot be written, or exists and is not ours to overwrite."""


class ConfigError(WsiudaError):
    """A command's options are inconsistent or out of range."""


class TrainingError(WsiudaError):
    """Training cannot go on (e.g. a loss became NaN); the last good checkpoint is kept."""

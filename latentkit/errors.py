"""The typed errors latentkit raises. Every one derives from `LatentkitError`.

Errors about a bad argument also derive from `ValueError`, errors about missing files
from `FileNotFoundError`, an output file that exists from `FileExistsError` and a NaN
from `ArithmeticError`, so generic ``except`` clauses keep working. ``docs/errors.md``
describes each and the limits behind them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable


class LatentkitError(Exception):
    """Base class of every error latentkit raises on purpose."""


class InvalidArgumentError(LatentkitError, ValueError):
    """An argument has a value latentkit cannot use (the message says which and why)."""


class UnknownNameError(InvalidArgumentError, KeyError):
    """A name (scheduler, conditioner, option) is not registered; the message lists the valid ones."""

    def __init__(self, kind: str, name: str, valid: Iterable[str]) -> None:
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        super().__init__(f"unknown {kind} {name!r}; valid: {', '.join(self.valid) or '(none)'}")

    def __str__(self) -> str:  # KeyError would repr() the message; show it plainly.
        return str(self.args[0])


class ModelNotFoundError(LatentkitError, FileNotFoundError):
    """A model source does not exist: a local path that is missing, or a Hub repo that is not found."""


class ModelNotCachedError(ModelNotFoundError):
    """The Hub cannot be reached (or ``HF_HUB_OFFLINE=1``) and the files are not in the local cache."""


class MissingComponentError(LatentkitError, FileNotFoundError):
    """A model folder lacks a file a component needs (a config, a tokenizer file, weights)."""


class PickleWeightsError(LatentkitError, ValueError):
    """Pickle weights were refused: only pickle weights (``.bin``/``.ckpt``) exist and
    ``allow_pickle=True`` was not given, or, with it, the file tried to import code (a
    global other than tensors and plain containers), which ``weights_only`` loading refuses."""


class ModelFileError(LatentkitError, ValueError):
    """A file of a model exists but cannot be used; the message names the file and what is
    wrong, and `path` holds it (None where the error is about a config given as a dict)."""

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else os.fspath(path)


class CorruptFileError(ModelFileError):
    """A model file is truncated or malformed: empty, not the format its name says, JSON that
    does not parse or is not the object expected, a safetensors header that does not describe
    the data that follows it (size, offsets, dtypes), a pickle that does not unpickle."""


class InvalidConfigError(ModelFileError, InvalidArgumentError):
    """A model config parses but a value is of the wrong type or out of range (zero channels,
    a negative epsilon, a token id beyond the vocabulary); the message says what is valid.
    Also an `InvalidArgumentError`: the config is the argument of a ``from_dict``."""


class UnsafeFileError(ModelFileError):
    """A model file reaches outside its model: a symlink that leaves the model folder, or a
    config that would make a local model fetch files from the network."""


class WeightMismatchError(ModelFileError):
    """A weight file does not match the model its config describes (shape, dtype, missing or
    extra tensors)."""


class UnsupportedModelError(LatentkitError, ValueError):
    """A model config uses a feature latentkit does not implement (the message names it)."""


class OutputPathError(InvalidArgumentError):
    """An output file cannot be written where it was asked: the path is a folder, lies under
    a file, is too long, is not writable, or the disk filled up while writing (`path`
    holds it). Nothing is left behind: images are written to a temporary file and renamed."""

    def __init__(self, message: str, *, path: str | os.PathLike[str]) -> None:
        super().__init__(message)
        self.path = os.fspath(path)


class OutputExistsError(OutputPathError, FileExistsError):
    """An output file exists and ``overwrite=True`` (``--overwrite``) was not given."""


class NonFiniteError(LatentkitError, ArithmeticError):
    """A computation gave NaN or infinity (the message says where, and what to try)."""


class MissingDependencyError(LatentkitError, ImportError):
    """A feature needs an optional package that is not installed; the message names the
    extra that installs it (``pip install "latentkit[sde]"``)."""

"""The typed errors latentkit raises. Every one derives from `LatentkitError`.

Errors about a bad argument also derive from `ValueError`, and errors about
missing files from `FileNotFoundError`, so generic ``except`` clauses keep working.
"""

from __future__ import annotations

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
    """Only pickle weights (``.bin``/``.ckpt``) exist and ``allow_pickle=True`` was not given."""


class WeightMismatchError(LatentkitError, ValueError):
    """A weight file does not match the model its config describes (shape, missing or extra tensors)."""


class UnsupportedModelError(LatentkitError, ValueError):
    """A model config uses a feature latentkit does not implement (the message names it)."""

"""Conditioners by name: each turns one kind of input into tensors the denoiser takes.

Third-party conditioners register with `register` or through the
``latentkit.conditioners`` entry-point group (see `latentkit.registry`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from latentkit.protocols import Conditioner
from latentkit.registry import Registry

registry: Registry[type[Conditioner[Any]]] = Registry("conditioner", "latentkit.conditioners")

C = TypeVar("C", bound=type[Conditioner[Any]])


def register(name: str, *, replace: bool = False) -> Callable[[C], C]:
    """Class decorator registering a conditioner under ``name``."""
    return registry.register(name, replace=replace)  # type: ignore[return-value]


def names() -> list[str]:
    """Every registered conditioner name, sorted."""
    return registry.names()


from latentkit.conditioners.control import ControlInput, ControlNetConditioner  # noqa: E402
from latentkit.conditioners.depth import DepthConditioner, DepthInput  # noqa: E402
from latentkit.conditioners.mask import MaskConditioner, MaskedImage  # noqa: E402
from latentkit.conditioners.size import SizeConditioner  # noqa: E402
from latentkit.conditioners.text import TextConditioner  # noqa: E402

__all__ = [
    "ControlInput",
    "ControlNetConditioner",
    "DepthConditioner",
    "DepthInput",
    "MaskConditioner",
    "MaskedImage",
    "SizeConditioner",
    "TextConditioner",
    "names",
    "register",
    "registry",
]

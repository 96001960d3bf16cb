"""Pipeline families by name: which kind of model a folder holds, and what it declares.

``load_pipeline`` reads ``model_index.json`` and the UNet config and asks `detect` for the
family; the loop that runs every family is `LatentDiffusion`. Third-party families register
with `register` or through the ``latentkit.pipelines`` entry-point group (see
docs/families.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from latentkit.errors import UnsupportedModelError
from latentkit.pipelines.family import Family
from latentkit.registry import Registry

registry: Registry[type[Family]] = Registry("pipeline family", "latentkit.pipelines")

F = TypeVar("F", bound=type[Family])


def register(name: str, *, replace: bool = False) -> Callable[[F], F]:
    """Class decorator registering a `Family` under ``name`` (which it then carries as ``name``)."""

    def decorate(family: F) -> F:
        family.name = name
        registry.add(name, family, replace=replace)
        return family

    return decorate


def names() -> list[str]:
    """Every registered family name, sorted."""
    return registry.names()


def detect(
    model_index: Mapping[str, Any], unet_config: Mapping[str, Any], *, source: str
) -> type[Family]:
    """The family of a model: by ``model_index.json``'s ``_class_name``, and where several
    families (or none) claim that class, by which accepts the UNet config.

    Raises `UnsupportedModelError` naming the known families when none fits.
    """
    families = [registry[n] for n in registry.names()]
    class_name = model_index.get("_class_name")
    claimed = [f for f in families if class_name in f.pipeline_classes]
    fitting = [f for f in claimed if f.accepts(unet_config)]
    if claimed and not fitting:
        # The class name contradicts the networks (a hand-edited model_index.json): the
        # networks decide, among the families that name a class at all.
        fitting = [f for f in families if f.pipeline_classes and f.accepts(unet_config)]
    if len(fitting) != 1:
        known = "; ".join(f"{f.name} ({', '.join(f.pipeline_classes)})" for f in families)
        why = "several families fit" if fitting else "no pipeline family loads it"
        raise UnsupportedModelError(
            f"{source}: {why} (model_index.json _class_name {class_name!r} with this UNet "
            f"config); latentkit knows {known}"
        )
    return fitting[0]


from latentkit.pipelines import sd, sdxl, upscale  # noqa: E402  (registers the built-in families)
from latentkit.pipelines.base import LatentDiffusion  # noqa: E402

__all__ = [
    "Family",
    "LatentDiffusion",
    "detect",
    "names",
    "register",
    "registry",
    "sd",
    "sdxl",
    "upscale",
]

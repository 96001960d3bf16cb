"""Schedulers by name: ``names()``, ``create(name, **options)`` and diffusers-config loading.

A scheduler is an immutable description (a frozen dataclass of its options); the state of
one sampling run lives in the local variables of its `latentkit.Scheduler.sample`
loop, so a scheduler object is safe to share between threads.

Third-party schedulers register with `register` or through the
``latentkit.schedulers`` entry-point group (see `latentkit.registry`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from latentkit.errors import UnknownNameError
from latentkit.protocols import Scheduler
from latentkit.registry import Registry

registry: Registry[type[Scheduler]] = Registry("scheduler", "latentkit.schedulers")

S = TypeVar("S", bound=type[Scheduler])

_CHOSEN = "_latentkit_chosen_options"


def register(name: str, *, replace: bool = False) -> Callable[[S], S]:
    """Class decorator registering a scheduler under ``name``."""
    return registry.register(name, replace=replace)  # type: ignore[return-value]


def names() -> list[str]:
    """Every registered scheduler name, sorted."""
    return registry.names()


def options(name: str) -> list[str]:
    """The option names the scheduler ``name`` accepts."""
    return sorted(_accepted(registry[name]))


def create(name: str, /, *, config: Mapping[str, Any] | None = None, **opts: Any) -> Scheduler:
    """Create the scheduler registered as ``name`` (or an alias of it).

    ``config`` is another scheduler's diffusers-style config (a model's
    ``scheduler_config.json``): every field of it that this scheduler also has is carried
    over, the rest take this scheduler's defaults, as diffusers' ``from_config`` does.
    Explicit ``opts`` win over both. Unknown options raise an error listing the valid ones.
    Options a class lists in ``not_carried`` are fixed by its registration (the algorithm of
    ``dpm-solver++-sde``) and never taken from ``config``.
    """
    key, preset = registry.resolve(name)
    cls = registry[key]
    accepted = _accepted(cls)
    for option in opts:
        if option not in accepted:
            raise UnknownNameError(f"{key} option", option, accepted)
    fixed = set(getattr(cls, "not_carried", ()))
    carried = {
        k: v
        for k, v in (config or {}).items()
        # A null in a config means "not set" (DPM-Solver writes variance_type: null); the
        # receiving scheduler's default applies, as diffusers' code paths treat it.
        if k in accepted and k not in fixed and not k.startswith("_") and v is not None
    }
    carried = _without_defaults_used(config or {}, carried)
    scheduler = cls(**{**carried, **preset, **opts})
    if config is None:
        # Remember what the caller chose, so a pipeline can take the rest from its model.
        object.__setattr__(scheduler, _CHOSEN, (key, {**preset, **opts}))
    return scheduler


def for_model(scheduler: Scheduler, config: Mapping[str, Any]) -> Scheduler:
    """``scheduler`` fitted to a model whose ``scheduler_config.json`` is ``config``.

    A scheduler made by `create` without ``config=`` takes every option its caller did not
    set from the model's config (``create("ddim", eta=0.5)`` on Stable Diffusion gets SD's
    betas and offsets, not DDIM's generic defaults). Any other scheduler is used as it is.
    """
    chosen: tuple[str, dict[str, Any]] | None = getattr(scheduler, _CHOSEN, None)
    if chosen is None:
        return scheduler
    key, opts = chosen
    return create(key, config=config, **opts)


def from_config(config: Mapping[str, Any]) -> Scheduler:
    """The scheduler a diffusers ``scheduler_config.json`` describes (by its ``_class_name``).

    Where registrations share a diffusers class (``DPMSolverMultistepScheduler`` is three, by
    ``algorithm_type``), the one whose optional classmethod ``matches_config(config)`` says
    so is chosen; it may raise `UnsupportedModelError` for a variant none implements.
    """
    class_name = config.get("_class_name")
    for key in registry.names():
        cls = registry[key]
        matches = getattr(cls, "matches_config", None)
        if class_name in getattr(cls, "diffusers_names", ()) and (
            matches is None or matches(config)
        ):
            return create(key, config=config)
    known = sorted(n for k in registry.names() for n in getattr(registry[k], "diffusers_names", ()))
    raise UnknownNameError("scheduler class", str(class_name), known)


def _accepted(cls: type[Scheduler]) -> set[str]:
    return {
        p.name
        for p in inspect.signature(cls).parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def _without_defaults_used(config: Mapping[str, Any], carried: dict[str, Any]) -> dict[str, Any]:
    # diffusers records the fields a saved scheduler took from its own defaults in
    # ``_use_default_values``; those are not carried to another scheduler.
    used_defaults = set(config.get("_use_default_values", ()))
    return {k: v for k, v in carried.items() if k not in used_defaults}


# The built-in registrations.
from latentkit.schedulers import (  # noqa: E402, F401
    ddim,
    ddpm,
    dpm2,
    dpm_solver,
    dpm_solver_2s,
    dpm_solver_singlestep,
    euler,
    euler_ancestral,
    heun,
    lcm,
    lms,
    pndm,
    restart,
    unipc,
)

A1111_ALIASES: Mapping[str, tuple[str, Mapping[str, Any]]] = {
    # AUTOMATIC1111 web UI sampler label -> (registered name, preset options), only where
    # the registration computes the same sampler (diffusers' table of equivalents; "DPM++ 2S
    # a" is k-diffusion's sampler itself, "Restart" A1111's restart_sampler, see
    # latentkit.schedulers.restart). "DPM++ 3M SDE" has no counterpart here, so no alias.
    # The "<sampler> Karras" labels are A1111's names from before its separate "Schedule
    # type"; any sigma-based sampler takes that as its schedule option instead.
    "DDIM": ("ddim", {}),
    "PLMS": ("pndm", {}),
    "Euler": ("euler", {}),
    "Euler a": ("euler-ancestral", {}),
    "Heun": ("heun", {}),
    "LMS": ("lms", {}),
    "LMS Karras": ("lms", {"use_karras_sigmas": True}),
    "DPM++ 2M": ("dpm-solver++", {}),
    "DPM++ 2M Karras": ("dpm-solver++", {"use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("dpm-solver++-sde", {}),
    "DPM++ 2M SDE Karras": ("dpm-solver++-sde", {"use_karras_sigmas": True}),
    "UniPC": ("unipc", {}),
    "LCM": ("lcm", {}),
    "DPM2": ("dpm2", {}),
    "DPM2 Karras": ("dpm2", {"use_karras_sigmas": True}),
    "DPM2 a": ("dpm2-ancestral", {}),
    "DPM2 a Karras": ("dpm2-ancestral", {"use_karras_sigmas": True}),
    "DPM++ SDE": ("dpm-solver++-2s-sde", {}),
    "DPM++ SDE Karras": ("dpm-solver++-2s-sde", {"use_karras_sigmas": True}),
    "DPM++ 2S a": ("dpm-solver++-2s-ancestral", {}),
    "DPM++ 2S a Karras": ("dpm-solver++-2s-ancestral", {"schedule": "karras"}),
    "DPM++ 2M SDE Exponential": ("dpm-solver++-sde", {"use_exponential_sigmas": True}),
    "Restart": ("restart", {}),
}
"""The A1111 sampler labels latentkit accepts as scheduler names, and what each means.

``create("DPM++ 2M Karras")`` is ``create("dpm-solver++", use_karras_sigmas=True)``; labels
match ignoring case, spaces, underscores and dashes, like names. A1111's separate schedule
type goes to the ``schedule`` option, in A1111's words or ours:
``create("Euler a", schedule="SGM Uniform")``.
"""

for _alias, (_name, _preset) in A1111_ALIASES.items():
    registry.alias(_alias, _name, **_preset)


SCHEDULE_LABELS = {
    "karras": "Karras",
    "exponential": "Exponential",
    "sgm_uniform": "SGM Uniform",
    "align_your_steps": "Align Your Steps",
    "align_your_steps_sdxl": "Align Your Steps",
}
"""A1111's "Schedule type" labels of the ``schedule`` values."""


def a1111_label(scheduler: Scheduler) -> tuple[str, str | None]:
    """The A1111 ``Sampler`` label of ``scheduler`` and its ``Schedule type`` (None for the
    sampler's own), as A1111 writes them into PNGs; a sampler A1111 lacks keeps its name."""
    labels = [a for a, (t, preset) in A1111_ALIASES.items() if t == scheduler.name and not preset]
    schedule = getattr(scheduler, "schedule", None)
    if schedule is None and getattr(scheduler, "use_karras_sigmas", False):
        schedule = "karras"
    if schedule is None and getattr(scheduler, "use_exponential_sigmas", False):
        schedule = "exponential"
    return (labels[0] if labels else scheduler.name), (
        None if schedule is None else SCHEDULE_LABELS.get(str(schedule), str(schedule))
    )


def from_a1111_label(sampler: str, schedule: str | None = None) -> Scheduler:
    """The scheduler an A1111 ``Sampler`` label (and ``Schedule type``) names; A1111's
    "Automatic" schedule is the sampler's own."""
    if schedule is not None and schedule.strip().lower() != "automatic":
        return create(sampler, schedule=schedule)
    return create(sampler)


def aliases(name: str) -> list[str]:
    """The A1111 labels that resolve to the registered scheduler ``name``."""
    key, _ = registry.resolve(name)
    return [alias for alias, (target, _) in A1111_ALIASES.items() if target == key]


__all__ = [
    "A1111_ALIASES",
    "SCHEDULE_LABELS",
    "a1111_label",
    "aliases",
    "create",
    "for_model",
    "from_a1111_label",
    "from_config",
    "names",
    "options",
    "register",
    "registry",
]

"""A call's schedule given as values: diffusers' ``timesteps=`` / ``sigmas=``.

diffusers' pipelines pass ``timesteps=[...]`` or ``sigmas=[...]`` to the scheduler's
``set_timesteps``, which then uses exactly those values (Align Your Steps' published tables,
a hand-tuned few-step schedule) instead of spacing ``num_inference_steps`` of its own.
Here the values become part of the immutable scheduler: `with_schedule` returns a copy
whose ``timesteps(steps)`` / ``sigmas(steps)`` are the given ones, so every sampling loop,
image-to-image start and ``denoising_end`` cut reads them like any other schedule.

Which scheduler takes which follows diffusers' ``set_timesteps`` signatures: ``timesteps``
for Euler, DPM-Solver (multistep and single-step), DDPM and Heun's method ... as far as
latentkit implements them (`accepting`); ``sigmas`` for Euler, the one of Stable
Diffusion's schedulers whose ``set_timesteps`` takes them.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from latentkit.errors import InvalidArgumentError

CustomKind = Literal["timesteps", "sigmas"]
"""Which values a `CustomSchedule` gives: model timesteps, or noise levels."""


@dataclass(frozen=True)
class CustomSchedule:
    """Explicit schedule values, in sampling (descending) order.

    ``timesteps``: one training timestep per step. ``sigmas``: the noise levels
    ``sigma = sqrt((1 - alpha_bar) / alpha_bar)`` of every step boundary, the final one
    included (diffusers' convention: ``n + 1`` sigmas for ``n`` steps, usually ending at 0).
    """

    kind: CustomKind
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        values = check_values(self.kind, self.values)
        object.__setattr__(self, "values", values)

    @property
    def steps(self) -> int:
        """The number of inference steps these values make."""
        return len(self.values) - (1 if self.kind == "sigmas" else 0)


def check_values(kind: str, values: object) -> tuple[float, ...]:
    """``values`` as a tuple of floats, checked: a non-empty sequence (a list, a tuple, a 1-D
    array or tensor) of finite, strictly descending numbers; timesteps whole, sigmas ≥ 0 and
    at least two (one step). The range against the model's training schedule is the
    scheduler's check. Anything else is an `InvalidArgumentError`."""
    if kind not in ("timesteps", "sigmas"):
        raise InvalidArgumentError(f"a custom schedule gives timesteps or sigmas, not {kind!r}")
    if hasattr(values, "tolist") and not isinstance(values, Sequence):
        values = values.tolist()  # numpy arrays and torch tensors
    if (
        not isinstance(values, Sequence)
        or isinstance(values, str)
        or not all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
            for v in values
        )
    ):
        raise InvalidArgumentError(f"{kind} must be a list of finite numbers, got {values!r}")
    floats = tuple(float(v) for v in values)
    fewest = 2 if kind == "sigmas" else 1
    if len(floats) < fewest:
        what = "the noise level of every step boundary, the final one (0) included"
        raise InvalidArgumentError(
            f"{kind} needs at least {fewest} value(s)"
            + (f" ({what})" if kind == "sigmas" else "")
            + f", got {len(floats)}"
        )
    if any(b >= a for a, b in itertools.pairwise(floats)):
        raise InvalidArgumentError(
            f"{kind} must be strictly descending (sampling order, noisiest first), got {floats}"
        )
    if kind == "timesteps" and any(v != int(v) or v < 0 for v in floats):
        raise InvalidArgumentError(f"timesteps must be whole numbers ≥ 0, got {floats}")
    if kind == "sigmas" and floats[-1] < 0:
        raise InvalidArgumentError(f"sigmas must be ≥ 0, got {floats}")
    return floats


def accepting(kind: CustomKind) -> list[str]:
    """The registered scheduler names that take custom ``kind`` values."""
    from latentkit import schedulers  # the registry imports this module's users

    return [
        name
        for name in schedulers.names()
        if kind in getattr(schedulers.registry[name], "custom_values", frozenset())
    ]


def with_schedule(
    scheduler: Any,
    *,
    timesteps: Sequence[float] | None = None,
    sigmas: Sequence[float] | None = None,
) -> Any:
    """``scheduler`` with its schedule replaced by ``timesteps`` or ``sigmas`` (one of them):
    its ``timesteps(steps)`` / ``sigmas(steps)`` then return those values, for ``steps``
    equal to their step count (`CustomSchedule.steps`).

    A scheduler whose diffusers class refuses custom values (PNDM, DDIM, LMS, UniPC, ...)
    or a third-party scheduler without the option is an `InvalidArgumentError` naming the
    schedulers that take them; so are values outside the model's training range.
    """
    import dataclasses

    if (timesteps is None) == (sigmas is None):
        raise InvalidArgumentError("pass timesteps or sigmas (exactly one)")
    kind: CustomKind = "timesteps" if timesteps is not None else "sigmas"
    custom = CustomSchedule(kind, timesteps if timesteps is not None else sigmas)  # type: ignore[arg-type]
    name = getattr(scheduler, "name", type(scheduler).__name__)
    if kind not in getattr(scheduler, "custom_values", frozenset()) or not (
        dataclasses.is_dataclass(scheduler)
    ):
        raise InvalidArgumentError(
            f"{name} does not take custom {kind} (nor does its diffusers class); "
            f"schedulers that do: {', '.join(accepting(kind))}"
        )
    return dataclasses.replace(scheduler, custom_schedule=custom)  # type: ignore[type-var]


__all__ = ["CustomKind", "CustomSchedule", "accepting", "check_values", "with_schedule"]

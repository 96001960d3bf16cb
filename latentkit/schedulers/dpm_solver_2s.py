"""Single-step second-order DPM-Solver++ with fresh noise: A1111's "DPM++ 2S a" and "DPM++ SDE".

Both take DPM-Solver++(2S) steps (Lu et al. 2022b, Alg. 1 with ``r = 1/2``) on
``x = x0 + sigma * eps``: with ``t = -log sigma`` (the log-SNR of the variance-preserving
process), the first-order update from ``t`` to ``t'`` is exact for a constant data estimate,

    x' = (sigma' / sigma) * x - expm1(t - t') * x0        (Lu et al. 2022b, eq. 9, i.e. DDIM),

and the second-order step evaluates the network again at the midpoint ``t + h / 2`` and takes
the whole step with that estimate. They differ in where the noise enters:

- `DPMSolverPlusPlus2SAncestral` (k-diffusion's ``sample_dpmpp_2s_ancestral``, no diffusers
  counterpart): the step goes deterministically to ``sigma_down`` of the ancestral split
  (`ancestral_split`), then fresh Gaussian noise of ``sigma_up`` is added; ``eta=0`` is the
  deterministic DPM-Solver++(2S).
- `DPMSolverPlusPlus2SSDE` (k-diffusion's ``sample_dpmpp_sde``, diffusers'
  ``DPMSolverSDEScheduler``): each half step is itself ancestral, with noise that is the
  increment of one Brownian motion over ``sigma`` (a ``torchsde`` Brownian tree), so the two
  halves' noises are consistent with each other and with the step size.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from latentkit.errors import InvalidArgumentError, MissingDependencyError
from latentkit.protocols import Denoiser, Generators, SamplerRun
from latentkit.schedulers import register
from latentkit.schedulers.common import BetaSchedule, sigma_to_t
from latentkit.schedulers.two_stage import NoiseSource, Plan, TwoStage, ancestral_split


def data_step(
    x: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, t_to: torch.Tensor
) -> torch.Tensor:
    """DPM-Solver++(1) from ``sigma = exp(-t)`` to ``exp(-t_to)`` with the data estimate ``x0``
    (Lu et al. 2022b, eq. 9 at ``alpha = 1``): ``(sigma_to / sigma) x - expm1(t - t_to) x0``."""
    return (t_to.neg().exp() / t.neg().exp()) * x - (t - t_to).expm1() * x0


# --------------------------------------------------------------------------- DPM++ 2S a


@register("dpm-solver++-2s-ancestral")
@dataclass(frozen=True, kw_only=True)
class DPMSolverPlusPlus2SAncestral(TwoStage):
    """DPM-Solver++(2S) with ancestral noise (A1111's "DPM++ 2S a"); stochastic for ``eta > 0``.

    Step ``i`` splits ``sigma_{i+1}`` into ``sigma_down`` and ``sigma_up``, takes a
    DPM-Solver++(1) half step to the log-midpoint ``m = sqrt(sigma_i * sigma_down)``,
    evaluates the network there, takes the whole step to ``sigma_down`` with that estimate,
    and adds noise of standard deviation ``sigma_up`` drawn from the run's generator (one draw
    per step but the last, which is one Euler step to 0).

    diffusers has no such class: ``to_config`` writes the name
    ``LatentkitDPMSolverPlusPlus2SAncestralScheduler``, which only latentkit reads back.
    """

    name: ClassVar[str] = "dpm-solver++-2s-ancestral"
    diffusers_names: ClassVar[tuple[str, ...]] = ("LatentkitDPMSolverPlusPlus2SAncestralScheduler",)

    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: BetaSchedule = "scaled_linear"
    """Stable Diffusion's schedule by default (there are no diffusers defaults to follow)."""
    eta: float = 1.0
    """How much of ``sigma_{i+1}`` is fresh noise: 1 is the ancestral sampler (A1111's default
    "eta for ancestral samplers"), 0 the deterministic DPM-Solver++(2S); between 0 and 1."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.eta <= 1:
            raise InvalidArgumentError(f"{self.name}: eta must be between 0 and 1, got {self.eta}")

    def _points(
        self, sigma: torch.Tensor, sigma_next: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # (t, t_mid, t_down, sigma_up) of a step, t = -log sigma. sigma_down > 0 before the
        # last step (eta <= 1 keeps sigma_up below sigma_next); computed without the
        # cancellation diffusers' and k-diffusion's form has for long steps.
        down, up = ancestral_split(sigma, sigma_next, self.eta, stable=True)
        t, t_down = sigma.log().neg(), down.log().neg()
        return t, t + (t_down - t) * 0.5, t_down, up

    def _midpoints(
        self, sigmas: torch.Tensor, spaced: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # One step at a time, with the half steps' own operations.
        steps = range(len(sigmas) - 2)
        mids = [self._points(sigmas[i], sigmas[i + 1])[1].neg().exp() for i in steps]
        stacked = torch.stack(mids) if mids else torch.zeros(0)
        positions = sigma_to_t(stacked.double().numpy(), np.log(self._sigma_table()))
        return stacked, torch.from_numpy(positions)

    def _first_half(
        self, x: torch.Tensor, x0: torch.Tensor, i: int, plan: Plan, noise: NoiseSource
    ) -> torch.Tensor:
        t, t_mid, _, _ = self._points(plan.sigmas[i], plan.sigmas[i + 1])
        return data_step(x, x0, t, t_mid)

    def _second_half(
        self,
        x: torch.Tensor,
        x_mid: torch.Tensor,
        x0_mid: torch.Tensor,
        i: int,
        plan: Plan,
        noise: NoiseSource,
    ) -> torch.Tensor:
        sigma, sigma_next = plan.sigmas[i], plan.sigmas[i + 1]
        t, _, t_down, up = self._points(sigma, sigma_next)
        return data_step(x, x0_mid, t, t_down) + noise(sigma, sigma_next) * up


# --------------------------------------------------------------------------- DPM++ SDE

SDE_EXTRA = "sde"
"""The optional extra that installs torchsde: ``pip install "latentkit[sde]"``."""


@register("dpm-solver++-2s-sde")
@dataclass(frozen=True, kw_only=True)
class DPMSolverPlusPlus2SSDE(TwoStage):
    """Stochastic DPM-Solver++(2S) with Brownian-tree noise (A1111's "DPM++ SDE"), diffusers'
    ``DPMSolverSDEScheduler``; needs ``torchsde`` (``pip install "latentkit[sde]"``).

    Both half steps of step ``i`` are ancestral: from ``sigma_i`` to ``m = sqrt(sigma_i *
    sigma_{i+1})`` and from ``sigma_i`` to ``sigma_{i+1}`` (with the estimate at ``m``), each
    a DPM-Solver++(1) step to its ``sigma_down`` plus ``sigma_up`` times the normalised
    increment of a Brownian motion ``W(sigma)`` over the half step's range.

    How the noise is seeded: ``W`` is a ``torchsde.BrownianInterval`` over the schedule's
    sigmas whose samples are fixed by an integer entropy. With ``noise_sampler_seed`` that
    integer is used, one tree for the whole batch, as diffusers does. Without it (the
    default) the entropy is drawn from the run's generator,
    ``torch.randint(0, 2**63 - 1, (), generator=g)``, one tree per generator when there is a
    list of them (one per image: an image does not depend on its batch), so the same seed
    gives the same image; diffusers draws that integer from the global RNG instead. The tree
    is built on the CPU, in the sample's dtype, whatever the sample's device, so a seed gives
    the same noise on every device (diffusers builds it on the sample's device).
    """

    name: ClassVar[str] = "dpm-solver++-2s-sde"
    diffusers_names: ClassVar[tuple[str, ...]] = ("DPMSolverSDEScheduler",)
    spaces_in_float64: ClassVar[bool] = True

    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    """diffusers implements no ``sample`` prediction for this class, nor do we."""
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    """Beta-distributed sigmas (Lee et al. 2024); not implemented, accepted only as ``False``."""
    noise_sampler_seed: int | None = None
    """The Brownian tree's entropy; None: drawn from the run's generator (see the class)."""

    def sample(
        self,
        model: Denoiser,
        noise: torch.Tensor,
        *,
        steps: int,
        generator: Generators = None,
        start: int = 0,
        init: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SamplerRun:
        """As `latentkit.Scheduler.sample`; raises `MissingDependencyError` without torchsde,
        before any network evaluation."""
        _torchsde()
        return super().sample(
            model, noise, steps=steps, generator=generator, start=start, init=init, **kwargs
        )

    def _midpoints(
        self, sigmas: torch.Tensor, spaced: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The loop's midpoints in float32, one step at a time; the network's timesteps there
        # from the float64 sigmas before rounding, as diffusers computes both.
        steps = range(len(sigmas) - 2)
        mids = [_log_midpoint(sigmas[i], sigmas[i + 1])[1].neg().exp() for i in steps]
        t = -np.log(spaced)
        where = np.exp(-(t[:-1] + np.diff(t) * 0.5))
        positions = sigma_to_t(where, np.log(self._sigma_table()))
        return (torch.stack(mids) if mids else torch.zeros(0)), torch.from_numpy(positions)

    def _first_half(
        self, x: torch.Tensor, x0: torch.Tensor, i: int, plan: Plan, noise: NoiseSource
    ) -> torch.Tensor:
        t, t_mid, _ = _log_midpoint(plan.sigmas[i], plan.sigmas[i + 1])
        return _ancestral_data_step(x, x0, t, t_mid, noise)

    def _second_half(
        self,
        x: torch.Tensor,
        x_mid: torch.Tensor,
        x0_mid: torch.Tensor,
        i: int,
        plan: Plan,
        noise: NoiseSource,
    ) -> torch.Tensor:
        t, _, t_next = _log_midpoint(plan.sigmas[i], plan.sigmas[i + 1])
        return _ancestral_data_step(x, x0_mid, t, t_next, noise)

    def _noise(self, x: torch.Tensor, plan: Plan, generator: Generators) -> NoiseSource:
        if self.noise_sampler_seed is not None:
            entropy: int | list[int] = self.noise_sampler_seed
        elif generator is None:
            entropy = _entropy(None)
        elif isinstance(generator, torch.Generator):
            entropy = _entropy(generator)
        else:
            entropy = [_entropy(g) for g in generator]
        positive = plan.sigmas[plan.sigmas > 0]
        return BrownianNoise(x, float(positive.min()), float(positive.max()), entropy)


def _log_midpoint(
    sigma: torch.Tensor, sigma_next: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # (t, t_mid, t_next) of a step, t = -log sigma, in diffusers' float32 operations.
    t, t_next = sigma.log().neg(), sigma_next.log().neg()
    return t, t + (t_next - t) * 0.5, t_next


def _ancestral_data_step(
    x: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, t_to: torch.Tensor, noise: NoiseSource
) -> torch.Tensor:
    # From exp(-t) to exp(-t_to): DPM-Solver++(1) to sigma_down, plus sigma_up of noise.
    sigma, sigma_to = t.neg().exp(), t_to.neg().exp()
    down, up = ancestral_split(sigma, sigma_to)
    return data_step(x, x0, t, down.log().neg()) + noise(sigma, sigma_to) * up


def _entropy(generator: torch.Generator | None) -> int:
    # A Brownian tree's entropy from the run's generator (the global RNG for None).
    device = None if generator is None else generator.device
    return int(torch.randint(0, 2**63 - 1, (), generator=generator, device=device))


class BrownianNoise:
    """Normalised increments of a Brownian motion ``W(sigma)`` on ``[sigma_min, sigma_max]``:
    ``noise(sigma, sigma_next) = (W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|)``, a
    unit Gaussian for every interval, consistent across nested intervals.

    One ``torchsde.BrownianInterval`` of ``like``'s shape for an int ``entropy``, or one per
    batch item for a list, built on the CPU in ``like``'s dtype with the options diffusers'
    ``BrownianTreeNoiseSampler`` uses (tolerance 1e-6, entropy pool of 24, halfway tree), so
    the same entropy gives diffusers' samples; results move to ``like``'s device.
    """

    def __init__(
        self, like: torch.Tensor, sigma_min: float, sigma_max: float, entropy: int | list[int]
    ) -> None:
        torchsde = _torchsde()
        self.start, self.end, self.device = sigma_min, sigma_max, like.device
        self.batched = isinstance(entropy, list)
        shape = like.shape[1:] if self.batched else like.shape
        if self.batched and len(entropy) != like.shape[0]:  # type: ignore[arg-type]
            raise InvalidArgumentError(
                f"got {len(entropy)} generators for a batch of {like.shape[0]}; pass one per image"  # type: ignore[arg-type]
            )
        self.trees = [
            torchsde.BrownianInterval(
                t0=sigma_min,
                t1=sigma_max,
                size=shape,
                dtype=like.dtype,
                device="cpu",
                entropy=seed,
                tol=1e-6,
                pool_size=24,
                halfway_tree=True,
            )
            for seed in (entropy if isinstance(entropy, list) else [entropy])
        ]

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        # The tree answers for increasing times only: W(sigma_next) - W(sigma) is minus its
        # increment over [sigma_next, sigma]. Times are clamped to the tree's range as
        # torchsde itself would (sigma = exp(-t) may round a bit outside it), without its warning.
        low, high = sorted((float(sigma), float(sigma_next)))
        low, high = min(max(low, self.start), self.end), min(max(high, self.start), self.end)
        sign = -1.0 if float(sigma) > float(sigma_next) else 1.0
        increments = [tree(low, high) for tree in self.trees]
        w = torch.stack(increments) if self.batched else increments[0]
        return (w * sign / (sigma_next - sigma).abs().sqrt()).to(self.device)


def _torchsde() -> Any:
    # torchsde, imported on first use: it is an optional dependency.
    try:
        return importlib.import_module("torchsde")
    except ImportError as e:
        raise MissingDependencyError(
            "dpm-solver++-2s-sde (A1111's DPM++ SDE) draws its noise from a torchsde Brownian "
            f'tree; install it with pip install "latentkit[{SDE_EXTRA}]"'
        ) from e


__all__ = [
    "BrownianNoise",
    "DPMSolverPlusPlus2SAncestral",
    "DPMSolverPlusPlus2SSDE",
    "data_step",
]

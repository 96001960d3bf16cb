"""The pieces every discrete-time scheduler shares, each written once.

Noise schedules (betas and their cumulative products), timestep spacing, sigma tables,
prediction-type conversions, dynamic thresholding, and `DiscreteScheduler`, the
immutable base holding the options every scheduler trained on ``num_train_timesteps``
discrete steps has. Table arithmetic follows diffusers' dtypes step by step (float32 tables,
float64 numpy interpolation), because matching it bit for bit is what makes the samplers exact.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from latentkit.errors import InvalidArgumentError
from latentkit.protocols import Denoiser, Generators, PredictionType, SamplerRun
from latentkit.schedulers.custom import CustomKind, CustomSchedule

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
"""How betas rise over training: linearly, linearly in sqrt (Stable Diffusion), or cosine."""

TimestepSpacing = Literal["leading", "trailing", "linspace"]
"""How inference timesteps are picked from the training ones (Lin et al. 2024, Table 2)."""

Schedule = Literal[
    "karras", "exponential", "sgm_uniform", "align_your_steps", "align_your_steps_sdxl"
]
"""AUTOMATIC1111's schedule types, any sigma-based sampler's ``schedule`` option: Karras sigmas
(Karras et al. 2022, eq. 5), log-uniform sigmas, sgm's uniform timesteps, or the published
Align Your Steps tables (Sabour et al. 2024) for Stable Diffusion 1.x and SDXL."""

SigmaSpacing = Literal[
    "table", "karras", "exponential", "sgm_uniform", "align_your_steps", "align_your_steps_sdxl"
]
"""Sigmas read off the training table at the spaced timesteps, or one of the `Schedule` types."""

FinalSigmas = Literal["zero", "sigma_min"]
"""Where the last step of a sigma-based sampler lands: on clean data, or on the smallest trained sigma."""

Scalar = torch.Tensor | float


# --------------------------------------------------------------------------- noise schedules


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas of the cosine schedule (Nichol & Dhariwal 2021, eq. 17), capped at ``max_beta``."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def make_betas(
    schedule: BetaSchedule, num_train_timesteps: int, beta_start: float, beta_end: float
) -> torch.Tensor:
    """The float32 betas of a named schedule."""
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if schedule == "scaled_linear":
        # Linear in sqrt(beta): the schedule of latent diffusion and Stable Diffusion.
        root = torch.linspace(
            beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32
        )
        return root**2
    if schedule == "squaredcos_cap_v2":
        return cosine_betas(num_train_timesteps)
    raise _invalid("beta_schedule", schedule, typing.get_args(BetaSchedule))


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose last step has zero signal-to-noise ratio (Lin et al. 2024, Algorithm 1).

    sqrt(alpha_bar) is shifted so its last value is 0 and scaled so its first is unchanged.
    """
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    alphas_bar = root**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


@functools.lru_cache(maxsize=64)
def _alphas_cumprod(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: BetaSchedule,
    trained_betas: tuple[float, ...] | None,
    zero_terminal_snr: bool,
) -> torch.Tensor:
    # Cached per schedule (lru_cache is thread-safe); callers must never modify the result.
    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float32)
    else:
        betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0)


# --------------------------------------------------------------------------- timesteps and sigmas


def spaced_timesteps(
    spacing: TimestepSpacing,
    count: int,
    *,
    num_train_timesteps: int,
    steps_offset: int = 0,
    end: int | None = None,
) -> np.ndarray:
    """``count`` training timesteps in sampling (descending) order, as float64.

    ``linspace`` spreads them evenly over ``[0, end - 1]`` (not rounded: callers round or
    not as their family does); ``leading`` takes multiples of ``end // count`` from 0, plus
    ``steps_offset``; ``trailing`` steps down by ``num_train_timesteps / count`` from ``end``
    and subtracts 1 (Lin et al. 2024, Table 2). ``end`` defaults to ``num_train_timesteps``.
    """
    end = num_train_timesteps if end is None else end
    if spacing == "linspace":
        return np.linspace(0, end - 1, count)[::-1].copy()
    if spacing == "leading":
        return (np.arange(count) * (end // count) + steps_offset)[::-1].astype(np.float64)
    if spacing == "trailing":
        timesteps = np.round(np.arange(end, 0, -num_train_timesteps / count)) - 1
        # Float rounding in arange sometimes adds a point just above 0, i.e. timestep -1
        # (for 62 of the step counts 1..1000); diffusers keeps it, evaluating the network
        # at t = -1 (and DDIM reading alpha_bar[-1], the noisiest entry). We drop it.
        return np.asarray(timesteps[timesteps >= 0])
    raise _invalid("timestep_spacing", spacing, typing.get_args(TimestepSpacing))


def karras_sigmas(sigma_min: float, sigma_max: float, count: int, rho: float = 7.0) -> np.ndarray:
    """``count`` sigmas from ``sigma_max`` down to ``sigma_min`` (Karras et al. 2022, eq. 5)."""
    ramp = np.linspace(0, 1, count)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return np.asarray((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential_sigmas(sigma_min: float, sigma_max: float, count: int) -> np.ndarray:
    """``count`` sigmas from ``sigma_max`` down to ``sigma_min``, evenly spaced in log sigma."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), count))


def sgm_uniform_sigmas(
    sigma_min: float, sigma_max: float, count: int, *, table: np.ndarray
) -> np.ndarray:
    """``count`` sigmas at training timesteps evenly spaced from ``t(sigma_max)`` towards
    ``t(sigma_min)``: sgm's discretization, A1111's "SGM Uniform".

    ``count + 1`` evenly spaced timesteps are taken and the last (``t(sigma_min)``) dropped,
    so the final step of a sampler ending at 0 starts one stride above ``sigma_min``. Sigmas
    between training steps are interpolated linearly in log sigma (k-diffusion's
    ``t_to_sigma``), the inverse of `sigma_to_t`; ``table`` is the ascending sigma table.
    """
    log_table = np.log(table.astype(np.float64))
    t_max, t_min = sigma_to_t(np.array([sigma_max, sigma_min]), log_table)
    return t_to_sigma(np.linspace(t_max, t_min, count + 1)[:-1], log_table)


# The published 10-step schedules (NVIDIA's Align Your Steps "how to" page, as A1111's
# sd_schedulers.py carries them): 11 noise levels, the last the model's smallest sigma.
# fmt: off
ALIGN_YOUR_STEPS: dict[str, tuple[float, ...]] = {
    "align_your_steps":      (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "align_your_steps_sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
}
# fmt: on
"""Align Your Steps noise levels (Sabour, Fidler & Kreis 2024) for Stable Diffusion 1.x and SDXL."""


def align_your_steps_sigmas(levels: Sequence[float], count: int) -> np.ndarray:
    """The first ``count`` of ``count + 1`` noise levels resampled from a published Align Your
    Steps table; a sampler then steps from the last of them to its final sigma (0).

    The table has one level per step boundary, its last the model's smallest sigma, which
    the final step replaces by 0: 10 steps take the table's first 10 levels, as diffusers'
    ``AysSchedules`` (whose last entry is 0) and ComfyUI do. Other counts interpolate log
    sigma linearly over evenly spaced positions (the authors' ``loglinear_interp``). A1111
    resamples to ``count`` levels instead and appends 0, so its 10 steps interpolate while
    its 11 steps are the table.
    """
    if count + 1 == len(levels):
        return np.asarray(levels[:-1], dtype=np.float64)
    positions = np.linspace(0, 1, len(levels))
    resampled = np.exp(np.interp(np.linspace(0, 1, count + 1), positions, np.log(levels)))
    return np.asarray(resampled[:-1])


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of ``sigmas``, by linear interpolation in log sigma.

    ``log_sigmas`` is the ascending table ``log(sigma(t))`` for ``t = 0 .. N-1``; values
    outside it clamp to its ends.
    """
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    above = log_sigma[np.newaxis, :] - log_sigmas[:, np.newaxis] >= 0
    low = np.cumsum(above, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return np.asarray((1 - w) * low + w * (low + 1))


def t_to_sigma(timesteps: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Sigmas at fractional training timesteps, interpolating ``log_sigmas`` (ascending
    ``log(sigma(t))`` for ``t = 0 .. N-1``) linearly: the inverse of `sigma_to_t`."""
    low = np.floor(timesteps).astype(np.int64).clip(0, len(log_sigmas) - 2)
    w = timesteps - low
    return np.asarray(np.exp((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]))


def sigma_table(alphas_cumprod: torch.Tensor, *, zero_terminal_snr: bool = False) -> np.ndarray:
    """``sigma(t) = sqrt((1 - alpha_bar_t) / alpha_bar_t)`` for ``t = 0 .. N-1`` (ascending), float32.

    With ``zero_terminal_snr`` the last sigma would be infinite; it is kept finite but huge.
    """
    if zero_terminal_snr:
        alphas_cumprod = alphas_cumprod.clone()
        alphas_cumprod[-1] = 2**-24
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


def sigma_spacing(scheduler: str, *, karras: bool, exponential: bool, beta: bool) -> SigmaSpacing:
    """The sigma spacing diffusers' ``use_karras_sigmas`` / ``use_exponential_sigmas`` /
    ``use_beta_sigmas`` flags select; at most one may be set, and beta sigmas (Lee et al. 2024,
    computed with scipy in diffusers) are not implemented."""
    if karras + exponential + beta > 1:
        raise InvalidArgumentError(
            f"{scheduler}: use at most one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas"
        )
    if beta:
        raise InvalidArgumentError(f"{scheduler}: use_beta_sigmas is not implemented")
    return "karras" if karras else "exponential" if exponential else "table"


def respaced_sigmas(
    spacing: SigmaSpacing, sigma_min: float, sigma_max: float, count: int, *, table: np.ndarray
) -> np.ndarray | None:
    """``count`` sigmas of the `Schedule` ``spacing`` from ``sigma_max`` down to ``sigma_min``
    (``table``, the ascending sigma table, places SGM Uniform's timesteps; the Align Your Steps
    tables have their own ends); None for ``table`` spacing."""
    if spacing == "karras":
        return karras_sigmas(sigma_min, sigma_max, count)
    if spacing == "exponential":
        return exponential_sigmas(sigma_min, sigma_max, count)
    if spacing == "sgm_uniform":
        return sgm_uniform_sigmas(sigma_min, sigma_max, count, table=table)
    if spacing in ALIGN_YOUR_STEPS:
        return align_your_steps_sigmas(ALIGN_YOUR_STEPS[spacing], count)
    return None


def interpolated_schedule(
    timesteps: np.ndarray,
    table: np.ndarray,
    *,
    spacing: SigmaSpacing = "table",
    count: int,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rounded: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``(timesteps, sigmas)`` of the samplers that read sigmas off ``table`` (k-diffusion's discrete schedule).

    Sigmas are interpolated linearly in ``t``; a `Schedule` ``spacing`` replaces them by
    ``count`` sigmas between the interpolated ends (or ``sigma_min`` / ``sigma_max``) and the
    timesteps by their fractional positions in the table (``rounded`` to integers where
    diffusers rounds them). Timesteps come back as float32, sigmas as float64 without a
    final sigma.
    """
    sigmas = np.interp(timesteps, np.arange(len(table)), table)
    respaced = respaced_sigmas(
        spacing,
        sigmas[-1] if sigma_min is None else sigma_min,
        sigmas[0] if sigma_max is None else sigma_max,
        count,
        table=table,
    )
    if respaced is None:
        return timesteps.astype(np.float32), sigmas
    positions = sigma_to_t(respaced, np.log(table))
    return (np.round(positions) if rounded else positions).astype(np.float32), respaced


def init_noise_sigma(sigmas: torch.Tensor, timestep_spacing: TimestepSpacing) -> torch.Tensor:
    """The standard deviation of the starting sample of a sampler working at ``x0 + sigma * eps``.

    The largest sigma; with leading spacing diffusers uses ``sqrt(sigma_max**2 + 1)``, the
    standard deviation of ``x0 + sigma * eps`` for unit-variance data, and so do we.
    """
    top = sigmas.max()
    return top if timestep_spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5


def vp_coefficients(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha_t, sigma_t)`` of the variance-preserving process whose ``sigma_t / alpha_t`` is ``sigma``."""
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha, sigma * alpha


def ve_noised(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x0 + sigma * noise``: the sample of a sampler working at that scale (diffusers' ``add_noise``).

    ``sigma`` is rounded to ``x0``'s dtype first, as diffusers does.
    """
    return x0 + noise * sigma.to(device=x0.device, dtype=x0.dtype)


def resumed(sent: torch.Tensor | None, sample: torch.Tensor) -> torch.Tensor:
    """What a sampling loop continues from after yielding ``sample``: the tensor its caller sent
    with ``send`` (see `latentkit.protocols.SamplerRun`), else ``sample`` itself."""
    if sent is None:
        return sample
    if not isinstance(sent, torch.Tensor) or sent.shape != sample.shape:
        got = tuple(sent.shape) if isinstance(sent, torch.Tensor) else type(sent).__name__
        raise InvalidArgumentError(
            f"a sampling loop can only continue from a tensor of its sample's shape "
            f"{tuple(sample.shape)}, got {got}"
        )
    return sent


# --------------------------------------------------------------------------- model outputs


def predicted_x0(
    prediction_type: PredictionType,
    output: torch.Tensor,
    x: torch.Tensor,
    *,
    alpha: Scalar,
    sigma: Scalar,
) -> torch.Tensor:
    """The clean sample the network predicts at ``x = alpha * x0 + sigma * eps``, ``alpha**2 + sigma**2 = 1``.

    ``v = alpha * eps - sigma * x0`` (Salimans & Ho 2022, sec. 4), so ``x0 = alpha * x - sigma * v``.
    """
    if prediction_type == "epsilon":
        return (x - sigma * output) / alpha
    if prediction_type == "sample":
        return output
    if prediction_type == "v_prediction":
        return alpha * x - sigma * output
    raise _invalid("prediction_type", prediction_type, typing.get_args(PredictionType))


def predicted_eps(
    prediction_type: PredictionType,
    output: torch.Tensor,
    x: torch.Tensor,
    *,
    alpha: Scalar,
    sigma: Scalar,
) -> torch.Tensor:
    """The noise the network predicts at ``x = alpha * x0 + sigma * eps``, ``alpha**2 + sigma**2 = 1``.

    For ``v``: ``eps = alpha * v + sigma * x`` (Salimans & Ho 2022, sec. 4).
    """
    if prediction_type == "epsilon":
        return output
    if prediction_type == "sample":
        return (x - alpha * output) / sigma
    if prediction_type == "v_prediction":
        return alpha * output + sigma * x
    raise _invalid("prediction_type", prediction_type, typing.get_args(PredictionType))


def predicted_x0_ve(
    prediction_type: PredictionType, output: torch.Tensor, x: torch.Tensor, *, sigma: torch.Tensor
) -> torch.Tensor:
    """The clean sample the network predicts at the variance-exploding ``x = x0 + sigma * eps``.

    The network saw ``x / sqrt(sigma**2 + 1)``, the variance-preserving sample with
    ``alpha = 1 / sqrt(sigma**2 + 1)``; for ``v`` that gives
    ``x0 = x / (sigma**2 + 1) - sigma / sqrt(sigma**2 + 1) * v``.
    """
    if prediction_type == "epsilon":
        return x - sigma * output
    if prediction_type == "sample":
        return output
    if prediction_type == "v_prediction":
        # Tensor on the left: on CPU a 0-d float32 right operand keeps full precision with
        # float16 tensors, a left one does not; this order reproduces diffusers bit for bit.
        return x / (sigma**2 + 1) - output * (sigma / (sigma**2 + 1) ** 0.5)
    raise _invalid("prediction_type", prediction_type, typing.get_args(PredictionType))


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Saharia et al. 2022, sec. 2.3).

    Per image, ``s`` is the ``ratio`` quantile of ``|x0|`` clamped to ``[1, max_value]``;
    ``x0`` is clipped to ``[-s, s]`` and divided by ``s``. Computed in float32 at least
    (``quantile`` needs it), returned in ``x0``'s dtype.
    """
    flat = x0.reshape(x0.shape[0], -1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(x0.dtype)


# --------------------------------------------------------------------------- the base class


@dataclass(frozen=True, kw_only=True)
class DiscreteScheduler(abc.ABC):
    """Options shared by every scheduler of a model trained on discrete timesteps.

    Instances are immutable and hold no per-run state, so one can serve many threads.
    Derived tables (``alphas_cumprod``) are computed on first use and cached per schedule.
    Subclasses set ``name``, ``diffusers_names`` and implement `timesteps` and
    `_sample`.
    """

    name: ClassVar[str]
    diffusers_names: ClassVar[tuple[str, ...]]
    """diffusers class names this scheduler reproduces; the first is written by `to_config`."""
    evaluations_per_step: ClassVar[int] = 1
    """Network evaluations per inference step: diffusers' ``scheduler.order`` (2 for Heun),
    named apart from LMS's ``order`` option."""
    custom_values: ClassVar[frozenset[CustomKind]] = frozenset()
    """Which explicit values ``custom_schedule`` may give (those diffusers' ``set_timesteps``
    of this class takes); the subclass's schedule honours them."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: BetaSchedule = "linear"
    trained_betas: Sequence[float] | None = None
    """Explicit betas, one per training step; override ``beta_schedule`` when given."""
    prediction_type: PredictionType = "epsilon"
    timestep_spacing: TimestepSpacing = "leading"
    steps_offset: int = 0
    custom_schedule: CustomSchedule | None = None
    """This call's schedule as explicit values (diffusers' ``timesteps=`` / ``sigmas=``; see
    `latentkit.schedulers.custom.with_schedule`); ``steps`` must then be its step count.
    Not written by `to_config`: it belongs to a call, not to a model."""

    def __post_init__(self) -> None:
        if self.trained_betas is not None:
            # A tuple keeps the object hashable (the table cache is keyed on it).
            betas = tuple(float(b) for b in self.trained_betas)
            object.__setattr__(self, "trained_betas", betas)
            if len(betas) != self.num_train_timesteps:
                raise InvalidArgumentError(
                    f"{self.name}: trained_betas has {len(betas)} values but "
                    f"num_train_timesteps is {self.num_train_timesteps}; give one beta per step"
                )
        if self.num_train_timesteps < 2:
            raise InvalidArgumentError(f"{self.name}: num_train_timesteps must be at least 2")
        if self.steps_offset < 0:
            raise InvalidArgumentError(f"{self.name}: steps_offset must be >= 0")
        for field, valid in _choices(type(self)).items():
            if getattr(self, field) not in valid:
                raise _invalid(field, getattr(self, field), valid, scheduler=self.name)
        if self.custom_schedule is not None:
            self._check_custom(self.custom_schedule)

    # ---- the Scheduler protocol

    @abc.abstractmethod
    def timesteps(self, steps: int) -> torch.Tensor:
        """The model timesteps evaluated for ``steps`` inference steps, in sampling order."""

    def start_index(self, steps: int, strength: float) -> int:
        """The position in ``timesteps(steps)`` where image-to-image with ``strength`` starts.

        As diffusers' img2img ``get_timesteps``: ``int(steps * strength)`` steps are run (all
        of them for ``strength=1``), so the first ``steps - int(steps * strength)`` steps,
        ``evaluations_per_step`` evaluations each, are skipped.
        """
        self._check_steps(steps)
        if isinstance(strength, bool) or not isinstance(strength, int | float):
            raise InvalidArgumentError(f"strength must be a number, got {type(strength).__name__}")
        if not 0 <= strength <= 1:
            raise InvalidArgumentError(f"strength must be between 0 and 1, got {strength}")
        run = min(int(steps * strength), steps)
        if run == 0:
            fewest = math.ceil(1 / strength) if strength > 0 else None
            if fewest is not None and int(fewest * strength) < 1:
                fewest += 1  # float rounding of the product
            fix = f"use a strength of at least 1/{steps}" + (
                f" or at least {fewest} steps" if fewest is not None else ""
            )
            raise InvalidArgumentError(
                f"{self.name}: strength={strength} with {steps} steps leaves no step to run "
                f"(int(steps * strength) = 0); {fix}"
            )
        start = (steps - run) * self.evaluations_per_step
        self._check_start(steps, start)
        return start

    def noised(
        self, x0: torch.Tensor, noise: torch.Tensor, *, steps: int, index: int
    ) -> torch.Tensor:
        """``x0`` noised to the level of position ``index`` of ``timesteps(steps)``: the forward
        process ``sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * noise`` (Ho et al. 2020,
        eq. 4) at that timestep, as diffusers' ``add_noise``."""
        timesteps = self.timesteps(steps)
        self._check_index(index, len(timesteps))
        return self.add_noise(x0, noise, timesteps[index : index + 1])

    def sample(
        self,
        model: Denoiser,
        noise: torch.Tensor,
        *,
        steps: int,
        generator: Generators = None,
        start: int = 0,
        init: torch.Tensor | None = None,
        resume: torch.Tensor | None = None,
    ) -> SamplerRun:
        """Sample from unit Gaussian ``noise``, yielding after every network evaluation.

        With ``init``, start at position ``start`` from ``noised(init, noise, ...)``; with
        ``resume``, from ``resume`` itself, a sample already at that position (see
        `latentkit.protocols.Scheduler.sample`). Arguments are checked here, before the
        first ``next()``.
        """
        self._check_steps(steps)
        if isinstance(start, bool) or not isinstance(start, int):
            raise InvalidArgumentError(f"start must be an int, got {type(start).__name__}")
        if resume is not None:
            if init is not None:
                raise InvalidArgumentError("pass init or resume, not both")
            self._check_index(start, len(self.timesteps(steps)))
            self._check_start(steps, start)
            return self._sample(model, resume, steps, generator, start)
        if init is None:
            if start != 0:
                raise InvalidArgumentError(
                    f"{self.name}: start={start} needs init, the clean latents to noise to that "
                    "position (see start_index)"
                )
            return self._sample(model, self._initial_sample(noise, steps), steps, generator, 0)
        if init.shape != noise.shape:
            raise InvalidArgumentError(
                f"init has shape {tuple(init.shape)} but noise has {tuple(noise.shape)}; "
                "give one of each per image"
            )
        self._check_index(start, len(self.timesteps(steps)))
        self._check_start(steps, start)
        x = self.noised(init, noise, steps=steps, index=start)
        return self._sample(model, x, steps, generator, start)

    def to_config(self) -> dict[str, Any]:
        """The diffusers-style config (``_class_name`` plus every option) that recreates this scheduler."""
        config: dict[str, Any] = {"_class_name": self.diffusers_names[0]}
        for f in dataclasses.fields(self):
            if f.name == "custom_schedule":
                continue
            value = getattr(self, f.name)
            config[f.name] = list(value) if isinstance(value, tuple) else value
        return config

    # ---- training helpers

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """``alpha_bar_t = prod_{s<=t} (1 - beta_s)`` for every training step (float32, a copy)."""
        return self._alphas_cumprod().clone()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Sample of the forward process q(x_t | x_0) (Ho et al. 2020, eq. 4), one ``t`` per batch item."""
        alpha, sigma = self._vp_at(t, x0)
        return alpha * x0 + sigma * noise

    def training_target(
        self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """What the network should output for ``add_noise(x0, noise, t)``, per ``prediction_type``.

        ``epsilon``: the noise; ``sample``: ``x0``; ``v_prediction``:
        ``v = alpha_t * eps - sigma_t * x0`` (Salimans & Ho 2022, sec. 4).
        """
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        alpha, sigma = self._vp_at(t, x0)
        return alpha * noise - sigma * x0

    # ---- for subclasses

    @abc.abstractmethod
    def _sample(
        self, model: Denoiser, x: torch.Tensor, steps: int, generator: Generators, start: int
    ) -> SamplerRun:
        """The sampling loop from sample ``x`` at position ``start``, for checked arguments.

        Solver state (histories, counters) starts empty whatever ``start``; anything that
        depends on the position uses the absolute one. After each ``yield``, continue from
        ``resumed(sent, sample)``.
        """

    def _initial_sample(self, noise: torch.Tensor, steps: int) -> torch.Tensor:
        # The starting sample of a full run from unit Gaussian noise.
        return noise

    def _check_start(self, steps: int, start: int) -> None:
        # Refuse a start position this scheduler cannot begin at (start is in range).
        if start % self.evaluations_per_step:
            raise InvalidArgumentError(
                f"{self.name}: start must be a multiple of {self.evaluations_per_step} "
                f"(the evaluations per step), got {start}; use start_index"
            )

    def _check_index(self, index: int, count: int) -> None:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
            raise InvalidArgumentError(
                f"{self.name}: position {index!r} is not in timesteps(steps); use 0 to {count - 1}"
            )

    def _alphas_cumprod(self) -> torch.Tensor:
        # The shared cached table: read it, never write to it.
        return _alphas_cumprod(
            self.num_train_timesteps,
            self.beta_start,
            self.beta_end,
            self.beta_schedule,
            None if self.trained_betas is None else tuple(self.trained_betas),
            # Not every scheduler has this option (PNDM does not), hence getattr.
            bool(getattr(self, "rescale_betas_zero_snr", False)),
        )

    def _integer_timesteps(self, steps: int) -> torch.Tensor:
        """Spaced training timesteps rounded to int64, the grid of DDPM and DDIM (or the
        custom timesteps, where the class takes them)."""
        self._check_steps(steps)
        if self.custom_schedule is not None:
            return torch.tensor(self.custom_schedule.values, dtype=torch.int64)
        spaced = spaced_timesteps(
            self.timestep_spacing,
            steps,
            num_train_timesteps=self.num_train_timesteps,
            steps_offset=self.steps_offset,
        )
        return torch.from_numpy(self._within_training_range(np.round(spaced).astype(np.int64)))

    def _check_steps(self, steps: int) -> None:
        if not isinstance(steps, int) or isinstance(steps, bool):
            raise InvalidArgumentError(f"steps must be an int, got {type(steps).__name__}")
        custom = self.custom_schedule
        if custom is not None and steps != custom.steps:
            raise InvalidArgumentError(
                f"{self.name}: the custom {custom.kind} make {custom.steps} steps, got steps={steps}"
            )
        if not 1 <= steps <= self.num_train_timesteps:
            raise InvalidArgumentError(
                f"{self.name}: steps must be between 1 and num_train_timesteps "
                f"({self.num_train_timesteps}), got {steps}"
            )

    def _check_custom(self, custom: CustomSchedule) -> None:
        # Explicit values this class takes, inside the training schedule: timesteps below
        # num_train_timesteps, sigmas not above the largest trained sigma (to the 3 decimals
        # published tables round to: Align Your Steps starts at 14.615 for SD's 14.6146).
        if custom.kind not in self.custom_values:
            raise InvalidArgumentError(
                f"{self.name}: custom {custom.kind} are not supported by this scheduler "
                "(see latentkit.schedulers.custom.accepting)"
            )
        if custom.kind == "timesteps" and custom.values[0] >= self.num_train_timesteps:
            raise InvalidArgumentError(
                f"{self.name}: timestep {custom.values[0]:g} is past the last training step "
                f"{self.num_train_timesteps - 1}"
            )
        if custom.kind == "sigmas":
            top = float(sigma_table(self._alphas_cumprod())[-1])
            if custom.values[0] > round(top, 3) + 5e-4:
                raise InvalidArgumentError(
                    f"{self.name}: sigma {custom.values[0]:g} is above the largest trained "
                    f"noise level {top:.4f}"
                )

    def _within_training_range(self, timesteps: np.ndarray) -> np.ndarray:
        # Leading spacing with a steps_offset reaches timestep N at N steps; diffusers then
        # indexes past its tables (DDIM, PNDM) or asks the network about an untrained
        # timestep (Euler, DPM-Solver). We refuse instead.
        if timesteps.size and timesteps.max() >= self.num_train_timesteps:
            raise InvalidArgumentError(
                f"{self.name}: {self.timestep_spacing} spacing with steps_offset={self.steps_offset} "
                f"gives timestep {timesteps.max():g}, past the last training step "
                f"{self.num_train_timesteps - 1}; use fewer steps or another timestep_spacing"
            )
        return timesteps

    def _vp_at(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t), shaped to broadcast over a batch.
        # The table is cast to the sample dtype before the sqrt, as diffusers' add_noise does.
        table = self._alphas_cumprod().to(device=like.device, dtype=like.dtype)
        alpha_bar = table[t.to(like.device)].flatten()
        shape = (-1,) + (1,) * (like.ndim - 1)
        return (alpha_bar**0.5).reshape(shape), ((1 - alpha_bar) ** 0.5).reshape(shape)


@dataclass(frozen=True, kw_only=True)
class TabulatedSigmas(DiscreteScheduler):
    """Base of the schedulers that step through noise levels ``sigma = sqrt((1 - alpha_bar) / alpha_bar)``
    read off the training table at the spaced timesteps, or respaced by a `Schedule`: the
    ``schedule`` option, or diffusers' ``use_karras_sigmas`` / ``use_exponential_sigmas``
    flags where the subclass has them."""

    timestep_spacing: TimestepSpacing = "linspace"
    schedule: Schedule | None = None
    """A1111's schedule type (``"karras"``, ``"exponential"``, ``"sgm_uniform"``,
    ``"align_your_steps"``, ``"align_your_steps_sdxl"``; A1111's labels such as
    ``"SGM Uniform"`` are accepted too, ``"Automatic"`` meaning None). None: the sigma
    flags decide, else the table's sigmas. When set it replaces those flags: on a class that
    has them, Karras and exponential are stored as the flags (so ``schedule="karras"``
    equals ``use_karras_sigmas=True``, and `to_config` stays a diffusers config)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", _schedule_name(self.schedule))
        super().__post_init__()  # checks the schedule among the choices
        names = {f.name for f in dataclasses.fields(self)}
        if self.schedule is not None and {"use_karras_sigmas", "use_exponential_sigmas"} <= names:
            object.__setattr__(self, "use_karras_sigmas", self.schedule == "karras")
            object.__setattr__(self, "use_exponential_sigmas", self.schedule == "exponential")
            if "use_beta_sigmas" in names:
                object.__setattr__(self, "use_beta_sigmas", False)
            if self.schedule in ("karras", "exponential"):
                object.__setattr__(self, "schedule", None)
        self._sigma_spacing()  # checks the flags

    def to_config(self) -> dict[str, Any]:
        """The diffusers-style config; ``schedule``, which diffusers lacks, only where set."""
        config = super().to_config()
        if self.schedule is None:
            del config["schedule"]
        return config

    def _check_custom(self, custom: CustomSchedule) -> None:
        super()._check_custom(custom)
        # As diffusers' set_timesteps: given timesteps and a respacing of the sigmas would
        # contradict each other (given sigmas simply win over the flags).
        if custom.kind == "timesteps" and self._sigma_spacing() != "table":
            raise InvalidArgumentError(
                f"{self.name}: custom timesteps do not go with the {self._sigma_spacing()} "
                "schedule; pass sigmas= instead, or drop the schedule option"
            )

    def sigmas(self, steps: int) -> torch.Tensor:
        """The float32 noise levels of ``steps`` inference steps, plus the final one."""
        self._check_steps(steps)
        return self._schedule(steps)[1]

    def timesteps(self, steps: int) -> torch.Tensor:
        self._check_steps(steps)
        return self._schedule(steps)[0]

    @abc.abstractmethod
    def _schedule(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(timesteps, sigmas)`` for an already checked ``steps``; sigmas has one more entry."""

    def _sigma_spacing(self) -> SigmaSpacing:
        # Not every diffusers class has these flags (Euler ancestral has none), hence getattr.
        flags = sigma_spacing(
            self.name,
            karras=bool(getattr(self, "use_karras_sigmas", False)),
            exponential=bool(getattr(self, "use_exponential_sigmas", False)),
            beta=bool(getattr(self, "use_beta_sigmas", False)),
        )
        return flags if self.schedule is None else self.schedule


@dataclass(frozen=True, kw_only=True)
class VarianceExploding(TabulatedSigmas):
    """Samplers whose state is ``x = x0 + sigma * eps`` (Karras et al. 2022's ODE): the start is
    scaled by the initial noise sigma and the network sees ``x / sqrt(sigma**2 + 1)``."""

    def init_noise_sigma(self, steps: int) -> torch.Tensor:
        """The standard deviation of the starting sample for ``steps`` steps."""
        self._check_steps(steps)
        return init_noise_sigma(self._schedule(steps)[1], self.timestep_spacing)

    def noised(
        self, x0: torch.Tensor, noise: torch.Tensor, *, steps: int, index: int
    ) -> torch.Tensor:
        """``x0 + sigma * noise`` at ``sigma = sigmas(steps)[index]`` (diffusers' ``add_noise``)."""
        sigmas = self.sigmas(steps)
        self._check_index(index, len(sigmas) - 1)
        return ve_noised(x0, noise, sigmas[index])

    def _initial_sample(self, noise: torch.Tensor, steps: int) -> torch.Tensor:
        return noise * init_noise_sigma(self._schedule(steps)[1], self.timestep_spacing)


@dataclass(frozen=True, kw_only=True)
class SigmaScheduler(TabulatedSigmas):
    """Base of the schedulers with diffusers' full sigma options (Euler, the DPM-Solver family,
    UniPC): Karras, exponential or table sigmas, closed by a final sigma."""

    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    """Beta-distributed sigmas (Lee et al. 2024); not implemented, accepted only as ``False``."""
    final_sigmas_type: FinalSigmas = "zero"
    rescale_betas_zero_snr: bool = False

    @abc.abstractmethod
    def noised(
        self, x0: torch.Tensor, noise: torch.Tensor, *, steps: int, index: int
    ) -> torch.Tensor:
        """``x0`` noised to ``sigmas(steps)[index]`` in the subclass's state space."""

    def _sigma_table(self) -> np.ndarray:
        # sigma(t) for t = 0 .. N-1 (ascending), float32 as diffusers computes it.
        return sigma_table(self._alphas_cumprod(), zero_terminal_snr=self.rescale_betas_zero_snr)

    def _respaced(self, sigma_min: float, sigma_max: float, count: int) -> np.ndarray | None:
        # The schedule's sigmas between the given ends, or None to keep the table's.
        return respaced_sigmas(
            self._sigma_spacing(), sigma_min, sigma_max, count, table=self._sigma_table()
        )

    def _with_final_sigma(self, sigmas: np.ndarray, table: np.ndarray) -> torch.Tensor:
        # Append the last noise level and round to float32.
        final = table[0] if self.final_sigmas_type == "sigma_min" else 0.0
        return torch.from_numpy(np.append(sigmas, final).astype(np.float32))

    def _custom_values(
        self, custom: CustomSchedule, *, integer: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(timesteps, sigmas)`` of explicit values as diffusers' ``set_timesteps`` builds
        them: given timesteps (cast to int64 where ``integer``, else float32) with sigmas read
        off the table there plus the final sigma; or the given sigmas (float32, their final
        one included) with their fractional timesteps found back in the table (`sigma_to_t`)."""
        table = self._sigma_table()
        if custom.kind == "sigmas":
            sigmas = np.asarray(custom.values).astype(np.float32)
            timesteps = sigma_to_t(sigmas[:-1], np.log(table)).astype(np.float32)
            return torch.from_numpy(timesteps), torch.from_numpy(sigmas)
        given = np.asarray(custom.values)
        spaced = given.astype(np.int64) if integer else given.astype(np.float32)
        sigmas = np.interp(spaced, np.arange(len(table)), table)
        return torch.from_numpy(spaced), self._with_final_sigma(sigmas, table)


@dataclass(frozen=True, kw_only=True)
class SigmaTableScheduler(VarianceExploding):
    """Base of the older k-diffusion-style samplers (Euler ancestral, Heun, LMS, DPM2, ...), whose
    diffusers classes lack `SigmaScheduler`'s options: sigmas are read off the training table
    at the spaced timesteps (or respaced by a `Schedule`) and end at 0.
    """

    rounds_karras_timesteps: ClassVar[bool] = False
    """Whether the timesteps of Karras sigmas are rounded to integers (diffusers' KDPM2 classes)."""
    spaces_in_float64: ClassVar[bool] = False
    """Whether sigmas are read off the table at the float64 spaced timesteps (diffusers'
    ``DPMSolverSDEScheduler``) rather than at their float32 rounding (the others)."""

    def _schedule(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        # (float32 timesteps, float32 sigmas with the final 0) for an already checked steps.
        timesteps, sigmas = self._spaced_sigmas(steps)
        final = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))
        return torch.from_numpy(timesteps), final

    def _spaced_sigmas(self, steps: int) -> tuple[np.ndarray, np.ndarray]:
        # (float32 timesteps, float64 sigmas without the final 0) for an already checked steps.
        spaced = spaced_timesteps(
            self.timestep_spacing,
            steps,
            num_train_timesteps=self.num_train_timesteps,
            steps_offset=self.steps_offset,
        )
        if self.custom_schedule is not None:
            # Given timesteps (the only custom values these classes take), table sigmas.
            spaced = np.asarray(self.custom_schedule.values)
        if not self.spaces_in_float64:
            spaced = spaced.astype(np.float32)
        spacing = self._sigma_spacing()
        timesteps, sigmas = interpolated_schedule(
            spaced,
            self._sigma_table(),
            spacing=spacing,
            count=steps,
            rounded=spacing == "karras" and self.rounds_karras_timesteps,
        )
        return self._within_training_range(timesteps), sigmas

    def _sigma_table(self) -> np.ndarray:
        # sigma(t) for t = 0 .. N-1 (ascending), float32 as diffusers computes it. Not every
        # such scheduler has the zero-SNR option (Heun and LMS do not), hence getattr.
        zero_snr = bool(getattr(self, "rescale_betas_zero_snr", False))
        return sigma_table(self._alphas_cumprod(), zero_terminal_snr=zero_snr)


# --------------------------------------------------------------------------- helpers


@functools.cache
def _choices(cls: type) -> dict[str, tuple[object, ...]]:
    # Allowed values of every Literal-typed option of ``cls``, read from its annotations.
    choices: dict[str, tuple[object, ...]] = {}
    for name, hint in typing.get_type_hints(cls).items():
        values: list[object] = []
        for part in typing.get_args(hint) if _is_union(hint) else (hint,):
            if typing.get_origin(part) is Literal:
                values.extend(typing.get_args(part))
            elif part is type(None):
                values.append(None)
            else:  # a free-valued type (float | None): not a choice
                values = []
                break
        if values and name in {f.name for f in dataclasses.fields(cls)}:
            choices[name] = tuple(values)
    return choices


def _schedule_name(value: object) -> object:
    # A1111's schedule labels ("SGM Uniform", "Align Your Steps", "SGMUniform") to the
    # option's values, matched ignoring case, spaces, underscores and dashes; "Automatic"
    # (A1111: the sampler's default) is None. Anything else is left for the choices check.
    if not isinstance(value, str):
        return value
    key = _squeezed(value)
    if key == "automatic":
        return None
    return {_squeezed(name): name for name in typing.get_args(Schedule)}.get(key, value)


def _squeezed(label: str) -> str:
    return "".join(c for c in label.lower() if c not in " _-")


def _is_union(hint: object) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _invalid(
    field: str, value: object, valid: Sequence[object], *, scheduler: str | None = None
) -> InvalidArgumentError:
    where = f"{scheduler}: " if scheduler else ""
    listed = ", ".join(repr(v) for v in valid)
    return InvalidArgumentError(f"{where}{field}={value!r} is not valid; choose one of {listed}")

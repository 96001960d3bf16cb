"""Pseudo numerical methods for diffusion models (Liu et al. 2022), diffusers' ``PNDMScheduler``.

The Stable Diffusion 1.x default (with ``skip_prk_steps=True``: PLMS).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

from latentkit.errors import InvalidArgumentError
from latentkit.protocols import Denoiser, Generators, SamplerRun, SamplerStep
from latentkit.schedulers import register
from latentkit.schedulers.common import (
    DiscreteScheduler,
    predicted_eps,
    resumed,
    spaced_timesteps,
)


@register("pndm")
@dataclass(frozen=True, kw_only=True)
class PNDM(DiscreteScheduler):
    """Pseudo linear multistep (PLMS) sampling with a 4th-order Adams–Bashforth combination of noise predictions.

    The history is warmed up either by three pseudo Runge–Kutta steps (four evaluations
    each) or, with ``skip_prk_steps``, by one pseudo improved Euler step, which evaluates
    the second timestep twice. Each step jumps ``num_train_timesteps // steps`` timesteps.
    """

    name: ClassVar[str] = "pndm"
    diffusers_names: ClassVar[tuple[str, ...]] = ("PNDMScheduler",)

    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    skip_prk_steps: bool = False
    set_alpha_to_one: bool = False
    """Past the first training step, use ``alpha_bar = 1`` (clean data) instead of ``alpha_bar_0``."""

    def timesteps(self, steps: int) -> torch.Tensor:
        self._check_steps(steps)
        if not self.skip_prk_steps and steps < 4:
            raise InvalidArgumentError(
                f"pndm: the Runge-Kutta warm-up needs at least 4 steps, got {steps}; "
                "use more steps or skip_prk_steps=True"
            )
        up = np.round(
            spaced_timesteps(
                self.timestep_spacing,
                steps,
                num_train_timesteps=self.num_train_timesteps,
                steps_offset=self.steps_offset,
            )[::-1]
        ).astype(np.int64)
        self._within_training_range(up)
        if self.skip_prk_steps:
            # The warm-up evaluates the second timestep twice (see _sample).
            return torch.from_numpy(np.concatenate([up[:-1], up[-2:-1], up[-1:]])[::-1].copy())
        # Three Runge-Kutta steps over the four highest timesteps, each evaluated at its
        # start, twice at its midpoint and at its end; then PLMS from the 4th highest down.
        half = self.num_train_timesteps // steps // 2
        prk = [
            t
            for start, end in zip(up[:-4:-1], up[-2:-5:-1], strict=True)
            for t in (start, end + half, end + half, end)
        ]
        return torch.from_numpy(np.array(prk + list(up[-4::-1]), dtype=np.int64))

    def _check_start(self, steps: int, start: int) -> None:
        super()._check_start(steps, start)
        if start and not self.skip_prk_steps:
            # diffusers' Runge-Kutta warm-up reads its timesteps from the start of the
            # schedule by its own step count, whatever the position, so a part-way run
            # would mix noise levels; we refuse instead.
            raise InvalidArgumentError(
                "pndm: the Runge-Kutta warm-up (skip_prk_steps=False) cannot start part-way; "
                "use skip_prk_steps=True (PLMS) or strength=1"
            )

    def _sample(
        self, model: Denoiser, x: torch.Tensor, steps: int, generator: Generators, start: int
    ) -> SamplerRun:
        timesteps = self.timesteps(steps)
        model_timesteps = timesteps.to(x.device)
        total = len(timesteps)
        alphas_cumprod = self._alphas_cumprod()
        final_alpha_cumprod = torch.tensor(1.0) if self.set_alpha_to_one else alphas_cumprod[0]
        jump = self.num_train_timesteps // steps

        def transfer(x: torch.Tensor, output: torch.Tensor, t: int, t_prev: int) -> torch.Tensor:
            """The transfer part phi from ``t`` to ``t_prev`` (Liu et al. 2022, eq. 9)."""
            a_t = alphas_cumprod[t]
            a_prev = alphas_cumprod[t_prev] if t_prev >= 0 else final_alpha_cumprod
            # The (combined) network output is read as a prediction at (x, t), as diffusers does.
            eps = predicted_eps(
                self.prediction_type, output, x, alpha=a_t**0.5, sigma=(1 - a_t) ** 0.5
            )
            denominator = a_t * (1 - a_prev) ** 0.5 + (a_t * (1 - a_t) * a_prev) ** 0.5
            return (a_prev / a_t) ** 0.5 * x - (a_prev - a_t) * eps / denominator

        history: list[torch.Tensor] = []  # raw network outputs at the start of each step
        warmup = 0 if self.skip_prk_steps else 12
        half = self.num_train_timesteps // steps // 2
        for i in range(0, warmup, 4):
            # Pseudo Runge-Kutta: four evaluations, each transferring from the step's start
            # (to half a step further for the first three; the first target is
            # start - half, which is the evaluated midpoint only for an even jump).
            first, mid, end = int(timesteps[i]), int(timesteps[i + 1]), int(timesteps[i + 3])
            x_start, slopes = x, []
            for k, target in enumerate((first - half, mid, mid - half, end)):
                slopes.append(model(x, model_timesteps[i + k]))
                output = slopes[k]
                if k == 3:
                    output = (
                        1 / 6 * slopes[0] + 1 / 3 * slopes[1] + 1 / 3 * slopes[2] + 1 / 6 * output
                    )
                x = transfer(x_start, output, first, target)
                x = resumed((yield SamplerStep(i + k, total, model_timesteps[i + k], x)), x)
            history.append(slopes[0])

        x_first = x
        for i in range(warmup + start, total):
            t = int(timesteps[i])
            output = model(x, model_timesteps[i])
            if self.skip_prk_steps and i == start + 1:
                # Pseudo improved Euler: redo the first step with the mean of both slopes.
                # diffusers counts the steps of this run, so a run started part-way redoes
                # its own first step here, from t + jump to t, and so do we.
                x = transfer(x_first, (output + history[-1]) / 2, t + jump, t)
            else:
                history = [*history[-3:], output]
                x = transfer(x, _adams_bashforth(history), t, t - jump)
            step = SamplerStep(i - start, total - start, model_timesteps[i], x)
            x = resumed((yield step), x)


def _adams_bashforth(history: list[torch.Tensor]) -> torch.Tensor:
    # Linear multistep combination of the last (up to) four outputs, newest last; lower
    # orders while the history fills up (Liu et al. 2022, sec. 3.3).
    if len(history) == 1:
        return history[-1]
    if len(history) == 2:
        return (3 * history[-1] - history[-2]) / 2
    if len(history) == 3:
        return (23 * history[-1] - 16 * history[-2] + 5 * history[-3]) / 12
    return (1 / 24) * (55 * history[-1] - 59 * history[-2] + 37 * history[-3] - 9 * history[-4])

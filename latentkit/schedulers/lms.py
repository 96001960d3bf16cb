"""Linear multistep sampling on the probability-flow ODE (k-diffusion's ``sample_lms``),
diffusers' ``LMSDiscreteScheduler``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from latentkit.errors import InvalidArgumentError
from latentkit.protocols import Denoiser, Generators, SamplerRun, SamplerStep
from latentkit.schedulers import register
from latentkit.schedulers.common import (
    SigmaTableScheduler,
    predicted_x0_ve,
    resumed,
)


@register("lms")
@dataclass(frozen=True, kw_only=True)
class LMS(SigmaTableScheduler):
    """Linear multistep sampler: each step integrates the Lagrange polynomial through the
    last ``order`` slopes ``dx/dsigma`` (an Adams–Bashforth method in sigma, on a
    non-uniform grid); one evaluation per step.
    """

    name: ClassVar[str] = "lms"
    diffusers_names: ClassVar[tuple[str, ...]] = ("LMSDiscreteScheduler",)

    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    """Beta-distributed sigmas (Lee et al. 2024); not implemented, accepted only as ``False``."""
    order: int = 4
    """Number of slopes combined (lower while they accumulate); a ``step`` argument in diffusers."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._sigma_spacing()  # checks the flags
        if self.order < 1:
            raise InvalidArgumentError(f"lms: order must be at least 1, got {self.order}")

    def _sample(
        self, model: Denoiser, x: torch.Tensor, steps: int, generator: Generators, start: int
    ) -> SamplerRun:
        timesteps, sigmas = self._schedule(steps)
        model_timesteps = timesteps.to(x.device)
        levels = sigmas.tolist()  # the float32 sigmas as exact Python floats
        total = len(timesteps) - start
        slopes: list[torch.Tensor] = []  # dx/dsigma at the previous sigmas, newest last
        for i, sigma in enumerate(sigmas[start:-1], start):
            output = model(x / ((sigma**2 + 1) ** 0.5), model_timesteps[i])
            x0 = predicted_x0_ve(self.prediction_type, output, x, sigma=sigma)
            slopes = [*slopes, (x - x0) / sigma][-self.order :]
            # diffusers picks the rule's order by the absolute position, min(i + 1, order); a
            # run started part-way has fewer slopes than that for a few steps, and diffusers
            # then uses the rule's first weights only (its zip stops early). So do we.
            weights = lms_coefficients(levels, i, min(i + 1, self.order))[: len(slopes)]
            # Newest slope first, summed in diffusers' order.
            update = weights[0] * slopes[-1]
            for weight, earlier in zip(weights[1:], reversed(slopes[:-1]), strict=True):
                update = update + weight * earlier
            x = x + update
            x = resumed((yield SamplerStep(i - start, total, model_timesteps[i], x)), x)


def lms_coefficients(sigmas: Sequence[float], i: int, order: int) -> list[float]:
    """The weights of the step from ``sigmas[i]`` to ``sigmas[i + 1]``, newest slope first.

    Weight ``j`` is the integral over the step of the Lagrange basis polynomial that is 1 at
    ``sigmas[i - j]`` and 0 at the other nodes ``sigmas[i]``, ..., ``sigmas[i - order + 1]``.
    The basis has degree ``order - 1``, so Gauss–Legendre quadrature with ``order`` nodes
    (exact to degree ``2 * order - 1``) integrates it exactly; diffusers uses scipy's
    adaptive quadrature on a float32 integrand instead. Evaluating the basis as a product,
    rather than expanding it into monomials, keeps it accurate for closely spaced sigmas.
    """
    if not 1 <= order <= i + 1:
        raise InvalidArgumentError(f"lms: order must be between 1 and {i + 1}, got {order}")
    nodes = np.array([sigmas[i - k] for k in range(order)], dtype=np.float64)
    start, end = float(sigmas[i]), float(sigmas[i + 1])
    roots, weights = np.polynomial.legendre.leggauss(order)
    tau = (end - start) / 2 * roots + (end + start) / 2
    coefficients = []
    for j in range(order):
        others = np.delete(nodes, j)
        basis = np.prod((tau[:, np.newaxis] - others) / (nodes[j] - others), axis=1)
        coefficients.append(float((end - start) / 2 * np.dot(weights, basis)))
    return coefficients

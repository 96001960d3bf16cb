"""latentkit: latent diffusion (Stable Diffusion) in one typed call.

>>> import latentkit
>>> result = latentkit.generate("a photo of a cat", seed=42)  # doctest: +SKIP
>>> result.images[0].save("cat.png")  # doctest: +SKIP
"""

from __future__ import annotations

from latentkit import conditioners, control, pipelines, schedulers
from latentkit.api import clear_cache, generate, load_pipeline
from latentkit.errors import (
    InvalidArgumentError,
    LatentkitError,
    MissingComponentError,
    ModelNotCachedError,
    ModelNotFoundError,
    PickleWeightsError,
    UnknownNameError,
    UnsupportedModelError,
    WeightMismatchError,
)
from latentkit.models.autoencoder import Tiling
from latentkit.performance import Performance
from latentkit.pipelines import Family, LatentDiffusion
from latentkit.protocols import Autoencoder, Conditioner, Denoiser, Pipeline, SamplerStep, Scheduler
from latentkit.request import Limits, Request, limits, set_limits
from latentkit.results import GenerationParameters, GenerationResult

__version__ = "0.1.0"

__all__ = [
    "Autoencoder",
    "Conditioner",
    "Denoiser",
    "Family",
    "GenerationParameters",
    "GenerationResult",
    "InvalidArgumentError",
    "LatentDiffusion",
    "LatentkitError",
    "Limits",
    "MissingComponentError",
    "ModelNotCachedError",
    "ModelNotFoundError",
    "Performance",
    "PickleWeightsError",
    "Pipeline",
    "Request",
    "SamplerStep",
    "Scheduler",
    "Tiling",
    "UnknownNameError",
    "UnsupportedModelError",
    "WeightMismatchError",
    "clear_cache",
    "conditioners",
    "control",
    "generate",
    "limits",
    "load_pipeline",
    "pipelines",
    "schedulers",
    "set_limits",
]

"""latentkit: latent diffusion (Stable Diffusion) in one typed call.

>>> import latentkit
>>> result = latentkit.generate("a photo of a cat", seed=42)  # doctest: +SKIP
>>> result.images[0].save("cat.png")  # doctest: +SKIP
"""

from __future__ import annotations

from latentkit import conditioners, schedulers
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
from latentkit.pipeline import StableDiffusion
from latentkit.protocols import Autoencoder, Conditioner, Denoiser, Pipeline, SamplerStep, Scheduler
from latentkit.results import GenerationParameters, GenerationResult

__version__ = "0.1.0"

__all__ = [
    "Autoencoder",
    "Conditioner",
    "Denoiser",
    "GenerationParameters",
    "GenerationResult",
    "InvalidArgumentError",
    "LatentkitError",
    "MissingComponentError",
    "ModelNotCachedError",
    "ModelNotFoundError",
    "Performance",
    "PickleWeightsError",
    "Pipeline",
    "SamplerStep",
    "Scheduler",
    "StableDiffusion",
    "Tiling",
    "UnknownNameError",
    "UnsupportedModelError",
    "WeightMismatchError",
    "clear_cache",
    "conditioners",
    "generate",
    "load_pipeline",
    "schedulers",
]

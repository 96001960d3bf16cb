"""latentkit: latent diffusion (Stable Diffusion) in one typed call.

>>> import latentkit
>>> result = latentkit.generate("a photo of a cat", seed=42)  # doctest: +SKIP
>>> result.images[0].save("cat.png")  # doctest: +SKIP
"""

from __future__ import annotations

from latentkit import conditioners, control, pipelines, schedulers
from latentkit.api import clear_cache, generate, load_pipeline
from latentkit.errors import (
    CorruptFileError,
    InvalidArgumentError,
    InvalidConfigError,
    LatentkitError,
    MissingComponentError,
    MissingDependencyError,
    ModelFileError,
    ModelNotCachedError,
    ModelNotFoundError,
    NonFiniteError,
    OutputExistsError,
    OutputPathError,
    PickleWeightsError,
    UnknownNameError,
    UnsafeFileError,
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
    "CorruptFileError",
    "Denoiser",
    "Family",
    "GenerationParameters",
    "GenerationResult",
    "InvalidArgumentError",
    "InvalidConfigError",
    "LatentDiffusion",
    "LatentkitError",
    "Limits",
    "MissingComponentError",
    "MissingDependencyError",
    "ModelFileError",
    "ModelNotCachedError",
    "ModelNotFoundError",
    "NonFiniteError",
    "OutputExistsError",
    "OutputPathError",
    "Performance",
    "PickleWeightsError",
    "Pipeline",
    "Request",
    "SamplerStep",
    "Scheduler",
    "Tiling",
    "UnknownNameError",
    "UnsafeFileError",
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

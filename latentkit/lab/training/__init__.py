"""Building blocks for training a latent diffusion model from scratch.

- `autoencoder_loss` / `train_autoencoder`: the KL autoencoder (Rombach et al. 2022, sec. 3.1);
- `denoiser_loss` / `train_denoiser`: the UNet (Ho et al. 2020, eq. 14, any prediction type);
- `train_controlnet`: a ControlNet for a frozen UNet (Zhang et al. 2023, eq. 5);
- `contrastive_loss`: CLIP's objective, to pretrain a text encoder (Radford et al. 2021);
- `drop_context`: prompt dropout for classifier-free guidance (Ho & Salimans 2022);
- `EMA`: the averaged weights to ship;
- `build_word_tokenizer`: a CLIP tokenizer for a small caption vocabulary.

Write the trained model with `latentkit.saving.save_pipeline`; `latentkit.load_pipeline`
(and diffusers) read it back.
"""

from __future__ import annotations

from latentkit.lab.training.ema import EMA
from latentkit.lab.training.loops import (
    LossCallback,
    LossLog,
    forever,
    train_autoencoder,
    train_controlnet,
    train_denoiser,
)
from latentkit.lab.training.losses import (
    AutoencoderLoss,
    Reconstruction,
    TrainingSchedule,
    autoencoder_loss,
    contrastive_loss,
    denoiser_loss,
    drop_context,
    kl_to_standard_normal,
    sample_timesteps,
)
from latentkit.lab.training.tokenizer import build_word_tokenizer

__all__ = [
    "EMA",
    "AutoencoderLoss",
    "LossCallback",
    "LossLog",
    "Reconstruction",
    "TrainingSchedule",
    "autoencoder_loss",
    "build_word_tokenizer",
    "contrastive_loss",
    "denoiser_loss",
    "drop_context",
    "forever",
    "kl_to_standard_normal",
    "sample_timesteps",
    "train_autoencoder",
    "train_controlnet",
    "train_denoiser",
]

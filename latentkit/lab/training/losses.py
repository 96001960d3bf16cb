"""The training objectives of latent diffusion, one function each, with the paper they follow."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentkit.errors import InvalidArgumentError
from latentkit.models.autoencoder import AutoencoderKL

Reconstruction = Literal["l1", "l2"]


class TrainingSchedule(Protocol):
    """What training needs of a scheduler: the forward process and the regression target.

    Every latentkit scheduler (`latentkit.schedulers.create`) has these.
    """

    @property
    def num_train_timesteps(self) -> int: ...

    @property
    def prediction_type(self) -> str: ...

    @property
    def alphas_cumprod(self) -> Tensor: ...

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor: ...

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class AutoencoderLoss:
    """The terms of `autoencoder_loss`; ``total`` is the one to minimise."""

    total: Tensor
    reconstruction: Tensor
    """Mean L1 or L2 error per pixel value."""
    kl: Tensor
    """``KL(q(z|x) || N(0, I))`` in nats per image (summed over latent elements, batch mean)."""


def kl_to_standard_normal(mean: Tensor, logvar: Tensor) -> Tensor:
    """``KL(N(mean, exp(logvar)) || N(0, I))`` summed over all but the batch dimension:
    ``0.5 * sum(mean^2 + var - 1 - logvar)`` (Kingma & Welling 2014, app. B)."""
    per_element = mean.square() + logvar.exp() - 1.0 - logvar
    return 0.5 * per_element.flatten(1).sum(dim=1)


def autoencoder_loss(
    vae: AutoencoderKL,
    images: Tensor,
    *,
    kl_weight: float,
    reconstruction: Reconstruction = "l1",
    generator: torch.Generator | None = None,
) -> AutoencoderLoss:
    """The KL-regularised autoencoder objective of Rombach et al. 2022, sec. 3.1 (a VAE's
    negative ELBO with a down-weighted KL, Kingma & Welling 2014), without the perceptual
    and adversarial terms.

    ``images`` (B, 3, H, W) in [-1, 1] are encoded to the posterior, a sample ``z`` of it
    (drawn with ``generator``) is decoded, and
    ``total = reconstruction + kl_weight * kl / (values per image)``: LDM's per-image sum
    ``sum|x - D(z)| + kl_weight * KL`` divided by the number of pixel values, so
    ``kl_weight`` means what it does in LDM's configs (1e-6 for SD's VAE).
    """
    if reconstruction not in ("l1", "l2"):
        raise InvalidArgumentError(f"reconstruction must be 'l1' or 'l2', got {reconstruction!r}")
    if kl_weight < 0:
        raise InvalidArgumentError(f"kl_weight must be >= 0, got {kl_weight}")
    posterior = vae.posterior(images)
    z = posterior.sample(generator)
    decoded = vae.decode(z * vae.scaling_factor)
    error = (decoded.float() - images.float()).abs()
    rec = (error if reconstruction == "l1" else error.square()).mean()
    kl = kl_to_standard_normal(posterior.mean.float(), posterior.logvar.float()).mean()
    values_per_image = images[0].numel()
    return AutoencoderLoss(total=rec + kl_weight * kl / values_per_image, reconstruction=rec, kl=kl)


def sample_timesteps(
    schedule: TrainingSchedule,
    batch: int,
    *,
    generator: torch.Generator | None,
    device: torch.device,
) -> Tensor:
    """``batch`` timesteps drawn uniformly from ``{0, ..., num_train_timesteps - 1}``."""
    return torch.randint(
        0, schedule.num_train_timesteps, (batch,), generator=generator, device=device
    )


def denoiser_loss(
    unet: nn.Module,
    scheduler: TrainingSchedule,
    latents: Tensor,
    context: Tensor,
    generator: torch.Generator | None = None,
    *,
    snr_gamma: float | None = None,
) -> Tensor:
    """The simplified diffusion loss ``E_{t, eps} || target - model(x_t, t, c) ||^2``.

    Ho et al. 2020, eq. 14, with ``t`` uniform over the training timesteps and ``x_t`` from
    ``scheduler.add_noise`` (eq. 4); the target is ``scheduler.training_target``: the noise
    for ``epsilon`` models (eq. 14 itself), ``x0`` for ``sample``, and ``v`` for
    ``v_prediction`` (Salimans & Ho 2022, sec. 4). With ``context`` the text embedding this is
    Rombach et al. 2022, eq. 2. ``latents`` are scaled (as `AutoencoderKL.encode` gives them);
    the noise and ``t`` are drawn with ``generator``, which must live on their device.

    With ``snr_gamma`` each item's error is weighted by Min-SNR-gamma (Hang et al. 2023,
    eq. 9 and its table for other targets): ``min(SNR_t, gamma) / SNR_t`` for epsilon,
    ``min(SNR_t, gamma) / (SNR_t + 1)`` for v and ``min(SNR_t, gamma)`` for x0, with
    ``SNR_t = alpha_bar_t / (1 - alpha_bar_t)``. This stops the many easy low-noise steps
    from dominating the gradient; the paper measures about 3x faster convergence at gamma=5.
    """
    if snr_gamma is not None and not snr_gamma > 0:
        raise InvalidArgumentError(f"snr_gamma must be > 0, got {snr_gamma}")
    if latents.ndim != 4:
        raise InvalidArgumentError(f"latents must be (B, C, h, w), got {tuple(latents.shape)}")
    if context.shape[0] != latents.shape[0]:
        raise InvalidArgumentError(
            f"context has {context.shape[0]} items but latents have {latents.shape[0]}"
        )
    t = sample_timesteps(scheduler, latents.shape[0], generator=generator, device=latents.device)
    noise = torch.randn(
        latents.shape, generator=generator, device=latents.device, dtype=latents.dtype
    )
    noisy = scheduler.add_noise(latents, noise, t)
    target = scheduler.training_target(latents, noise, t)
    prediction = unet(noisy, t, context)
    if not isinstance(prediction, Tensor):
        raise InvalidArgumentError(
            f"the denoiser returned {type(prediction).__name__}, not a tensor"
        )
    if snr_gamma is None:
        return F.mse_loss(prediction.float(), target.float())
    error = (prediction.float() - target.float()).square().flatten(1).mean(dim=1)
    alpha_bar = scheduler.alphas_cumprod.to(latents.device)[t].double()
    snr = alpha_bar / (1 - alpha_bar)
    clipped = snr.clamp(max=snr_gamma)
    weight = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1)}.get(
        scheduler.prediction_type, clipped
    )
    return (weight.float() * error).mean()


def contrastive_loss(
    image_features: Tensor,
    text_features: Tensor,
    positives: Tensor,
    *,
    logit_scale: Tensor | float,
) -> Tensor:
    """CLIP's contrastive objective (Radford et al. 2021, fig. 3) from the image side, where
    an image may have several right captions.

    Both feature sets are L2-normalised; ``logits = logit_scale * I @ T^T``. For image ``i``
    with right captions ``P_i`` (``positives[i]``, a (B, N) boolean matrix) the loss is
    ``-log sum_{j in P_i} softmax(logits_i)_j``: the captions that describe the image
    share the probability, the rest are negatives. With one positive per row and the captions
    of the batch as ``text_features`` this is CLIP's image-to-text cross-entropy.
    """
    if image_features.ndim != 2 or text_features.ndim != 2:
        raise InvalidArgumentError("image_features and text_features must be (B, D) and (N, D)")
    if positives.shape != (image_features.shape[0], text_features.shape[0]):
        raise InvalidArgumentError(
            f"positives must be (B, N) = {(image_features.shape[0], text_features.shape[0])}, "
            f"got {tuple(positives.shape)}"
        )
    if not bool(positives.any(dim=1).all()):
        raise InvalidArgumentError("every image needs at least one positive caption")
    image = F.normalize(image_features.float(), dim=-1)
    text = F.normalize(text_features.float(), dim=-1)
    logits = logit_scale * image @ text.T
    right = logits.masked_fill(~positives, float("-inf")).logsumexp(dim=1)
    return (logits.logsumexp(dim=1) - right).mean()


def drop_context(
    context: Tensor,
    empty: Tensor,
    *,
    p_uncond: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``context`` with each item replaced, with probability ``p_uncond``, by ``empty`` (the
    embedding of the empty prompt), so one network also learns the unconditional model that
    classifier-free guidance needs (Ho & Salimans 2022, sec. 3.2 and Algorithm 1).

    ``empty`` is (tokens, D) or (1, tokens, D); ``context`` is (B, tokens, D). The draws use
    ``generator`` (on ``context``'s device).
    """
    if not 0.0 <= p_uncond <= 1.0:
        raise InvalidArgumentError(f"p_uncond must be in [0, 1], got {p_uncond}")
    if empty.ndim == context.ndim - 1:
        empty = empty[None]
    if empty.shape[0] != 1 or empty.shape[1:] != context.shape[1:]:
        raise InvalidArgumentError(
            f"empty has shape {tuple(empty.shape)}; it must be one item shaped like "
            f"context's {tuple(context.shape[1:])}"
        )
    drop = torch.rand(context.shape[0], generator=generator, device=context.device) < p_uncond
    drop = drop.reshape((-1,) + (1,) * (context.ndim - 1))
    return torch.where(drop, empty.to(dtype=context.dtype, device=context.device), context)

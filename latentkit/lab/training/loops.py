"""Minimal training loops for the autoencoder, the denoiser and a ControlNet, seeded and with
a loss log.

Each loop is AdamW on the module's trainable parameters, one loss per step; the losses are
`latentkit.lab.training.losses`. All randomness the loop draws (posterior samples, noise,
timesteps, guidance dropout) comes from one generator seeded with ``seed``, and torch's
global generator (used by dropout layers) is seeded for the loop and restored after, so
the same seed, data and initial weights give the same losses on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import Tensor, nn

from latentkit.errors import InvalidArgumentError
from latentkit.lab.training.ema import EMA
from latentkit.lab.training.losses import (
    Reconstruction,
    TrainingSchedule,
    autoencoder_loss,
    denoiser_loss,
    drop_context,
)
from latentkit.models.autoencoder import AutoencoderKL
from latentkit.models.controlnet import ControlNet
from latentkit.models.unet import UNet2DCondition

T = TypeVar("T")

LossLog = list[tuple[int, float]]
"""``(step, loss)`` per step, steps counted from 1."""
LossCallback = Callable[[int, float], None]
"""Called as ``callback(step, loss)`` after each optimiser step."""


def forever(batches: Iterable[T]) -> Iterator[T]:
    """``batches`` over and over (a list or a DataLoader restarts; a one-shot iterator that
    runs out raises `InvalidArgumentError`)."""
    while True:
        count = 0
        for batch in batches:
            count += 1
            yield batch
        if count == 0:
            raise InvalidArgumentError(
                "batches ran out: pass a re-iterable (a list, a DataLoader) or at least "
                "`steps` batches"
            )


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[torch.Generator]:
    # A private generator for the loop's draws, and the global RNG seeded for dropout layers.
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(seed)
        yield torch.Generator(device).manual_seed(seed)


def _trainable(module: nn.Module, what: str) -> list[nn.Parameter]:
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise InvalidArgumentError(
            f"the {what} has no trainable parameters (call .requires_grad_(True); "
            "latentkit.load_pipeline returns frozen modules)"
        )
    return params


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidArgumentError(f"steps must be a positive int, got {steps!r}")


def _run(
    module: nn.Module,
    loss_fn: Callable[[int], Tensor],
    *,
    steps: int,
    lr: float,
    weight_decay: float,
    max_grad_norm: float | None,
    ema: EMA | None,
    progress: bool,
    callback: LossCallback | None,
    description: str,
) -> LossLog:
    from tqdm.auto import tqdm

    params = _trainable(module, description)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    log: LossLog = []
    was_training = module.training
    module.train()
    try:
        with tqdm(total=steps, desc=f"training {description}", disable=not progress) as bar:
            for step in range(1, steps + 1):
                loss = loss_fn(step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
                if ema is not None:
                    ema.update(module)
                value = float(loss.detach())
                log.append((step, value))
                if callback is not None:
                    callback(step, value)
                bar.set_postfix(loss=f"{value:.4f}", refresh=False)
                bar.update()
    finally:
        module.train(was_training)
    return log


def train_autoencoder(
    vae: AutoencoderKL,
    batches: Iterable[Tensor],
    *,
    steps: int,
    lr: float = 1e-3,
    kl_weight: float = 1e-6,
    reconstruction: Reconstruction = "l1",
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    seed: int = 0,
    progress: bool = True,
    callback: LossCallback | None = None,
) -> LossLog:
    """Train ``vae`` in place on image ``batches`` (B, 3, H, W) in [-1, 1] for ``steps``
    steps of `autoencoder_loss` (Rombach et al. 2022, sec. 3.1); returns ``(step, total)``.

    Batches are moved to the VAE's device; the list or DataLoader restarts when it runs out.
    """
    _check_steps(steps)
    device = _device(vae)
    data = forever(batches)
    with _seeded(seed, device) as generator:

        def loss(step: int) -> Tensor:
            images = next(data).to(device=device, dtype=next(vae.parameters()).dtype)
            terms = autoencoder_loss(
                vae,
                images,
                kl_weight=kl_weight,
                reconstruction=reconstruction,
                generator=generator,
            )
            return terms.total

        return _run(
            vae,
            loss,
            steps=steps,
            lr=lr,
            weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
            ema=None,
            progress=progress,
            callback=callback,
            description="autoencoder",
        )


def train_denoiser(
    unet: nn.Module,
    scheduler: TrainingSchedule,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    steps: int,
    lr: float = 1e-4,
    empty_context: Tensor | None = None,
    p_uncond: float = 0.1,
    ema: EMA | None = None,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    snr_gamma: float | None = None,
    seed: int = 0,
    progress: bool = True,
    callback: LossCallback | None = None,
) -> LossLog:
    """Train ``unet`` in place on ``(latents, context)`` batches for ``steps`` steps of
    `denoiser_loss` (Ho et al. 2020, eq. 14, with ``scheduler``'s prediction type); returns
    ``(step, loss)``.

    ``latents`` are scaled VAE latents (B, C, h, w), ``context`` the text encoder's hidden
    states (B, tokens, D). With ``empty_context`` (the empty prompt's hidden states), a
    fraction ``p_uncond`` of the contexts is replaced by it each step, for classifier-free
    guidance (Ho & Salimans 2022); without it no context is dropped. ``ema``, if given, is
    updated after every step. ``snr_gamma`` turns on Min-SNR weighting (see `denoiser_loss`).
    """
    _check_steps(steps)
    device = _device(unet)
    dtype = next(unet.parameters()).dtype
    data = forever(batches)
    with _seeded(seed, device) as generator:

        def loss(step: int) -> Tensor:
            latents, context = next(data)
            latents = latents.to(device=device, dtype=dtype)
            context = context.to(device=device, dtype=dtype)
            if empty_context is not None:
                context = drop_context(
                    context, empty_context, p_uncond=p_uncond, generator=generator
                )
            return denoiser_loss(unet, scheduler, latents, context, generator, snr_gamma=snr_gamma)

        return _run(
            unet,
            loss,
            steps=steps,
            lr=lr,
            weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
            ema=ema,
            progress=progress,
            callback=callback,
            description="denoiser",
        )


class _Controlled(nn.Module):
    """The frozen UNet steered by a ControlNet reading ``image``, called as `denoiser_loss`
    calls a denoiser: ``(sample, timestep, context) -> prediction``."""

    def __init__(self, unet: UNet2DCondition, controlnet: ControlNet, image: Tensor) -> None:
        super().__init__()
        self.unet, self.controlnet, self.image = unet, controlnet, image

    def forward(self, sample: Tensor, timestep: Tensor, context: Tensor) -> Tensor:
        control = self.controlnet(sample, timestep, context, self.image)
        prediction: Tensor = self.unet(sample, timestep, context, control=control)
        return prediction


def train_controlnet(
    controlnet: ControlNet,
    unet: UNet2DCondition,
    scheduler: TrainingSchedule,
    batches: Iterable[tuple[Tensor, Tensor, Tensor]],
    *,
    steps: int,
    lr: float = 1e-4,
    empty_context: Tensor | None = None,
    p_uncond: float = 0.1,
    ema: EMA | None = None,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    snr_gamma: float | None = None,
    seed: int = 0,
    progress: bool = True,
    callback: LossCallback | None = None,
) -> LossLog:
    """Train ``controlnet`` in place for the frozen ``unet`` on ``(latents, context,
    control)`` batches for ``steps`` steps; returns ``(step, loss)``.

    The objective is the UNet's own (`denoiser_loss`: Ho et al. 2020, eq. 14, with
    ``scheduler``'s prediction type), with the ControlNet's residuals added to the UNet's
    skip connections and middle block: Zhang et al. 2023, eq. 5, ``E || target -
    model(x_t, t, c_t, c_f) ||^2`` with ``c_f`` the control image. Only the ControlNet
    learns; gradients pass through the UNet, whose weights must be frozen (those of
    `latentkit.load_pipeline` are). Start from `ControlNet.from_unet`, whose zero
    convolutions make the first steps the UNet's own predictions.

    ``latents`` are scaled VAE latents (B, C, h, w), ``context`` the text encoder's hidden
    states (B, tokens, D), ``control`` the control images (B, channels, H, W) in [0, 1] at
    the images' size. ``empty_context``, ``p_uncond``, ``ema``, ``snr_gamma`` and ``seed``
    are as for `train_denoiser` (the paper replaces half the prompts with the empty one, so
    that the ControlNet learns to read the control image without them: ``p_uncond=0.5``).

    Raises `InvalidArgumentError`, before any step, for a UNet with trainable parameters.
    """
    _check_steps(steps)
    if any(p.requires_grad for p in unet.parameters()):
        raise InvalidArgumentError(
            "train_controlnet trains the ControlNet for a frozen UNet; freeze it first with "
            "unet.requires_grad_(False)"
        )
    device = _device(controlnet)
    dtype = next(controlnet.parameters()).dtype
    data = forever(batches)
    with _seeded(seed, device) as generator:

        def loss(step: int) -> Tensor:
            latents, context, control = next(data)
            latents = latents.to(device=device, dtype=dtype)
            context = context.to(device=device, dtype=dtype)
            control = control.to(device=device, dtype=dtype)
            if empty_context is not None:
                context = drop_context(
                    context, empty_context, p_uncond=p_uncond, generator=generator
                )
            model = _Controlled(unet, controlnet, control)
            return denoiser_loss(model, scheduler, latents, context, generator, snr_gamma=snr_gamma)

        return _run(
            controlnet,
            loss,
            steps=steps,
            lr=lr,
            weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
            ema=ema,
            progress=progress,
            callback=callback,
            description="ControlNet",
        )

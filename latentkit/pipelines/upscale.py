"""The Stable Diffusion x4 upscaler (``stabilityai/stable-diffusion-x4-upscaler``): a
text-guided latent diffusion super-resolution model (Rombach et al. 2022, sec. 4.4).

What it declares on top of the shared loop: ``image=`` is the low-resolution input, not a
picture to start from. It is noised by its own DDPM schedule (``low_res_scheduler``) to
``noise_level`` and concatenated to the latents as 3 extra UNet channels (7 in all), and
``noise_level`` is also the UNet's class label (an embedding added to the time embedding).
The latents have the input's size; the autoencoder (3 levels, ``scaling_factor`` 0.08333)
decodes them 4x larger. Text comes from OpenCLIP-H's last layer as in SD 2, and
diffusers' defaults apply: 75 steps, guidance 9, ``noise_level`` 20.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from latentkit import images, schedulers
from latentkit.errors import InvalidArgumentError, UnsupportedModelError
from latentkit.noise import randn
from latentkit.pipelines import register, tasks
from latentkit.pipelines.family import Family
from latentkit.request import is_int

if TYPE_CHECKING:
    from latentkit.pipelines.base import LatentDiffusion
    from latentkit.request import Request

MAX_NOISE_LEVEL = 350
"""diffusers' ``max_noise_level`` when ``model_index.json`` does not give one."""


@register("stable-diffusion-upscale")
class StableDiffusionUpscaleFamily(Family):
    """The x4 upscaler: ``generate(prompt, image=low_res, noise_level=20)`` returns the image
    4x larger (with ``Performance(vae_tiling=True, unet_tiling=True)``, in tiles)."""

    pipeline_classes: ClassVar[tuple[str, ...]] = ("StableDiffusionUpscalePipeline",)
    options: ClassVar[frozenset[str]] = frozenset({"noise_level"})
    guidance_scale: ClassVar[float] = 9.0
    steps: ClassVar[int] = 75
    # diffusers decodes in float32 when the VAE is half precision and says force_upcast.
    upcast_vae: ClassVar[bool] = True
    image_conditions: ClassVar[bool] = True
    extra_configs: ClassVar[tuple[str, ...]] = ("low_res_scheduler",)

    @classmethod
    def accepts(cls, unet_config: Mapping[str, Any]) -> bool:
        return unet_config.get("num_class_embeds") is not None

    @classmethod
    def check(cls, pipe: LatentDiffusion, request: Request) -> None:
        if request.image is None:
            raise InvalidArgumentError(
                f"{pipe.name} is an upscaler: pass image= (the low-resolution picture)"
            )
        limit = _max_noise_level(pipe)
        if request.noise_level > limit:
            raise InvalidArgumentError(
                f"noise_level must be at most {limit} (max_noise_level in {pipe.name}'s "
                f"model_index.json), got {request.noise_level}"
            )
        extra = pipe.unet.config.in_channels - pipe.vae.latent_channels
        if extra != 3:
            raise UnsupportedModelError(
                f"{pipe.name}: the UNet reads {pipe.unet.config.in_channels} channels; an x4 "
                f"upscaler's reads the {pipe.vae.latent_channels} latent ones and 3 of the "
                "low-resolution picture"
            )
        for name in ("height", "width"):
            if getattr(request, name) is not None:
                raise InvalidArgumentError(
                    f"{name} does not go with an upscaler: the output is "
                    f"{pipe.vae.scale_factor}x the input image; resize the input instead"
                )

    @classmethod
    def size(cls, pipe: LatentDiffusion, request: Request) -> tuple[int, int]:
        """The input's size rounded down to the autoencoder factor (as diffusers'
        preprocessing does), times that factor: latents at the input's size decode this big."""
        h, w = _input_size(pipe, request)
        return h * pipe.vae.scale_factor, w * pipe.vae.scale_factor

    @classmethod
    def concat(
        cls,
        pipe: LatentDiffusion,
        request: Request,
        *,
        latent_size: tuple[int, int],
        generator: torch.Generator | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """The input in [-1, 1], noised to ``noise_level`` by the low-resolution schedule:
        ``sqrt(abar_t) x + sqrt(1 - abar_t) eps`` (Ho et al. 2020, eq. 4), the noise drawn
        before the latents' as diffusers draws it."""
        assert request.image is not None
        size = _input_size(pipe, request)
        if size != latent_size:
            raise InvalidArgumentError(
                f"the input is {size[0]}x{size[1]} but the latents are "
                f"{latent_size[0]}x{latent_size[1]}"
            )
        picture = images.open_image(request.image, "image")
        pixels = images.image_tensor(picture, size).to(device=device, dtype=dtype)
        noise = randn(pixels.shape, generator=generator, device=device, dtype=dtype)
        low_res = schedulers.from_config(dict(pipe.component_configs["low_res_scheduler"]))
        add_noise = getattr(low_res, "add_noise", None)
        if add_noise is None:
            raise UnsupportedModelError(
                f"{pipe.name}: low_res_scheduler ({low_res.name}) has no DDPM noise table"
            )
        level = torch.tensor([request.noise_level], device=device)
        noised: torch.Tensor = add_noise(pixels, noise, level)
        return noised

    @classmethod
    def class_labels(cls, pipe: LatentDiffusion, request: Request) -> torch.Tensor:
        return torch.tensor([request.noise_level], dtype=torch.long)


def _input_size(pipe: LatentDiffusion, request: Request) -> tuple[int, int]:
    assert request.image is not None
    if tasks.given_latents(pipe, request.image) is not None:
        raise InvalidArgumentError(
            "an upscaler's image= is a picture (PIL, array, tensor (3, H, W) or path), not latents"
        )
    picture = images.open_image(request.image, "image")
    return images.target_size(picture, None, None, pipe.vae.scale_factor)


def _max_noise_level(pipe: LatentDiffusion) -> int:
    value = pipe.config.get("max_noise_level", MAX_NOISE_LEVEL)
    if not is_int(value) or value < 0:
        raise UnsupportedModelError(
            f"{pipe.name}: max_noise_level in model_index.json must be an int >= 0, got {value!r}"
        )
    schedule = pipe.component_configs.get("low_res_scheduler", {})
    trained = int(schedule.get("num_train_timesteps", 1000))
    classes = pipe.unet.config.num_class_embeds or trained
    # The level indexes both the DDPM table and the UNet's class embedding.
    return min(int(value), trained - 1, classes - 1)

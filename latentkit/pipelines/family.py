"""What a model family declares: the part of a pipeline that is not the shared loop.

A family (Stable Diffusion 1.x/2.x, SDXL, the x4 upscaler, a third party's) is a small class
of class attributes and a few hooks, each with a default that does nothing. `latentkit.pipelines.base.LatentDiffusion` runs every
family with one loop: request checks, prompt encoding, guidance, image tasks, sampling,
decoding. See docs/families.md for writing one.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from latentkit.conditioners.text import TextEmbeddings, TextLayer

if TYPE_CHECKING:
    from latentkit.pipelines.base import LatentDiffusion
    from latentkit.request import Request


class Family:
    """Declarations of one model family. Subclass it, set the class attributes, and register
    it with `latentkit.pipelines.register` (or the ``latentkit.pipelines`` entry-point group)."""

    name: ClassVar[str] = ""
    """The registered name (set by `latentkit.pipelines.register`)."""
    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    """``_class_name`` values of ``model_index.json`` that this family loads."""
    options: ClassVar[frozenset[str]] = frozenset()
    """`Request` fields only some families take (`latentkit.request.FAMILY_OPTIONS`) that
    this one accepts."""
    text_layer: ClassVar[TextLayer] = "last"
    """The text encoders' hidden states the UNet attends to."""
    clip_skip: ClassVar[int | None] = None
    """The ``clip_skip`` when the caller does not say (1 for models trained on the layer
    before ``text_layer``, as A1111's "Clip skip 2" models are)."""
    guidance_scale: ClassVar[float] = 7.5
    """The guidance scale when neither the caller nor the model says."""
    img2img_strength: ClassVar[float] = 0.8
    """The ``strength`` of image-to-image when the caller does not say."""
    inpaint_strength: ClassVar[float] = 1.0
    """The ``strength`` of inpainting when the caller does not say."""
    control_scales: ClassVar[Mapping[str, float]] = MappingProxyType(
        {"text-to-image": 1.0, "image-to-image": 0.8, "inpainting": 0.5}
    )
    """The ControlNet ``control_scale`` when the caller does not say, per task (diffusers'
    ``controlnet_conditioning_scale`` defaults of its ControlNet pipelines)."""
    upcast_vae: ClassVar[bool] = False
    """Run the autoencoder in float32 when the pipeline is half precision and the VAE config
    says ``force_upcast`` (SDXL's VAE overflows in fp16)."""
    steps: ClassVar[int] = 50
    """Denoising steps when neither the caller nor the model says (diffusers' defaults: 50;
    75 for the x4 upscaler)."""
    image_conditions: ClassVar[bool] = False
    """``image=`` is a condition the family reads in `concat` (the x4 upscaler's
    low-resolution input), not a picture to start from: sampling starts from noise, the
    output size is `size`'s, and ``strength``, ``mask_image``, ``outpaint`` are refused."""
    extra_configs: ClassVar[tuple[str, ...]] = ()
    """Config-only components the family reads (the upscaler's ``low_res_scheduler``),
    loaded into ``LatentDiffusion.component_configs`` by name."""

    @classmethod
    def accepts(cls, unet_config: Mapping[str, Any]) -> bool:
        """Whether a UNet with this diffusers config belongs to this family (tells families
        apart where ``model_index.json`` does not)."""
        return True

    @classmethod
    def check(cls, pipe: LatentDiffusion, request: Request) -> None:
        """Refuse a request this family cannot honour, before any work (the shared checks
        have run)."""

    @classmethod
    def size(cls, pipe: LatentDiffusion, request: Request) -> tuple[int, int] | None:
        """The output (height, width) in pixels when the family derives it from the request
        (the upscaler: 4x its input); None: the loop's rule (``height``/``width``, the input
        image's size, else the model's default)."""
        return None

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
    ) -> torch.Tensor | None:
        """Extra UNet input channels (1, C, h, w) at ``latent_size`` (h, w) that the family
        computes from the request, put after the latents (and after an inpainting or depth
        model's channels); None for none. Called before the starting noise is drawn, with
        the generator diffusers draws a single image's noise from."""
        return None

    @classmethod
    def class_labels(cls, pipe: LatentDiffusion, request: Request) -> torch.Tensor | None:
        """The class label (a (1,) int tensor) of a UNet with ``num_class_embeds``, the same
        for every row of the batch (the upscaler: its noise level); None for a UNet without."""
        return None

    @classmethod
    def vector(
        cls,
        pipe: LatentDiffusion,
        request: Request,
        text: TextEmbeddings,
        *,
        size: tuple[int, int],
        negative: bool,
    ) -> torch.Tensor | None:
        """The vector added to the UNet's time embedding (B, D) for the prompts' (or, with
        ``negative``, the negative prompts') embeddings ``text`` and output ``size`` (H, W);
        None for a family without vector conditioning."""
        return None

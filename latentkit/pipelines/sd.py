"""Stable Diffusion 1.x and 2.x (Rombach et al. 2022): one CLIP text encoder, its last
layer as the cross-attention context; inpainting (9 input channels) and depth (5) models too."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from latentkit.pipelines import register
from latentkit.pipelines.family import Family


@register("stable-diffusion")
class StableDiffusionFamily(Family):
    """SD 1.x/2.x: text-to-image, image-to-image, inpainting and depth-to-image models. Every
    default is the shared loop's; nothing is added to the time embedding."""

    pipeline_classes: ClassVar[tuple[str, ...]] = (
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionInpaintPipeline",
        "StableDiffusionDepth2ImgPipeline",
    )

    @classmethod
    def accepts(cls, unet_config: Mapping[str, Any]) -> bool:
        # Class labels (num_class_embeds) are the x4 upscaler's noise level: its family.
        return (
            unet_config.get("addition_embed_type") is None
            and unet_config.get("num_class_embeds") is None
        )

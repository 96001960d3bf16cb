"""Stable Diffusion XL (Podell et al. 2023): base, refiner and inpainting models.

What differs from SD 1.x/2.x, and all this file declares: two text encoders whose
penultimate layers are concatenated (CLIP ViT-L and OpenCLIP bigG, sec. 2.1), the pooled
bigG embedding and the size/crop micro-conditioning (sec. 2.2; the refiner: an aesthetic
score instead of the target size) added to the time embedding, a VAE run in float32 when the
rest is half precision, and diffusers' defaults for guidance and strength.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from latentkit.conditioners.size import SizeConditioner
from latentkit.conditioners.text import TextEmbeddings, TextLayer
from latentkit.errors import InvalidArgumentError, UnsupportedModelError
from latentkit.pipelines import register
from latentkit.pipelines.family import Family
from latentkit.request import FAMILY_OPTIONS

if TYPE_CHECKING:
    from latentkit.pipelines.base import LatentDiffusion
    from latentkit.request import Request


@register("stable-diffusion-xl")
class StableDiffusionXLFamily(Family):
    """SDXL base (``target_size`` conditioning) and refiner (``requires_aesthetics_score`` in
    ``model_index.json``: ``aesthetic_score`` instead), and their inpainting models."""

    pipeline_classes: ClassVar[tuple[str, ...]] = (
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionXLInpaintPipeline",
    )
    options: ClassVar[frozenset[str]] = FAMILY_OPTIONS - {"noise_level"}
    text_layer: ClassVar[TextLayer] = "penultimate"
    guidance_scale: ClassVar[float] = 5.0
    img2img_strength: ClassVar[float] = 0.3
    # diffusers' SDXL inpainting default: just under 1, so the picture seeds the start.
    inpaint_strength: ClassVar[float] = 0.9999
    control_scales: ClassVar[Mapping[str, float]] = MappingProxyType(
        {"text-to-image": 1.0, "image-to-image": 0.8, "inpainting": 1.0}
    )
    upcast_vae: ClassVar[bool] = True

    @classmethod
    def accepts(cls, unet_config: Mapping[str, Any]) -> bool:
        return unet_config.get("addition_embed_type") == "text_time"

    @classmethod
    def check(cls, pipe: LatentDiffusion, request: Request) -> None:
        refiner = _is_refiner(pipe)
        given = request.given()
        if refiner:
            for name in ("target_size", "negative_target_size"):
                if name in given:
                    raise InvalidArgumentError(
                        f"{name} does not condition {pipe.name}: it is a refiner, conditioned "
                        "on aesthetic_score instead (requires_aesthetics_score in model_index.json)"
                    )
        else:
            for name in ("aesthetic_score", "negative_aesthetic_score"):
                if name in given:
                    raise InvalidArgumentError(
                        f"{name} conditions SDXL refiners only; {pipe.name}'s UNet has no room "
                        "for it (model_index.json has no requires_aesthetics_score)"
                    )
        if request.prompt_embeds is not None and request.pooled_prompt_embeds is None:
            raise InvalidArgumentError("SDXL needs pooled_prompt_embeds with prompt_embeds")
        if (
            request.negative_prompt_embeds is not None
            and request.negative_pooled_prompt_embeds is None
        ):
            raise InvalidArgumentError(
                "SDXL needs negative_pooled_prompt_embeds with negative_prompt_embeds"
            )

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
        """``[pooled, emb(original_size), emb(crop), emb(target_size or aesthetic score)]``
        (sec. 2.2). The unconditional branch takes each ``negative_*`` value where given, else
        the conditional one's (the refiner's negative crop defaults to (0, 0), as in diffusers)."""
        refiner = _is_refiner(pipe)
        original = request.original_size or size
        target = request.target_size or size
        crop = request.crops_coords_top_left
        if negative:
            original = request.negative_original_size or original
            target = request.negative_target_size or target
            crop = request.negative_crops_coords_top_left or ((0, 0) if refiner else crop)
        last: tuple[float, ...] = (
            ((request.negative_aesthetic_score if negative else request.aesthetic_score),)
            if refiner
            else tuple(target)
        )
        ids = (*original, *crop, *last)
        config = pipe.unet.config
        dim = config.addition_time_embed_dim
        pooled = text.pooled
        if dim is None:
            raise UnsupportedModelError(
                f"{pipe.name}: the UNet config has no addition_time_embed_dim"
            )
        if pooled is None:
            raise UnsupportedModelError(
                f"{pipe.name}: SDXL's last text encoder must have a projection "
                "(CLIPTextModelWithProjection) for the pooled embedding"
            )
        expected = config.projection_class_embeddings_input_dim
        got = pooled.shape[-1] + len(ids) * dim
        if got != expected:
            raise UnsupportedModelError(
                f"{pipe.name}: the UNet expects a {expected}-wide added vector but the pooled "
                f"embedding and {len(ids)} size ids make {got}; check requires_aesthetics_score "
                "in model_index.json"
            )
        sizes = SizeConditioner(
            dim=dim,
            flip_sin_to_cos=config.flip_sin_to_cos,
            freq_shift=config.freq_shift,
        ).encode([ids] * pooled.shape[0], device=pooled.device, dtype=pooled.dtype)
        return torch.cat([pooled, sizes], dim=-1)


def _is_refiner(pipe: LatentDiffusion) -> bool:
    return bool(pipe.config.get("requires_aesthetics_score", False))

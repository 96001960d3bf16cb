"""What a model family declares: the part of a pipeline that is not the shared loop.

A family (Stable Diffusion 1.x/2.x, SDXL, a third party's) is a small class of class
attributes and at most three hooks. `latentkit.pipelines.base.LatentDiffusion` runs every
family with one loop: request checks, prompt encoding, guidance, image tasks, sampling,
decoding. See docs/families.md for writing one.
"""

from __future__ import annotations

from collections.abc import Mapping
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
    upcast_vae: ClassVar[bool] = False
    """Run the autoencoder in float32 when the pipeline is half precision and the VAE config
    says ``force_upcast`` (SDXL's VAE overflows in fp16)."""

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

"""An example latentkit pipeline family: SD 1.x models trained on CLIP's penultimate layer.

NovelAI's anime model and the many SD 1.x checkpoints fine-tuned from it were trained with
the text encoder's penultimate hidden states (through the final layer norm) as the
cross-attention context, not the last layer's; A1111 calls that "Clip skip 2" and diffusers
``clip_skip=1``. Run with the last layer, as Stable Diffusion's own models are, they give
worse images, and nothing in their files says so: the text encoder is the stock CLIP ViT-L.

This family declares that default. A model folder opts in by naming the family's pipeline
class in its ``model_index.json`` (``"_class_name": "StableDiffusionPenultimatePipeline"``);
everything else (the networks, the loop, image-to-image, inpainting, every scheduler) is the
Stable Diffusion family's. ``clip_skip=0`` in a call still selects the last layer.

Registered through the ``latentkit.pipelines`` entry-point group in ``pyproject.toml``;
nothing here calls ``latentkit.pipelines.register``. Once installed::

    latentkit.pipelines.names()          # [..., 'stable-diffusion-penultimate', ...]
    pipe = latentkit.load_pipeline("path/to/marked-model")
    pipe.family                          # 'stable-diffusion-penultimate'
"""

from __future__ import annotations

from typing import ClassVar

from latentkit.pipelines.sd import StableDiffusionFamily

PIPELINE_CLASS = "StableDiffusionPenultimatePipeline"
"""The ``_class_name`` a model folder's ``model_index.json`` carries to be loaded by this family."""


class PenultimateFamily(StableDiffusionFamily):
    """Stable Diffusion 1.x/2.x conditioned on the text encoder's penultimate layer by default.

    A subclass of the built-in family: it claims its own pipeline class instead of diffusers'
    Stable Diffusion ones, and changes one declaration. ``name`` must equal the entry point's
    name, since an entry point registers the class as it is (the ``register`` decorator would
    set it).
    """

    name: ClassVar[str] = "stable-diffusion-penultimate"
    pipeline_classes: ClassVar[tuple[str, ...]] = (PIPELINE_CLASS,)
    # The encoder's states one layer before the last, through its final layer norm: A1111's
    # "Clip skip 2", diffusers' clip_skip=1 (see latentkit's docs/prompts.md).
    clip_skip: ClassVar[int | None] = 1

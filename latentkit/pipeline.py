"""The Stable Diffusion pipeline: text → latents by guided denoising → pixels.

Rombach et al. 2022: the denoiser runs in the autoencoder's latent space (sec. 3.2) and
is steered by cross-attention to the text embeddings (sec. 3.3, eq. 3); classifier-free
guidance (Ho & Salimans 2022, eq. 6) mixes conditional and unconditional predictions.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from latentkit import images, schedulers
from latentkit.conditioners.depth import DepthConditioner, DepthInput
from latentkit.conditioners.mask import MaskConditioner, MaskedImage
from latentkit.conditioners.text import PromptTokens, TextConditioner
from latentkit.devices import resolve_device, resolve_dtype
from latentkit.errors import InvalidArgumentError
from latentkit.images import ImageInput
from latentkit.loading import ModelFiles, load_into, progress_bars, read_state_dict
from latentkit.noise import first_generator, randn
from latentkit.performance import Performance, Runtime
from latentkit.protocols import Callback, Generators, Scheduler, Seeds
from latentkit.results import (
    OUTPUT_TYPES,
    GenerationParameters,
    GenerationResult,
    OutputType,
    to_output,
)
from latentkit.saving import DEFAULTS_KEY, check_generation_defaults
from latentkit.tokenizer import CLIPTokenizer

if TYPE_CHECKING:
    from latentkit.models.autoencoder import AutoencoderKL
    from latentkit.models.unet import UNet2DCondition


logger = logging.getLogger("latentkit")

DEFAULT_STEPS = 50
"""Denoising steps when neither the caller nor the model says (diffusers' default)."""
DEFAULT_GUIDANCE = 7.5
"""Classifier-free guidance scale when neither the caller nor the model says (diffusers')."""


@dataclass(frozen=True)
class ImageInputs:
    """The image inputs of one call, read and resized (see `latentkit.images`)."""

    pixels: torch.Tensor | None
    """(1, 3, H, W) in [-1, 1]; None when only a depth map is given."""
    mask: torch.Tensor | None
    """(1, 1, H, W): 1 where the image is repainted, 0 where it is kept."""
    strength: float
    """How much of the noise schedule runs: 1 starts from pure noise, 0 returns the input."""
    size: tuple[int, int]
    """(H, W) of the output, in pixels."""
    picture: Any = None
    """The picture as given (PIL, array or tensor), for the depth estimator."""
    depth_map: torch.Tensor | None = None
    """A given depth map (1, H, W)."""

    @property
    def from_noise(self) -> bool:
        """Sampling starts from pure noise: depth-only text-to-image, or inpainting at full
        strength (image-to-image always starts from the noised picture)."""
        return self.pixels is None or (self.mask is not None and self.strength == 1.0)


@dataclass(frozen=True)
class StableDiffusion:
    """A loaded Stable Diffusion 1.x/2.x model. Immutable: `with_scheduler` returns a
    new pipeline sharing the same weights, so one pipeline serves several threads."""

    unet: UNet2DCondition
    vae: AutoencoderKL
    text: TextConditioner
    scheduler: Scheduler
    scheduler_config: dict[str, Any]
    """The model's own ``scheduler_config.json``; swapping schedulers carries its fields over."""
    device: torch.device
    dtype: torch.dtype
    name: str
    depth: DepthConditioner | None = None
    """Depth conditioning with the repo's own estimator, for depth-to-image models."""
    runtime: Runtime | None = None
    """How the networks run (`latentkit.Performance`); None: the plain path."""
    defaults: dict[str, float] = dataclasses.field(default_factory=dict)
    """The model's recommended ``steps`` / ``guidance_scale`` (``_latentkit_defaults`` in
    ``model_index.json``), used when `generate` is not given them."""

    def __post_init__(self) -> None:
        if self.runtime is None:
            runtime = Runtime(Performance(), self.device)
            runtime.prepare(self.unet, self.vae)
            object.__setattr__(self, "runtime", runtime)

    @property
    def performance(self) -> Performance:
        """The speed and memory options this pipeline was loaded with."""
        assert self.runtime is not None
        return self.runtime.performance

    @classmethod
    def from_files(
        cls,
        files: ModelFiles,
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        progress: bool = True,
        performance: Performance | None = None,
    ) -> StableDiffusion:
        """Build the pipeline from resolved model files (see `latentkit.load_pipeline`)."""
        from tqdm.auto import tqdm

        from latentkit.models.autoencoder import (
            AutoencoderKL,
            AutoencoderKLConfig,
            rename_legacy_key,
        )
        from latentkit.models.text_encoder import (
            CLIPTextConfig,
            CLIPTextEncoder,
            rename_checkpoint_key,
        )
        from latentkit.models.unet import UNet2DCondition, UNetConfig

        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        runtime = Runtime(performance or Performance(), dev)
        runtime.check()
        home = runtime.storage_device  # the CPU when offloading, else the device
        scheduler_config = files.config("scheduler")
        # Like diffusers, the class named in model_index.json wins over the config's own.
        listed = files.model_index().get("scheduler")
        if isinstance(listed, list) and len(listed) == 2 and isinstance(listed[1], str):
            scheduler_config = {**scheduler_config, "_class_name": listed[1]}
        scheduler = schedulers.from_config(scheduler_config)
        # diffusers' StableDiffusionPipeline corrects outdated scheduler configs when it loads
        # them (steps_offset 1, clip_sample off); so do we, so a model gives the same images.
        fixes: dict[str, Any] = {}
        if getattr(scheduler, "steps_offset", 1) != 1:
            fixes["steps_offset"] = 1
        if getattr(scheduler, "clip_sample", False) is True:
            fixes["clip_sample"] = False
        if fixes:
            logger.warning(
                "%s: outdated scheduler config, using %s as diffusers does", files.name, fixes
            )
            scheduler_config = {**scheduler_config, **fixes}
            scheduler = schedulers.from_config(scheduler_config)
        unet_config = UNetConfig.from_dict(files.config("unet"))
        vae_config = AutoencoderKLConfig.from_dict(files.config("vae"))
        text_config = CLIPTextConfig.from_dict(files.config("text_encoder"))

        bar = tqdm(total=4, desc=f"loading {files.name}", disable=not progress, leave=False)
        # transformers is imported only for a depth model's estimator.
        depth_model = "depth_estimator" in files.weights
        with bar, progress_bars(progress, transformers=depth_model):
            with torch.device("meta"):
                # Built on the meta device: no memory, no random init; the weights are assigned.
                unet = UNet2DCondition(unet_config)
                vae = AutoencoderKL(vae_config)
                text_encoder = CLIPTextEncoder(text_config)
            load_into(
                unet, read_state_dict(files.weights["unet"], device=home, dtype=dt), name="unet"
            )
            bar.update()
            renamed = read_state_dict(
                files.weights["vae"], device=home, dtype=dt, rename=rename_legacy_key
            )
            load_into(vae, renamed, name="vae")
            bar.update()
            renamed = read_state_dict(
                files.weights["text_encoder"], device=home, dtype=dt, rename=rename_checkpoint_key
            )
            load_into(text_encoder, renamed, name="text_encoder")
            bar.update()
            # latentkit's own CLIP tokenizer: the same ids as transformers', without
            # importing transformers (most of a small model's load time).
            tokenizer = CLIPTokenizer.from_pretrained(files.root / "tokenizer")
            bar.update()
            depth = None
            if depth_model:
                depth = _load_depth_estimator(files, home, dt)
            runtime.prepare(unet, vae)
        return cls(
            unet=unet,
            vae=vae,
            text=TextConditioner(tokenizer=tokenizer, text_encoder=text_encoder),
            scheduler=scheduler,
            scheduler_config=scheduler_config,
            device=dev,
            dtype=dt,
            name=files.name,
            depth=depth,
            runtime=runtime,
            defaults=check_generation_defaults(files.model_index().get(DEFAULTS_KEY, {})),
        )

    def with_scheduler(self, scheduler: str | Scheduler, /, **options: Any) -> StableDiffusion:
        """This pipeline with another scheduler (a name, an alias or a scheduler object).

        A name carries over the fields of the model's own scheduler config, as diffusers'
        ``from_config`` does, so the swap gives the same images in both libraries; so does
        an object from `latentkit.schedulers.create` for the options its caller left unset.
        """
        return dataclasses.replace(self, scheduler=self.resolve_scheduler(scheduler, **options))

    def resolve_scheduler(self, scheduler: str | Scheduler | None, /, **options: Any) -> Scheduler:
        if scheduler is None:
            if options:
                return schedulers.create(
                    self.scheduler.name, config=self.scheduler.to_config(), **options
                )
            return self.scheduler
        if isinstance(scheduler, str):
            return schedulers.create(scheduler, config=self.scheduler_config, **options)
        if not isinstance(scheduler, Scheduler):
            raise InvalidArgumentError(
                f"scheduler must be a name or a Scheduler object, not {type(scheduler).__name__}"
            )
        if options:
            raise InvalidArgumentError("scheduler options go with a scheduler name, not an object")
        return schedulers.for_model(scheduler, self.scheduler_config)

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) in pixels the UNet was trained at (``sample_size`` latents)."""
        size = self.unet.config.sample_size or 64  # Stable Diffusion 1.x: 64 latents, 512 px
        h, w = (size, size) if isinstance(size, int) else size
        return h * self.vae.scale_factor, w * self.vae.scale_factor

    def _image_inputs(
        self,
        image: ImageInput | None,
        mask_image: ImageInput | None,
        strength: float | None,
        depth_map: ImageInput | None,
        height: int | None,
        width: int | None,
    ) -> ImageInputs | None:
        """Read and check the image inputs (cheap: before any network runs)."""
        channels = self.unet.config.in_channels
        kind = {9: "an inpainting model", 5: "a depth-to-image model"}.get(channels, "")
        if depth_map is not None and channels != 5:
            raise InvalidArgumentError(
                f"depth_map needs a depth-to-image model (in_channels=5); {self.name} has "
                f"in_channels={channels}"
            )
        if mask_image is not None and channels == 5:
            raise InvalidArgumentError(
                f"{self.name} is a depth-to-image model (in_channels=5): it cannot inpaint"
            )
        if image is None and mask_image is not None:
            raise InvalidArgumentError("mask_image needs image= (the picture to inpaint)")
        if image is None and strength is not None:
            raise InvalidArgumentError(
                "strength applies to image-to-image and inpainting: pass image="
            )
        if channels == 9 and (image is None or mask_image is None):
            raise InvalidArgumentError(
                f"{self.name} is {kind} (in_channels=9): pass image= and mask_image="
            )
        if channels == 5 and image is None and depth_map is None:
            raise InvalidArgumentError(
                f"{self.name} is {kind} (in_channels=5): pass image= or depth_map="
            )
        if channels == 5 and image is not None and depth_map is None and self.depth is None:
            raise InvalidArgumentError(f"{self.name} has no depth estimator: pass depth_map=")
        if image is None and depth_map is None:
            return None
        default = 0.8 if mask_image is None else 1.0
        strength = default if strength is None else strength
        if not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
            raise InvalidArgumentError(f"strength must be in [0, 1], got {strength!r}")
        for label, value in (("height", height), ("width", width)):
            if value is not None:
                _check_size(label, value, self.vae.scale_factor)
        picture = None if image is None else images.open_image(image, "image")
        depth = None if depth_map is None else images.open_image(depth_map, "depth_map")
        source = picture if picture is not None else depth
        assert source is not None
        if picture is None and (height is not None or width is not None):
            size = (height or self.default_size[0], width or self.default_size[1])
        else:
            size = images.target_size(source, height, width, self.vae.scale_factor)
        mask = None
        if mask_image is not None:
            mask = images.mask_tensor(images.open_image(mask_image, "mask_image"), size)
        return ImageInputs(
            pixels=None if picture is None else images.image_tensor(picture, size),
            mask=mask,
            strength=float(strength),
            size=size,
            picture=picture,
            depth_map=None if depth is None else images.depth_tensor(depth),
        )

    def _image_latents(
        self, inputs: ImageInputs, shape: tuple[int, int, int, int], generators: Generators
    ) -> tuple[
        torch.Tensor,
        torch.Tensor | None,
        torch.Tensor | None,
        tuple[torch.Tensor, torch.Tensor] | None,
    ]:
        """Noise, clean latents to start from, extra UNet channels and the inpainting blend.

        The generator is drawn from in diffusers' order (picture latents, noise, masked
        picture latents), so a seed gives diffusers' image for the same task.
        """
        batch = shape[0]
        channels = self.unet.config.in_channels
        known = None
        if inputs.pixels is not None and not (channels == 9 and inputs.from_noise):
            pixels = inputs.pixels.to(device=self.device, dtype=self.dtype)
            if inputs.mask is None and isinstance(generators, list):
                pixels = pixels.repeat(
                    batch, 1, 1, 1
                )  # image-to-image encodes a copy per generator
            known = self._encode(pixels, generators)
            known = known.repeat(batch // known.shape[0], 1, 1, 1)
        noise = randn(shape, generator=generators, device=self.device, dtype=self.dtype)
        init = None if inputs.from_noise else known
        extra = None
        if channels == 5:
            depth = self.depth or DepthConditioner()
            request = DepthInput(
                latent_size=shape[-2:], depth_map=inputs.depth_map, picture=inputs.picture
            )
            extra = depth.encode(request, device=self.device, dtype=self.dtype)
        if inputs.mask is None or inputs.pixels is None:
            return noise, init, None if extra is None else extra.repeat(batch, 1, 1, 1), None
        masked = MaskedImage(pixels=inputs.pixels, mask=inputs.mask)
        if channels == 9:
            extra = MaskConditioner(autoencoder=self.vae).encode(
                masked, device=self.device, dtype=self.dtype, generator=generators
            )
            return noise, init, extra.repeat(batch, 1, 1, 1), None
        # A 4-channel model repaints by blending; diffusers still samples the masked
        # picture's latents here, so draw the same noise to keep a seed's later draws equal.
        randn(
            (1, *shape[1:]),
            generator=first_generator(generators),
            device=self.device,
            dtype=self.dtype,
        )
        mask = F.interpolate(inputs.mask, size=shape[-2:]).to(device=self.device, dtype=self.dtype)
        assert known is not None
        return noise, init, None, (mask.repeat(batch, 1, 1, 1), known)

    def _encode(self, pixels: torch.Tensor, generators: Generators) -> torch.Tensor:
        """Scaled latents of ``pixels``, sampled from the posterior as diffusers does: one
        image per generator when there is a list of them."""
        assert self.runtime is not None
        tiling = self.runtime.tiling
        if isinstance(generators, Sequence):
            return torch.cat(
                [
                    self.vae.encode(pixels[i : i + 1], generator=generators[i], tiling=tiling)
                    for i in range(pixels.shape[0])
                ]
            )
        return self.vae.encode(pixels, generator=generators, tiling=tiling)

    def _check_prompts(
        self,
        prompt: str | Sequence[str] | None,
        negative_prompt: str | Sequence[str] | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        guided: bool,
    ) -> tuple[list[str], list[str]]:
        """The prompts and negative prompts (one each per batch item), checked against any
        precomputed embeddings; empty strings stand for embeddings given directly."""
        if (prompt is None) == (prompt_embeds is None):
            raise InvalidArgumentError("pass either prompt or prompt_embeds (exactly one)")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise InvalidArgumentError("pass negative_prompt or negative_prompt_embeds, not both")
        for label, embeds in (
            ("prompt_embeds", prompt_embeds),
            ("negative_prompt_embeds", negative_prompt_embeds),
        ):
            if embeds is not None and (
                embeds.ndim != 3 or embeds.shape[-1] != self.unet.config.cross_attention_dim
            ):
                raise InvalidArgumentError(
                    f"{label} must have shape (batch, tokens, {self.unet.config.cross_attention_dim}), "
                    f"got {tuple(embeds.shape)}"
                )
        if prompt_embeds is not None:
            prompts = [""] * prompt_embeds.shape[0]
            if (
                negative_prompt_embeds is not None
                and negative_prompt_embeds.shape != prompt_embeds.shape
            ):
                raise InvalidArgumentError(
                    f"negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} must match "
                    f"prompt_embeds {tuple(prompt_embeds.shape)}"
                )
            if (
                guided
                and negative_prompt_embeds is None
                and prompt_embeds.shape[1] % self.text.window
            ):
                raise InvalidArgumentError(
                    f"prompt_embeds have {prompt_embeds.shape[1]} tokens, not a multiple of "
                    f"{self.text.window}: pass negative_prompt_embeds of the same shape"
                )
        else:
            prompts = _as_prompts(prompt, "prompt")  # type: ignore[arg-type]
        negatives = _as_prompts(
            "" if negative_prompt is None else negative_prompt, "negative_prompt"
        )
        if len(negatives) == 1 and len(prompts) > 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise InvalidArgumentError(
                f"got {len(negatives)} negative prompts for {len(prompts)} prompts; give one or one each"
            )
        return prompts, negatives

    def _text_context(
        self,
        prompts: list[str],
        negatives: list[str],
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        guided: bool,
        clip_skip: int | None,
    ) -> torch.Tensor:
        """Cross-attention context: [negatives; prompts] when guided, else the prompts.

        Prompt and negative are encoded in as many chunks as the longer needs, so their
        hidden states can be batched together.
        """

        def embed(tokens: PromptTokens) -> torch.Tensor:
            return self.text.embed(
                tokens, device=self.device, dtype=self.dtype, clip_skip=clip_skip
            )

        window = self.text.window
        negative_tokens = None
        if prompt_embeds is None:
            tokens = self.text.tokenize(prompts)
            if guided and negative_prompt_embeds is None:
                # As many chunks as the longer of prompt and negative needs.
                negative_tokens = self.text.tokenize(negatives, chunks=tokens.chunks)
                if negative_tokens.chunks > tokens.chunks:
                    tokens = self.text.tokenize(prompts, chunks=negative_tokens.chunks)
            cond = embed(tokens)
        else:
            cond = prompt_embeds.to(device=self.device, dtype=self.dtype)
        if not guided:
            return cond
        if negative_prompt_embeds is not None:
            uncond = negative_prompt_embeds.to(device=self.device, dtype=self.dtype)
        else:
            if negative_tokens is None:
                negative_tokens = self.text.tokenize(negatives, chunks=cond.shape[1] // window)
            if negative_tokens.chunks * window != cond.shape[1]:
                raise InvalidArgumentError(
                    f"the negative prompt needs {negative_tokens.chunks * window} tokens but the prompt "
                    f"embeddings have {cond.shape[1]}; shorten it or pass negative_prompt_embeds"
                )
            uncond = embed(negative_tokens)
        return torch.cat([uncond, cond])

    @torch.inference_mode()
    def generate(
        self,
        prompt: str | Sequence[str] | None = None,
        *,
        negative_prompt: str | Sequence[str] | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        scheduler: str | Scheduler | None = None,
        seed: Seeds = None,
        height: int | None = None,
        width: int | None = None,
        num_images: int = 1,
        output_type: OutputType = "pil",
        callback: Callback | None = None,
        progress: bool = True,
        clip_skip: int | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        image: ImageInput | None = None,
        mask_image: ImageInput | None = None,
        strength: float | None = None,
        depth_map: ImageInput | None = None,
    ) -> GenerationResult:
        """Generate images for ``prompt``; see `latentkit.generate` for the keywords."""
        if steps is None:
            steps = int(self.defaults.get("steps", DEFAULT_STEPS))
        if guidance_scale is None:
            guidance_scale = float(self.defaults.get("guidance_scale", DEFAULT_GUIDANCE))
        _check_generate_args(
            steps=steps,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            num_images=num_images,
            output_type=output_type,
            callback=callback,
        )
        guided = guidance_scale > 1.0
        prompts, negatives = self._check_prompts(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, guided
        )
        inputs = self._image_inputs(image, mask_image, strength, depth_map, height, width)
        if inputs is not None:
            height, width = inputs.size
        height = self.default_size[0] if height is None else height
        width = self.default_size[1] if width is None else width
        _check_size("height", height, self.vae.scale_factor)
        _check_size("width", width, self.vae.scale_factor)
        batch = len(prompts) * num_images
        assert self.runtime is not None
        rt = self.runtime
        with rt.session():
            seeds = _seeds(seed, batch)
            sched = self.resolve_scheduler(scheduler)
            start = (
                0
                if inputs is None or inputs.from_noise
                else sched.start_index(steps, inputs.strength)
            )

            # The text embeddings: each prompt repeated num_images times, negatives first for CFG.
            with rt.stage(self.text.text_encoder):
                context = self._text_context(
                    prompts, negatives, prompt_embeds, negative_prompt_embeds, guided, clip_skip
                ).repeat_interleave(num_images, dim=0)  # rows stay grouped: [negatives; prompts]

            generators: list[torch.Generator] | torch.Generator
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            if seed is None or isinstance(seed, int):
                generators = generators[0]  # one generator for the batch, as diffusers draws it
            shape = (
                batch,
                self.vae.latent_channels,
                height // self.vae.scale_factor,
                width // self.vae.scale_factor,
            )
            if inputs is None:
                noise = randn(shape, generator=generators, device=self.device, dtype=self.dtype)
                init = extra = blend = None
            else:
                estimator = None if self.depth is None else self.depth.estimator
                with rt.stage(self.vae, estimator):
                    noise, init, extra, blend = self._image_latents(inputs, shape, generators)
            if extra is not None and guided:
                extra = torch.cat([extra, extra])

            def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                x_in = torch.cat([x, x]) if guided else x
                if extra is not None:  # inpainting models read mask and masked image as channels
                    x_in = torch.cat([x_in, extra], dim=1)
                out = rt.unet(x_in, t, context)
                if not guided:
                    return out
                out_uncond, out_text = out.chunk(2)
                # Classifier-free guidance, Ho & Salimans 2022 eq. 6.
                out = out_uncond + guidance_scale * (out_text - out_uncond)
                return (
                    rescale_guidance(out, out_text, guidance_rescale)
                    if guidance_rescale > 0
                    else out
                )

            from tqdm.auto import tqdm

            run = sched.sample(
                model, noise, steps=steps, generator=generators, start=start, init=init
            )
            latents = noise
            replacement: torch.Tensor | None = None
            with (
                rt.stage(self.unet),
                tqdm(
                    total=len(sched.timesteps(steps)) - start,
                    disable=not progress,
                    desc="denoising",
                    leave=False,
                ) as bar,
            ):
                while True:
                    try:
                        step = run.send(replacement)
                    except StopIteration:
                        break
                    latents = step.sample
                    if blend is not None:
                        # Keep the known region: the original latents, noised to the level the
                        # sampler has reached, outside the mask (the last step keeps them clean).
                        mask, known = blend
                        following = start + step.index + 1
                        if step.index < step.total - 1:
                            known = sched.noised(known, noise, steps=steps, index=following)
                        latents = replacement = (1 - mask) * known + mask * latents
                        step = dataclasses.replace(step, sample=latents)
                    bar.update(1)
                    if callback is not None:
                        callback(step)

            if output_type == "latent":
                images: list[Any] = list(latents)
            else:
                with rt.stage(self.vae):
                    images = to_output(self.vae.decode(latents, tiling=rt.tiling), output_type)
            params = [
                GenerationParameters(
                    prompt=prompts[i // num_images],
                    negative_prompt=negatives[i // num_images],
                    steps=steps,
                    scheduler=scheduler if isinstance(scheduler, str) else sched.name,
                    guidance_scale=guidance_scale,
                    seed=seeds[i],
                    width=width,
                    height=height,
                    model=self.name,
                    strength=None if inputs is None else inputs.strength,
                    clip_skip=clip_skip,
                    guidance_rescale=guidance_rescale,
                )
                for i in range(batch)
            ]
            return GenerationResult(images=images, parameters=params)


def rescale_guidance(out: torch.Tensor, out_text: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale, Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps
    are Flawed") eqs. 15-16: match the guided output's std to the text-conditioned one's."""
    dims = list(range(1, out.ndim))
    rescaled = out * (out_text.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * out


def _as_prompts(value: str | Sequence[str], what: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    items = list(value)
    if not items or not all(isinstance(p, str) for p in items):
        raise InvalidArgumentError(f"{what} must be a string or a non-empty list of strings")
    return items


def _seeds(seed: Seeds, batch: int) -> list[int]:
    """One seed per image. One int seeds one generator for the whole batch (its first image
    keeps the seed); ``None`` draws a fresh seed so the result can still be reproduced."""
    if seed is None:
        seed = random.SystemRandom().randrange(2**32)
    given: list[object] = (
        [seed] * batch if _is_int(seed) else list(seed) if isinstance(seed, Sequence) else []
    )
    seeds = [int(s) for s in given if _is_int(s)]  # type: ignore[call-overload]
    if len(seeds) != batch or len(given) != batch or not all(-(2**63) <= s < 2**64 for s in seeds):
        raise InvalidArgumentError(
            f"seed must be an int in [-2**63, 2**64), None, or a list of {batch} such ints "
            f"(one per image); got {seed!r}"
        )
    return seeds


def _check_generate_args(
    *,
    steps: int,
    guidance_scale: float,
    guidance_rescale: float,
    num_images: int,
    output_type: str,
    callback: Callback | None,
) -> None:
    if not _is_int(steps) or steps < 1:
        raise InvalidArgumentError(f"steps must be an int ≥ 1, got {steps!r}")
    if not _is_int(num_images) or num_images < 1:
        raise InvalidArgumentError(f"num_images must be an int ≥ 1, got {num_images!r}")
    if not _is_real(guidance_scale) or guidance_scale < 0:
        raise InvalidArgumentError(
            f"guidance_scale must be a finite number ≥ 0, got {guidance_scale!r}"
        )
    if not _is_real(guidance_rescale) or not 0 <= guidance_rescale <= 1:
        raise InvalidArgumentError(f"guidance_rescale must be in [0, 1], got {guidance_rescale!r}")
    if output_type not in OUTPUT_TYPES:
        raise InvalidArgumentError(
            f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}"
        )
    if callback is not None and not callable(callback):
        raise InvalidArgumentError("callback must be callable")


def _transformers_model(
    cls: Any, files: ModelFiles, component: str, device: torch.device, dtype: torch.dtype
) -> Any:
    """A transformers model component, read from exactly the weight file `select_files`
    chose (variant, safetensors or opted-in pickle with ``weights_only``), frozen, on ``device``."""
    weights = files.weights[component]
    v = files.variant
    model = cls.from_pretrained(
        str(files.root / component),
        dtype=dtype,
        variant=v if v and any(f".{v}." in p.name for p in weights) else None,
        use_safetensors=any(p.suffix == ".safetensors" for p in weights),
        weights_only=True,
        local_files_only=True,
    ).to(device)
    model.eval().requires_grad_(False)
    return model


def _load_depth_estimator(
    files: ModelFiles, device: torch.device, dtype: torch.dtype
) -> DepthConditioner:
    """The repo's DPT depth estimator and its image processor (transformers classes)."""
    from transformers import DPTForDepthEstimation, DPTImageProcessor

    estimator = _transformers_model(DPTForDepthEstimation, files, "depth_estimator", device, dtype)
    processor = DPTImageProcessor.from_pretrained(
        str(files.root / "feature_extractor"), local_files_only=True
    )
    return DepthConditioner(estimator=estimator, processor=processor)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_size(label: str, size: int, factor: int) -> None:
    if not _is_int(size) or size <= 0 or size % factor:
        hint = max(factor, size // factor * factor) if isinstance(size, int) else 512
        raise InvalidArgumentError(
            f"{label} must be a positive multiple of {factor} (the autoencoder's downsampling "
            f"factor), got {size!r}; try {hint}"
        )


if TYPE_CHECKING:
    # mypy proves that the built-in components satisfy the protocols they are used as.
    from latentkit.protocols import Autoencoder, Conditioner, Pipeline
    from latentkit.schedulers.ddim import DDIM
    from latentkit.schedulers.dpm_solver import DPMSolverPlusPlus
    from latentkit.schedulers.euler import Euler
    from latentkit.schedulers.pndm import PNDM

    _pipeline: type[Pipeline] = StableDiffusion
    _autoencoder: type[Autoencoder] = AutoencoderKL
    _conditioner: type[Conditioner[Sequence[str]]] = TextConditioner
    _schedulers: tuple[type[Scheduler], ...] = (DDIM, DPMSolverPlusPlus, Euler, PNDM)

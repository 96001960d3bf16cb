"""The loop every family shares: request → conditioning → start latents → sampling → pixels.

Rombach et al. 2022: the denoiser runs in the autoencoder's latent space (sec. 3.2) and is
steered by cross-attention to the text embeddings (sec. 3.3, eq. 3); classifier-free guidance
(Ho & Salimans 2022, eq. 6) mixes conditional and unconditional predictions. What differs
between families (SD 1.x/2.x, SDXL) is declared in `latentkit.pipelines.family.Family`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import PIL.Image
import torch

from latentkit import images, schedulers
from latentkit import preview as latent_preview
from latentkit.conditioners import control as controlnet
from latentkit.conditioners.control import ControlNetConditioner
from latentkit.conditioners.depth import DepthConditioner
from latentkit.conditioners.text import TextConditioner, TextEmbeddings, encode_prompts
from latentkit.devices import DTYPE_NAMES, resolve_device, resolve_dtype
from latentkit.errors import (
    InvalidArgumentError,
    NonFiniteError,
    UnsupportedModelError,
)
from latentkit.guidance import guidance_gate
from latentkit.loading import ModelFiles, load_into, progress_bars
from latentkit.models.unet import FeatureCache
from latentkit.performance import Performance, Runtime, autocast_dtype
from latentkit.pipelines import tasks
from latentkit.pipelines.family import Family
from latentkit.pipelines.parts import (
    AdapterRecord,
    Parts,
    parse_config,
    short_hash,
)
from latentkit.pipelines.sd import StableDiffusionFamily
from latentkit.pipelines.tasks import ImageInputs, Start
from latentkit.protocols import Generators, Scheduler, Seeds
from latentkit.request import FAMILY_OPTIONS, Request, as_list, is_int, is_real, limits
from latentkit.results import (
    EMPHASIS,
    MASK_BLUR,
    PLAIN_EMPHASIS,
    RECORDED_OPTIONS,
    GenerationParameters,
    GenerationResult,
    controlnet_unit,
    option_fields,
    to_output,
)
from latentkit.saving import DEFAULTS_KEY, check_generation_defaults
from latentkit.schedulers import custom
from latentkit.tiles import map_tiles

if TYPE_CHECKING:
    from latentkit.models.autoencoder import AutoencoderKL
    from latentkit.models.autoencoder_tiny import AutoencoderTiny
    from latentkit.models.controlnet import ControlNetConfig
    from latentkit.models.unet import UNet2DCondition


logger = logging.getLogger("latentkit")
T = TypeVar("T")

DEFAULT_STEPS = 50
"""Denoising steps when neither the caller nor the model says (diffusers' default)."""


@dataclass(frozen=True)
class Conditioning:
    """What the UNet is conditioned on, by where it enters (not by tensor rank)."""

    context: torch.Tensor
    """(B, tokens, D): cross-attention context."""
    vector: torch.Tensor | None = None
    """(B, V): added to the time embedding (SDXL's pooled text and size ids)."""

    @staticmethod
    def guided(uncond: Conditioning, cond: Conditioning) -> Conditioning:
        """Both branches in one batch, unconditional first (as diffusers batches them)."""
        vector = None
        if cond.vector is not None and uncond.vector is not None:
            vector = torch.cat([uncond.vector, cond.vector])
        return Conditioning(torch.cat([uncond.context, cond.context]), vector)

    def repeat(self, times: int) -> Conditioning:
        """Each row ``times`` times in a row (``num_images`` per prompt)."""
        vector = None if self.vector is None else self.vector.repeat_interleave(times, dim=0)
        return Conditioning(self.context.repeat_interleave(times, dim=0), vector)


@dataclass(frozen=True)
class LatentDiffusion:
    """A loaded latent diffusion model of any family. Immutable: `with_scheduler` returns a
    new pipeline sharing the same weights, so one pipeline serves several threads."""

    unet: UNet2DCondition
    vae: AutoencoderKL | AutoencoderTiny
    """The autoencoder: Stable Diffusion's KL one, or TAESD (``load_pipeline(vae=...)``)."""
    text: tuple[TextConditioner, ...]
    """The text encoders, in the order their hidden states are concatenated."""
    scheduler: Scheduler
    scheduler_config: dict[str, Any]
    """The model's own ``scheduler_config.json``; swapping schedulers carries its fields over."""
    device: torch.device
    dtype: torch.dtype
    name: str
    spec: type[Family] = StableDiffusionFamily
    """The family's declarations (`latentkit.pipelines.Family`)."""
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """The model's ``model_index.json`` (``force_zeros_for_empty_prompt``,
    ``requires_aesthetics_score``, ...)."""
    depth: DepthConditioner | None = None
    """Depth conditioning with the repo's own estimator, for depth-to-image models."""
    runtime: Runtime | None = None
    """How the networks run (`latentkit.Performance`); None: the plain path."""
    defaults: dict[str, float] = dataclasses.field(default_factory=dict)
    """The model's recommended ``steps`` / ``guidance_scale`` (``_latentkit_defaults`` in
    ``model_index.json``), used when `generate` is not given them."""
    model_file: Path | None = None
    """The single checkpoint file the model was loaded from (for the PNG's ``Model hash``)."""
    adapters: tuple[AdapterRecord, ...] = ()
    """LoRAs and embeddings added with `with_lora` / `with_embedding`, in order (for the
    PNG's ``Lora hashes`` / ``TI hashes``)."""
    controls: tuple[ControlNetConditioner, ...] = ()
    """ControlNets attached with `with_controlnet`, in order; their residuals are summed."""
    component_configs: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    """The configs of the family's config-only components (`Family.extra_configs`), by
    name: the x4 upscaler's ``low_res_scheduler``."""

    def __post_init__(self) -> None:
        if isinstance(self.text, TextConditioner):
            object.__setattr__(self, "text", (self.text,))
        if self.runtime is None:
            runtime = Runtime(Performance(), self.device)
            runtime.prepare(self.unet, self.vae)
            object.__setattr__(self, "runtime", runtime)

    @property
    def family(self) -> str:
        """The registered name of this model's family (``"stable-diffusion-xl"``, ...)."""
        return self.spec.name

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
        family: type[Family],
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        progress: bool = True,
        performance: Performance | None = None,
    ) -> LatentDiffusion:
        """Build the pipeline of ``family`` from resolved model files (`latentkit.load_pipeline`)."""
        parts = Parts.from_files(files, family=family)
        return cls.from_parts(
            parts,
            family=family,
            device=device,
            dtype=dtype,
            progress=progress,
            performance=performance,
        )

    @classmethod
    def from_parts(
        cls,
        parts: Parts,
        *,
        family: type[Family],
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        progress: bool = True,
        performance: Performance | None = None,
    ) -> LatentDiffusion:
        """Build the pipeline of ``family`` from a model's `Parts` (a diffusers folder's or a
        single checkpoint's): networks built on the meta device, weights assigned as they
        stream in, so no second copy of them ever exists."""
        from tqdm.auto import tqdm

        from latentkit.models.autoencoder_tiny import (
            AutoencoderTinyConfig,
            autoencoder_config,
            build_autoencoder,
        )
        from latentkit.models.text_encoder import CLIPTextConfig, CLIPTextEncoder
        from latentkit.models.unet import UNet2DCondition, UNetConfig

        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        runtime = Runtime(performance or Performance(), dev)
        runtime.check(dt)
        home = runtime.storage_device  # the CPU when offloading, else the device
        scheduler_config = dict(parts.configs["scheduler"])
        scheduler = schedulers.from_config(scheduler_config)
        unet_config = parse_config(parts, "unet", UNetConfig.from_dict)
        vae_config = parse_config(parts, "vae", autoencoder_config)  # KL, or TAESD's tiny one
        if runtime.tiling is not None and isinstance(vae_config, AutoencoderTinyConfig):
            raise InvalidArgumentError(
                f"{parts.name}: vae_tiling works with the KL autoencoder only; the tiny "
                "autoencoder (AutoencoderTiny) needs no tiling: load without vae_tiling"
            )
        # SDXL's VAE overflows in half precision: it runs in float32 (diffusers' force_upcast).
        upcast = family.upcast_vae and vae_config.force_upcast and dt == torch.float16
        if not parts.encoders:
            raise UnsupportedModelError(f"{parts.name}: the model has no text encoder")

        bar = tqdm(
            total=3 + len(parts.encoders),
            desc=f"loading {parts.name}",
            disable=not progress,
            leave=False,
        )
        # transformers is imported only for a depth model's estimator.
        with bar, progress_bars(progress, transformers=parts.depth is not None):
            with torch.device("meta"):
                # Built on the meta device: no memory, no random init; the weights are assigned.
                unet = UNet2DCondition(unet_config)
                vae = build_autoencoder(vae_config)
                encoders = [
                    CLIPTextEncoder(parse_config(parts, e, CLIPTextConfig.from_dict))
                    for e in parts.encoders
                ]

            # The runtime reads the UNet's and the autoencoder's weights: the OpenVINO
            # backend only if it has no converted copy on disk (`Runtime.prepare`).
            def unet_weights() -> None:
                load_into(unet, parts.tensors("unet", home, dt), name="unet")

            def vae_weights() -> None:
                vae_dt = torch.float32 if upcast else dt
                load_into(vae, parts.tensors("vae", home, vae_dt), name="vae")

            # The OpenVINO backend's bf16 runs the text encoder in torch under bf16
            # autocast, which computes its matrix products from bf16 copies of the weights
            # anyway: keeping them in bf16 halves their memory (SD 1.5: 470 → 235 MiB).
            # (bf16 only: the CPU's kernels for fp16 weights are few and slow.)
            autocast = runtime.performance.autocast
            bf16 = autocast is not None and autocast_dtype(autocast) == torch.bfloat16
            text_dt = torch.bfloat16 if runtime.performance.backend == "openvino" and bf16 else dt
            text = []
            for component, encoder in zip(parts.encoders, encoders, strict=True):
                load_into(encoder, parts.tensors(component, home, text_dt), name=component)
                tokenizer = parts.tokenizer(component)
                # An id past the embedding table or a window past the positions would fail
                # at generation time: refuse the pair now, naming the config.
                tokenizer.check_encoder(
                    vocab_size=encoder.config.vocab_size,
                    max_positions=encoder.config.max_position_embeddings,
                    where=f"{parts.name}'s {component}",
                )
                text.append(
                    TextConditioner(
                        tokenizer=tokenizer,
                        text_encoder=encoder,
                        component=component,
                    )
                )
                bar.update()
            depth = parts.depth(home, dt) if parts.depth is not None else None
            runtime.prepare(
                unet,
                vae,
                identity=_identity(parts, runtime, dt),
                weights={"unet": unet_weights, "vae": vae_weights},
            )
            bar.update(3)  # the UNet and autoencoder weights (where read), then prepared
        model_index = parts.model_index
        return cls(
            unet=unet,
            vae=vae,
            text=tuple(text),
            scheduler=scheduler,
            scheduler_config=scheduler_config,
            device=dev,
            dtype=dt,
            name=parts.name,
            model_file=parts.file,
            spec=family,
            config=model_index,
            depth=depth,
            runtime=runtime,
            defaults=check_generation_defaults(model_index.get(DEFAULTS_KEY, {})),
            component_configs={c: parts.configs[c] for c in family.extra_configs},
        )

    def with_lora(
        self,
        source: str | os.PathLike[str],
        /,
        *,
        scale: float = 1.0,
        fuse: bool = False,
        weight_name: str | None = None,
        allow_pickle: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
    ) -> LatentDiffusion:
        """This pipeline with a LoRA (a file, a folder or a Hub repo; kohya/A1111 or
        diffusers/PEFT keys): ``W + scale · alpha/rank · up · down`` on the layers it names.

        The new pipeline shares every unchanged weight with this one, which stays as it was
        (its images bit-identical); chaining stacks LoRAs. Unfused (default), adapted layers
        add a low-rank side path and no weight is copied; ``fuse=True`` adds the change into
        a private copy of each adapted weight (faster per step, see docs/lora.md).
        """
        from latentkit.adapters.common import find_adapter_file
        from latentkit.adapters.lora import DEFAULT_WEIGHT_NAMES, apply_lora, load_lora

        if not is_real(scale) or not isinstance(fuse, bool):
            raise InvalidArgumentError(
                f"scale must be a finite number and fuse a bool, got {scale!r}, {fuse!r}"
            )
        path = find_adapter_file(
            source,
            weight_name=weight_name,
            default_names=DEFAULT_WEIGHT_NAMES,
            allow_pickle=allow_pickle,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
        )
        assert self.runtime is not None
        self.runtime.materialize("unet")  # the LoRA's layers wrap the base UNet's weights
        modules: dict[str, torch.nn.Module | None] = {
            "unet": self.unet,
            **{t.component: t.text_encoder for t in self.text},
        }
        lora = load_lora(path, modules=modules, allow_pickle=allow_pickle)
        adapted = apply_lora(modules, lora, scale=scale, fuse=fuse)
        unet = adapted["unet"]
        assert isinstance(unet, type(self.unet))
        text = tuple(
            t
            if adapted[t.component] is t.text_encoder
            else TextConditioner(
                tokenizer=t.tokenizer, text_encoder=adapted[t.component], component=t.component
            )
            for t in self.text
        )
        # A runtime of its own: the base's holds the base UNet (compiled or captured).
        record = AdapterRecord.of("lora", path, scale=float(scale))
        identity = dict(self.runtime.identity)
        if "unet" in identity:  # the UNet's weights are the base's and this LoRA
            identity["unet"] += f"+lora:{record.hash}:{scale!r}:{fuse}"
        runtime = Runtime(self.performance, self.device)
        base = self.runtime  # the shared autoencoder's weights, if still unread, are its
        runtime.prepare(
            unet, self.vae, identity=identity, weights={"vae": lambda: base.materialize("vae")}
        )
        return dataclasses.replace(
            self, unet=unet, text=text, runtime=runtime, adapters=(*self.adapters, record)
        )

    def with_embedding(
        self,
        source: str | os.PathLike[str],
        /,
        *,
        token: str | None = None,
        weight_name: str | None = None,
        allow_pickle: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
        local_files_only: bool = False,
        hub_token: str | bool | None = None,
    ) -> LatentDiffusion:
        """This pipeline with a textual-inversion embedding (A1111 ``.pt``/``.safetensors``,
        diffusers' ``learned_embeds.safetensors``, SDXL ``clip_l``/``clip_g`` files) under
        ``token`` (default: the file's own, else its name). A multi-vector embedding expands
        the token to as many tokens, as diffusers does. This pipeline is unchanged."""
        from latentkit.adapters.common import find_adapter_file
        from latentkit.adapters.textual_inversion import (
            DEFAULT_WEIGHT_NAMES,
            PICKLE_WEIGHT_NAMES,
            load_textual_inversion,
        )

        path = find_adapter_file(
            source,
            weight_name=weight_name,
            default_names=DEFAULT_WEIGHT_NAMES + (PICKLE_WEIGHT_NAMES if allow_pickle else ()),
            allow_pickle=allow_pickle,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=hub_token,
        )
        pairs = load_textual_inversion(
            path,
            encoders={t.component: (t.tokenizer, t.text_encoder) for t in self.text},
            token=token,
            allow_pickle=allow_pickle,
        )
        text = []
        for t in self.text:
            pair = pairs.get(t.component)
            text.append(
                t
                if pair is None
                else TextConditioner(tokenizer=pair[0], text_encoder=pair[1], component=t.component)
            )
        record = AdapterRecord.of("embedding", path, token=token)
        return dataclasses.replace(self, text=tuple(text), adapters=(*self.adapters, record))

    def with_scheduler(self, scheduler: str | Scheduler, /, **options: Any) -> LatentDiffusion:
        """This pipeline with another scheduler (a name, an alias or a scheduler object).

        A name carries over the fields of the model's own scheduler config, as diffusers'
        ``from_config`` does, so the swap gives the same images in both libraries; so does
        an object from `latentkit.schedulers.create` for the options its caller left unset.
        """
        return dataclasses.replace(self, scheduler=self.resolve_scheduler(scheduler, **options))

    def with_controlnet(
        self,
        source: str | os.PathLike[str] | ControlNetConditioner,
        /,
        *,
        revision: str | None = None,
        variant: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        allow_pickle: bool = False,
        progress: bool = True,
    ) -> LatentDiffusion:
        """This pipeline with a ControlNet attached (Zhang et al. 2023): ``generate`` then
        takes ``control_image`` (and ``control_scale``, ``control_start``, ``control_end``,
        ``guess_mode``). Chaining attaches several; their residuals are summed. This pipeline
        is unchanged; the new one shares its weights.

        ``source`` is a Hub repo id or a folder in diffusers' layout (``config.json`` and
        ``diffusion_pytorch_model.safetensors``; the keywords are `latentkit.load_pipeline`'s),
        a single file (``.safetensors``, or ``.pth`` with ``allow_pickle``; local or
        ``org/repo/file``) in the original or diffusers' layout, or a `ControlNetConditioner`
        already loaded. A ControlNet for another base (an SDXL
        one on SD 1.5) is refused with `UnsupportedModelError` before its weights are read.

        >>> pipe = pipe.with_controlnet("lllyasviel/control_v11p_sd15_canny")  # doctest: +SKIP
        """
        assert self.runtime is not None

        def fits(config: ControlNetConfig, name: str) -> None:
            controlnet.check_base(
                config,
                self.unet.config,
                latent_channels=self.vae.latent_channels,
                scale_factor=self.vae.scale_factor,
                name=self.name,
                source=name,
            )

        if isinstance(source, ControlNetConditioner):
            fits(source.network.control_config, source.source)
            control = source
        elif controlnet.is_single_file(source):
            control = controlnet.load_single_file(
                source,
                base=self.unet.config,
                device=self.runtime.storage_device,
                dtype=self.dtype,
                allow_pickle=allow_pickle,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                token=token,
                fits=fits,
            )
        else:
            control = ControlNetConditioner.load(
                source,
                device=self.runtime.storage_device,
                dtype=self.dtype,
                revision=revision,
                variant=variant,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                token=token,
                allow_pickle=allow_pickle,
                progress=progress,
                fits=fits,
            )
        self.runtime.configure(control.network, "controlnet")
        return dataclasses.replace(self, controls=(*self.controls, control))

    def resolve_scheduler(self, scheduler: str | Scheduler | None, /, **options: Any) -> Scheduler:
        """The scheduler a call uses: the pipeline's own for None, else ``scheduler`` fitted
        to the model's scheduler config."""
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

    def preview(
        self,
        latents: torch.Tensor,
        /,
        *,
        index: int = 0,
        resample: latent_preview.Resample = "nearest",
        factors: latent_preview.LatentRGB | None = None,
    ) -> PIL.Image.Image:
        """A cheap picture of ``latents`` (a step callback's ``step.sample``): the linear
        latent→RGB map of this model's latent space (`latentkit.preview`), no VAE, enlarged to
        the output size. ``factors``: another map (default: the family's)."""
        if factors is None:
            factors = latent_preview.latent_rgb(
                family=self.family, scaling_factor=self.vae.scaling_factor
            )
        h, w = latents.shape[-2:]
        scale = self.vae.scale_factor
        return latent_preview.preview(
            latents, factors=factors, size=(h * scale, w * scale), resample=resample, index=index
        )

    # ---- one call

    def generate(
        self, prompt: str | Sequence[str] | None = None, **options: Any
    ) -> GenerationResult:
        """Generate images for ``prompt``; the keywords are `latentkit.request.Request`'s
        (see `latentkit.generate`)."""
        return self.run(Request.create(prompt, **options))

    @torch.inference_mode()
    def run(self, request: Request) -> GenerationResult:
        """Generate the images a checked `Request` asks for."""
        self._check(request)
        tiles = self._latent_tiles()
        if request.clip_skip is None and self.spec.clip_skip is not None:
            request = dataclasses.replace(request, clip_skip=self.spec.clip_skip)
        steps = request.steps or int(self.defaults.get("steps", self.spec.steps))
        guidance = request.guidance_scale
        if guidance is None:
            guidance = float(self.defaults.get("guidance_scale", self.spec.guidance_scale))
        guided = guidance > 1.0
        prompts, negatives = self._prompts(request)
        inputs = tasks.image_inputs(self, request)
        height, width = inputs.size if inputs is not None else self._size(request)
        if height * width > limits().max_pixels:
            raise InvalidArgumentError(
                f"{height}x{width} pixels exceeds the limit of {limits().max_pixels:,} per "
                "image; raise it with latentkit.set_limits(max_pixels=...)"
            )
        batch = len(prompts[0]) * request.num_images
        assert self.runtime is not None
        rt = self.runtime
        with rt.session(progress=request.progress):
            generators, seeds = _generators(request, batch)
            sched = self.resolve_scheduler(request.scheduler)
            if request.timesteps is not None or request.sigmas is not None:
                # diffusers' timesteps= / sigmas=: the scheduler's schedule is those values.
                sched = custom.with_schedule(
                    sched, timesteps=request.timesteps, sigmas=request.sigmas
                )
                steps = sched.custom_schedule.steps
            first, last = self._span(sched, steps, request, inputs)
            with rt.stage(*(t.text_encoder for t in self.text)):
                cond = self._conditioning(request, prompts, negatives, guided, (height, width))
            cond = cond.repeat(request.num_images)  # rows stay grouped: [negatives; prompts]
            shape = (
                batch,
                self.vae.latent_channels,
                height // self.vae.scale_factor,
                width // self.vae.scale_factor,
            )
            estimator = None if self.depth is None else self.depth.estimator
            with rt.stage(self.vae, estimator):
                start = tasks.start(self, inputs, shape, generators, request)
            concat = start.concat
            if concat is not None and guided:
                concat = torch.cat([concat, concat])
            control = controlnet.start_control(
                self.controls,
                request,
                size=(height, width),
                batch=batch,
                # diffusers' `controlnet_keep` counts the evaluations from the start position
                # to the end of the schedule, before any denoising_end cut.
                evaluations=len(sched.timesteps(steps)) - first,
                defaults=self.spec.control_scales,
                device=self.device,
                dtype=self.dtype,
            )
            labels = self.spec.class_labels(self, request)  # the x4 upscaler's noise level
            if labels is not None:
                labels = labels.to(self.device).expand(batch * (2 if guided else 1))

            gate = None
            if guided and request.guidance_interval is not None:
                gate = guidance_gate(sched, request.guidance_interval)
            # DeepCache: this call's own cache, passed to every evaluation (no module state).
            cache = None if request.feature_cache is None else FeatureCache(request.feature_cache)

            def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                # Outside the guidance interval only the conditional rows (the guided
                # batch's second half) run: half the UNet batch.
                guide = guided and (gate is None or gate(t))
                rows = slice(None) if guide or not guided else slice(x.shape[0], None)
                context = cond.context[rows]
                vector = None if cond.vector is None else cond.vector[rows]
                x_in = torch.cat([x, x]) if guide else x
                # ControlNet residuals: one call per evaluation, on the latents only.
                residuals = None if control is None else control(x, x_in, t, context, vector)
                if concat is not None:  # inpainting and depth models read extra channels
                    x_in = torch.cat([x_in, concat[rows]], dim=1)
                classes = None if labels is None else labels[rows]

                def unet(window: torch.Tensor) -> torch.Tensor:
                    return rt.unet(window, t, context, vector, residuals, classes, cache)

                # Large latents in overlapping tiles, blended at every evaluation (MultiDiffusion).
                if tiles is None:
                    out = unet(x_in)
                else:
                    out = map_tiles(unet, x_in, tile=tiles[0], overlap=tiles[1])
                if not guide:
                    return out
                out_uncond, out_text = out.chunk(2)
                # Classifier-free guidance, Ho & Salimans 2022 eq. 6.
                out = out_uncond + guidance * (out_text - out_uncond)
                if request.guidance_rescale > 0:
                    out = rescale_guidance(out, out_text, request.guidance_rescale)
                return out

            with rt.stage(self.unet, *(c.network for c in self.controls)):
                latents = self._denoise(
                    sched, model, start, steps, first, last, generators, request
                )
            outputs: Any
            if request.output_type == "latent":
                outputs = latents  # (B, C, h, w), as diffusers returns them
            else:
                with rt.stage(self.vae):
                    decoded = self._decode(latents).to(self.dtype)
                if inputs is not None and inputs.paste is not None:
                    # Outpainting: the picture's own pixels back outside the seam (float32).
                    decoded = inputs.paste.paste(decoded)
                outputs = to_output(decoded, request.output_type)
                # Batched like diffusers: an array (N, H, W, 3) or a tensor (N, 3, H, W).
                if request.output_type == "np":
                    outputs = np.stack(outputs)
                elif request.output_type == "pt":
                    outputs = torch.stack(outputs)
        strength = None if inputs is None else inputs.strength
        sampler, schedule = schedulers.a1111_label(sched)
        recorded = self._recorded(request)
        params = []
        for i in range(batch):
            k = i // request.num_images
            options = dict(recorded)
            if len(self.text) > 1:  # the second encoder's prompts, where they were given
                for name, lists in (("prompt_2", prompts), ("negative_prompt_2", negatives)):
                    if getattr(request, name) is not None:
                        options[name] = lists[1][k]
            params.append(
                GenerationParameters(
                    prompt=prompts[0][k],
                    negative_prompt=negatives[0][k],
                    steps=steps,
                    scheduler=sampler,
                    guidance_scale=guidance,
                    seed=seeds[i],
                    width=width,
                    height=height,
                    model=self.model_name,
                    strength=strength if request.denoising_start is None else None,
                    clip_skip=request.clip_skip,
                    guidance_rescale=request.guidance_rescale,
                    extras=self._extras(schedule, sched, options, request, control),
                )
            )
        return GenerationResult(images=outputs, parameters=params)

    @property
    def model_name(self) -> str:
        """The model as A1111 names it in PNGs: a Hub id as it is, a local file or folder by
        its name (no path, no ending)."""
        path = Path(self.name).expanduser()
        return path.stem if path.exists() else self.name

    def _recorded(self, request: Request) -> dict[str, Any]:
        """The options of `RECORDED_OPTIONS` this call set (the upscaler's ``noise_level``
        always: it is that family's main setting), as ``generate`` took them."""
        given = request.given()
        options = {
            name: given[name]
            for name, _, _ in RECORDED_OPTIONS
            if name in given and name not in ("prompt_2", "negative_prompt_2", "noise_level")
        }
        if "noise_level" in self.spec.options:
            options["noise_level"] = request.noise_level
        return options

    def _extras(
        self,
        schedule: str | None,
        sched: Scheduler,
        options: dict[str, Any],
        request: Request,
        control: controlnet.ControlRun | None,
    ) -> tuple[tuple[str, str], ...]:
        """The A1111 fields after the core ones: schedule type, eta, model and adapter
        hashes, the recorded ``options`` (`option_fields`), emphasis, the inpainting mask's
        marker, the ControlNets' units, version: what it takes to regenerate the image, in
        A1111's spelling where A1111 has the setting."""
        from latentkit import __version__

        extras: list[tuple[str, str]] = []
        if schedule is not None:
            extras.append(("Schedule type", schedule))
        eta = getattr(sched, "eta", None)
        if isinstance(eta, float) and eta:
            extras.append(("Eta", f"{eta:g}"))
        if self.model_file is not None:
            extras.append(("Model hash", short_hash(self.model_file, 10)))
        for kind, label in (("lora", "Lora hashes"), ("embedding", "TI hashes")):
            named = [f"{a.name}: {a.hash}" for a in self.adapters if a.kind == kind]
            if named:
                extras.append((label, ", ".join(named)))
        extras += option_fields(options)
        if request.prompt_syntax == "plain":
            extras.append((EMPHASIS, PLAIN_EMPHASIS))
        if request.mask_image is not None:
            extras.append((MASK_BLUR, "0"))  # a mask was used (latentkit does not blur it)
        if control is not None:
            for k, adapter in enumerate(control.adapters):
                start, end = control.windows[k]
                unit = controlnet_unit(
                    model=adapter.a1111_model,
                    weight=control.scales[k],
                    start=start,
                    end=end,
                    guess_mode=control.guess_mode,
                )
                extras.append((f"ControlNet {k}", unit))
        extras.append(("Version", f"latentkit {__version__}"))
        return tuple(extras)

    # ---- the steps of a call, in order

    def _check(self, request: Request) -> None:
        """The checks that need the model: family keywords, then the family's own."""
        foreign = sorted((FAMILY_OPTIONS - self.spec.options) & set(request.given()))
        if foreign:
            raise InvalidArgumentError(
                f"{', '.join(foreign)}: not a keyword of {self.name} (family {self.family}); "
                "these condition other model families (e.g. SDXL)"
            )
        for label, embeds in (
            ("prompt_embeds", request.prompt_embeds),
            ("negative_prompt_embeds", request.negative_prompt_embeds),
        ):
            width = self.unet.config.cross_attention_dim
            if embeds is not None and embeds.shape[-1] != width:
                raise InvalidArgumentError(
                    f"{label} must have shape (batch, tokens, {width}), got {tuple(embeds.shape)}"
                )
        pe, ne = request.prompt_embeds, request.negative_prompt_embeds
        if pe is not None and ne is not None and ne.shape != pe.shape:
            raise InvalidArgumentError(
                f"negative_prompt_embeds {tuple(ne.shape)} must match prompt_embeds {tuple(pe.shape)}"
            )
        controlnet.check_request(self.controls, request, name=self.name)
        if request.feature_cache is not None:
            assert self.runtime is not None
            self.runtime.check_cache()
        self.spec.check(self, request)

    def _latent_tiles(self) -> tuple[int, int] | None:
        """(tile, overlap) in latents for ``Performance.unet_tiling``, or None."""
        assert self.runtime is not None
        tiling = self.runtime.unet_tiling
        if tiling is None:
            return None
        if self.controls:
            raise InvalidArgumentError(
                "unet_tiling does not go with ControlNets yet: their residuals are computed "
                "for the whole image; load the pipeline without unet_tiling"
            )
        factor = self.vae.scale_factor
        if tiling.tile_size is None:
            side = self.unet.config.sample_size or 64
            tile = side if isinstance(side, int) else side[0]
        else:
            tasks.check_size("unet_tiling tile_size", tiling.tile_size, factor)
            tile = tiling.tile_size // factor
        return tile, min(int(tile * tiling.overlap), tile - 1)

    def _prompts(self, request: Request) -> tuple[list[list[str]], list[list[str]]]:
        """The prompts and negative prompts for each text encoder (one each per batch item):
        the first encoder reads ``prompt``, the second ``prompt_2`` (default: ``prompt``)."""
        if request.prompt_embeds is not None:
            prompts = [""] * request.prompt_embeds.shape[0]
            seconds = prompts
        else:
            assert request.prompt is not None
            prompts = as_list(request.prompt)
            seconds = as_list(request.prompt_2) if request.prompt_2 is not None else prompts
        negative = request.negative_prompt
        negatives = as_list("" if negative is None else negative)
        negatives_2 = (
            negatives if request.negative_prompt_2 is None else as_list(request.negative_prompt_2)
        )
        lists = [prompts, seconds, negatives, negatives_2]
        labels = ["prompts", "prompt_2 prompts", "negative prompts", "negative_prompt_2 prompts"]
        for i, (label, items) in enumerate(zip(labels, lists, strict=True)):
            if len(items) == 1 and len(prompts) > 1:
                lists[i] = items * len(prompts)
            elif len(items) != len(prompts):
                raise InvalidArgumentError(
                    f"got {len(items)} {label} for {len(prompts)} prompts; give one or one each"
                )
        n = len(self.text)
        return [lists[0], lists[1]][:n], [lists[2], lists[3]][:n]

    def _size(self, request: Request) -> tuple[int, int]:
        given = self.spec.size(self, request)  # the upscaler: 4x its input
        if given is not None:
            return given
        if self.controls and request.control_image is not None:
            # Text-to-image with ControlNets: the first control image's size (as diffusers).
            for label, value in (("height", request.height), ("width", request.width)):
                if value is not None:
                    tasks.check_size(label, value, self.vae.scale_factor)
            return images.target_size(
                controlnet.first_control_image(request),
                request.height,
                request.width,
                self.vae.scale_factor,
            )
        height = self.default_size[0] if request.height is None else request.height
        width = self.default_size[1] if request.width is None else request.width
        tasks.check_size("height", height, self.vae.scale_factor)
        tasks.check_size("width", width, self.vae.scale_factor)
        return height, width

    def _span(
        self, sched: Scheduler, steps: int, request: Request, inputs: ImageInputs | None
    ) -> tuple[int, int]:
        """The positions in ``sched.timesteps(steps)`` the run evaluates: [first, last).

        ``denoising_start`` / ``denoising_end`` cut the schedule at the model timestep
        ``round(T - fraction · T)``, as diffusers' SDXL pipelines do (a second-order sampler
        starts at the first evaluation of a step): at the first evaluation below it. For
        timesteps that never rise that is diffusers' count of those at or above it; Restart's
        rise again at each restart, which then all fall after the cut.
        """
        timesteps = sched.timesteps(steps)
        trained = int(getattr(sched, "num_train_timesteps", 1000))
        first, last = 0, len(timesteps)

        def cut(fraction: float) -> int:
            below = (timesteps < round(trained - fraction * trained)).nonzero()
            return int(below[0]) if len(below) else len(timesteps)

        if request.denoising_start is not None:
            first = cut(request.denoising_start)
            if getattr(sched, "evaluations_per_step", 1) == 2 and first % 2 == 1:
                first -= 1  # keep both evaluations of the step the cut falls in
        elif inputs is not None and not inputs.from_noise:
            first = sched.start_index(steps, inputs.strength)
        if request.denoising_end is not None:
            last = cut(request.denoising_end)
        if last <= first:
            raise InvalidArgumentError(
                f"denoising_start/denoising_end/strength leave no step of {steps} to run "
                f"(positions {first}..{last}); widen the window or raise steps"
            )
        return first, last

    def _conditioning(
        self,
        request: Request,
        prompts: list[list[str]],
        negatives: list[list[str]],
        guided: bool,
        size: tuple[int, int],
    ) -> Conditioning:
        """The UNet's conditioning, both guidance branches batched (unconditional first).

        All prompts of a call are encoded in as many window chunks as the longest needs, so
        their states batch together; ``force_zeros_for_empty_prompt`` models (SDXL base) use
        zeros for the unconditional branch when no negative prompt is given.
        """
        device, dtype = self.device, self.dtype
        window = self.text[0].window
        zeros = request.negative_prompt is None and bool(
            self.config.get("force_zeros_for_empty_prompt", False)
        )

        def encode(texts: list[list[str]], chunks: int) -> TextEmbeddings:
            return encode_prompts(
                self.text,
                texts,
                chunks=chunks,
                layer=self.spec.text_layer,
                clip_skip=request.clip_skip,
                device=device,
                dtype=dtype,
                syntax=request.prompt_syntax,
            )

        need_negative = guided and request.negative_prompt_embeds is None and not zeros
        if request.prompt_embeds is None:
            lists = prompts + (negatives if need_negative else [])
            syntax = request.prompt_syntax
            chunks = max(
                t.chunks(p, syntax=syntax) for t, p in zip(self.text * 2, lists, strict=False)
            )
            text = encode(prompts, chunks)
        else:
            text = TextEmbeddings(
                request.prompt_embeds.to(device=device, dtype=dtype),
                _to(request.pooled_prompt_embeds, device, dtype),
            )
            chunks = text.hidden.shape[1] // window
        cond = Conditioning(
            text.hidden, self.spec.vector(self, request, text, size=size, negative=False)
        )
        if not guided:
            return cond
        if request.negative_prompt_embeds is not None:
            negative = TextEmbeddings(
                request.negative_prompt_embeds.to(device=device, dtype=dtype),
                _to(request.negative_pooled_prompt_embeds, device, dtype),
            )
        elif zeros:
            pooled = None if text.pooled is None else torch.zeros_like(text.pooled)
            negative = TextEmbeddings(torch.zeros_like(text.hidden), pooled)
        else:
            if chunks * window != text.hidden.shape[1] or any(
                t.chunks(n, syntax=request.prompt_syntax) > chunks
                for t, n in zip(self.text, negatives, strict=True)
            ):
                raise InvalidArgumentError(
                    f"the negative prompt needs more tokens than the prompt embeddings' "
                    f"{text.hidden.shape[1]}; shorten it or pass negative_prompt_embeds"
                )
            negative = encode(negatives, chunks)
        uncond = Conditioning(
            negative.hidden, self.spec.vector(self, request, negative, size=size, negative=True)
        )
        return Conditioning.guided(uncond, cond)

    def _denoise(
        self,
        sched: Scheduler,
        model: Any,
        start: Start,
        steps: int,
        first: int,
        last: int,
        generators: Generators,
        request: Request,
    ) -> torch.Tensor:
        """Run the sampler over positions [first, last), keeping an inpainting blend and
        calling the callback after every network evaluation."""
        from tqdm.auto import tqdm

        # A handoff resumes from its latents; only then is `resume` passed, so schedulers
        # written before it existed keep working.
        given = {"resume": start.resume} if start.resume is not None else {"init": start.init}
        run = sched.sample(
            model, start.noise, steps=steps, generator=generators, start=first, **given
        )
        latents = start.noise
        replacement: torch.Tensor | None = None
        bar = tqdm(total=last - first, disable=not request.progress, desc="denoising", leave=False)
        with bar:
            for _ in range(last - first):
                step = run.send(replacement)
                latents, replacement = step.sample, None
                if not bool(torch.isfinite(latents).all()):
                    # Never decode NaN into a black image and call it a result.
                    raise NonFiniteError(
                        f"the latents became NaN/inf at step {step.index + 1} of {last - first}"
                        f"{self._nonfinite_cause((self.unet, *(t.text_encoder for t in self.text)))}"
                    )
                if start.blend is not None:
                    # Keep the known region: the original latents, noised to the level the
                    # sampler has reached, outside the mask (the last step keeps them clean).
                    mask, known = start.blend
                    following = first + step.index + 1
                    if following < last:
                        known = sched.noised(known, start.noise, steps=steps, index=following)
                    latents = replacement = (1 - mask) * known + mask * latents
                    step = dataclasses.replace(step, sample=latents)
                bar.update(1)
                if request.callback is not None:
                    sent = request.callback(step)
                    if isinstance(sent, torch.Tensor):
                        # diffusers' callback_on_step_end may replace the latents; so may ours.
                        if sent.shape != latents.shape:
                            raise InvalidArgumentError(
                                f"the callback returned latents of shape {tuple(sent.shape)}, "
                                f"expected {tuple(latents.shape)}"
                            )
                        latents = replacement = sent.to(latents)
            run.close()
        return latents

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels of ``latents``; a half-precision autoencoder that overflows is retried in
        float32 with a warning (as A1111 does), and NaN/inf is never returned as an image."""
        assert self.runtime is not None
        tiling = self.runtime.tiling
        decoded = self.vae.decode(latents.to(self._vae_dtype), tiling=tiling)
        if bool(torch.isfinite(decoded).all()):
            return decoded
        if self._vae_dtype in (torch.float16, torch.bfloat16):
            logger.warning(
                "%s: the %s autoencoder overflowed while decoding; decoding again in float32",
                self.name,
                self._vae_dtype,
            )
            wide = copy.deepcopy(self.vae).float()
            decoded = wide.decode(latents.float(), tiling=tiling)
            if bool(torch.isfinite(decoded).all()):
                return decoded
        raise NonFiniteError(
            f"the autoencoder decoded NaN/inf pixels{self._nonfinite_cause((self.vae,))}"
        )

    def _nonfinite_cause(self, modules: Sequence[torch.nn.Module]) -> str:
        """What most likely made NaN: a non-finite weight (named), else half-precision overflow."""
        bad = [
            f"{type(m).__name__}.{name}"
            for m in modules
            for name, tensor in m.state_dict().items()
            if tensor.is_floating_point()
            and not tensor.is_meta  # weights a backend never needed to read
            and not bool(torch.isfinite(tensor).all())
        ]
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            return (
                f": the weights hold NaN/inf ({', '.join(bad[:3])}{more}); the model file is broken"
            )
        if self.dtype in (torch.float16, torch.bfloat16):
            return (
                f": likely a {DTYPE_NAMES[self.dtype]} overflow; load the model with dtype='fp32' "
                "(or 'bf16' instead of 'fp16')"
            )
        return ": the weights are finite; try another scheduler, fewer steps or lower guidance"

    @property
    def _vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def _encode(self, pixels: torch.Tensor, generators: Generators) -> torch.Tensor:
        """Scaled latents of ``pixels``, sampled from the posterior as diffusers does: one
        image per generator when there is a list of them."""
        assert self.runtime is not None
        self.runtime.materialize("vae")  # the encoder runs in torch on every backend
        tiling = self.runtime.tiling
        pixels = pixels.to(self._vae_dtype)
        if isinstance(generators, Sequence):
            latents = torch.cat(
                [
                    self.vae.encode(pixels[i : i + 1], generator=generators[i], tiling=tiling)
                    for i in range(pixels.shape[0])
                ]
            )
        else:
            latents = self.vae.encode(pixels, generator=generators, tiling=tiling)
        return latents.to(self.dtype)


def _identity(parts: Parts, runtime: Runtime, dtype: torch.dtype) -> dict[str, str]:
    """Names of the UNet's and autoencoder's weights for a backend's disk cache
    (`latentkit.backends.weight_identity`): only the OpenVINO backend needs them, and
    naming them reads the first MiB of each file."""
    if runtime.performance.backend == "torch":
        return {}
    from latentkit.backends import weight_identity

    return {
        c: weight_identity(
            parts.source(c), extra=[str(dtype), json.dumps(parts.configs[c], sort_keys=True)]
        )
        for c in ("unet", "vae")
        if parts.source(c)
    }


def rescale_guidance(out: torch.Tensor, out_text: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale, Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps
    are Flawed") eqs. 15-16: match the guided output's std to the text-conditioned one's."""
    dims = list(range(1, out.ndim))
    rescaled = out * (out_text.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * out


def _to(
    value: torch.Tensor | None, device: torch.device, dtype: torch.dtype
) -> torch.Tensor | None:
    return None if value is None else value.to(device=device, dtype=dtype)


def _generators(request: Request, batch: int) -> tuple[Generators, list[int]]:
    """The generator(s) a call draws from and each image's seed, for the PNG.

    One int seed (or none) gives one CPU generator for the batch, a list one per image, as
    diffusers draws them; ``generator=`` is used as given, its initial seed recorded.
    """
    if request.generator is not None:
        given = request.generator
        if isinstance(given, torch.Generator):
            return given, [given.initial_seed()] * batch
        if len(given) != batch:
            raise InvalidArgumentError(
                f"got {len(given)} generators for {batch} images; give one or one per image"
            )
        return list(given), [g.initial_seed() for g in given]
    seeds = _seeds(request.seed, batch)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    if request.seed is None or is_int(request.seed):
        return generators[0], seeds  # one generator for the batch, as diffusers draws it
    return generators, seeds


def _seeds(seed: Seeds, batch: int) -> list[int]:
    """One seed per image. One int seeds one generator for the whole batch (its first image
    keeps the seed); ``None`` draws a fresh seed so the result can still be reproduced."""
    if seed is None:
        seed = random.SystemRandom().randrange(2**32)
    given: list[object] = (
        [seed] * batch if is_int(seed) else list(seed) if isinstance(seed, Sequence) else []
    )
    seeds = [int(s) for s in given if is_int(s)]  # type: ignore[call-overload]
    if len(seeds) != batch or len(given) != batch or not all(-(2**63) <= s < 2**64 for s in seeds):
        raise InvalidArgumentError(
            f"seed must be an int in [-2**63, 2**64), None, or a list of {batch} such ints "
            f"(one per image); got {seed!r}"
        )
    return seeds


if TYPE_CHECKING:
    # mypy proves that the built-in components satisfy the protocols they are used as.
    from latentkit.models.autoencoder import AutoencoderKL as _AutoencoderKL
    from latentkit.protocols import Autoencoder, Conditioner, Pipeline

    _pipeline: type[Pipeline] = LatentDiffusion
    _autoencoder: type[Autoencoder] = _AutoencoderKL
    _conditioner: type[Conditioner[Sequence[str]]] = TextConditioner

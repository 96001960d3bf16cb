"""The keywords of a generation, declared once: `Request` and its checks.

`latentkit.generate`, ``pipeline.generate`` and the CLI all build one `Request`; its fields are
the keywords they take, each checked here (type, finiteness, range) before any network
runs. A family-specific keyword (``prompt_2`` for SDXL) is declared here too and accepted only
by the families that list it in ``Family.options``; everything else about a family lives in
`latentkit.pipelines`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from latentkit.errors import InvalidArgumentError
from latentkit.images import ImageInput
from latentkit.protocols import Callback, Scheduler, Seeds
from latentkit.results import OUTPUT_TYPES, OutputType
from latentkit.schedulers.custom import CustomSchedule

Prompts = str | Sequence[str]
"""A prompt, or one prompt per batch item."""

Size = tuple[int, int]
"""(height, width) in pixels."""


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Upper bounds on one call's work, checked before anything is allocated.

    Raise them with `set_limits` (or the environment variables ``LATENTKIT_MAX_PIXELS``,
    ``LATENTKIT_MAX_IMAGES``, ``LATENTKIT_MAX_STEPS``, ``LATENTKIT_MAX_INPUT_PIXELS``).
    """

    max_pixels: int = 4096 * 4096
    """Most pixels of one output image (height × width): SDXL's 1024² × 16."""
    max_images: int = 64
    """Most images one call makes (prompts × ``num_images``)."""
    max_steps: int = 10_000
    """Most denoising steps (DDPM's full schedule is 1000)."""
    max_input_pixels: int = 8192 * 8192
    """Most pixels of an image given as input (checked from its header, before decoding)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _int_at_least(f.name, getattr(self, f.name), 1)


def limits() -> Limits:
    """The limits in force (see `Limits`)."""
    return _limits


def set_limits(**changes: int) -> Limits:
    """Change the limits for this process (e.g. ``set_limits(max_pixels=8192**2)``); returns
    the new `Limits`. An unknown name or a value below 1 is an `InvalidArgumentError`."""
    global _limits
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(Limits)})
    if unknown:
        raise InvalidArgumentError(f"unknown limit {', '.join(unknown)}; see latentkit.Limits")
    _limits = dataclasses.replace(_limits, **changes)
    return _limits


@dataclass(frozen=True, kw_only=True)
class Request:
    """Every keyword ``generate`` takes, with its default. Invalid values raise
    `InvalidArgumentError` when the request is built, before any work."""

    prompt: Prompts | None = None
    """A prompt, or a list of prompts (``num_images`` images each)."""
    negative_prompt: Prompts | None = None
    """What to steer away from (the unconditional branch of guidance)."""
    prompt_2: Prompts | None = None
    """SDXL: the prompt for the second text encoder (OpenCLIP bigG); default: ``prompt``."""
    negative_prompt_2: Prompts | None = None
    """SDXL: the negative prompt for the second text encoder; default: ``negative_prompt``."""
    steps: int | None = None
    """Denoising steps; ``None``: the model's recommendation, else 50."""
    guidance_scale: float | None = None
    """Classifier-free guidance weight (Ho & Salimans 2022, eq. 6); ≤ 1 turns guidance off.
    ``None``: the model's recommendation, else the family's default (7.5 SD, 5.0 SDXL)."""
    guidance_rescale: float = 0.0
    """Rescale factor φ of Lin et al. 2024, eqs. 15-16 (0 = off)."""
    guidance_interval: tuple[float, float] | None = None
    """Guide only at noise levels σ in ``(low, high]`` (Kynkäänniemi et al. 2024,
    `latentkit.guidance`): outside it only the conditional branch runs, at half the UNet
    batch. σ is ``sqrt((1 - ᾱ_t) / ᾱ_t)`` of the evaluated timestep (0.03 to 14.6 on Stable
    Diffusion's schedule); the paper's choice for SDXL is ``(0.28, 5.42)``; ``high`` may be
    ``math.inf``. None: guidance at every evaluation."""
    feature_cache: int | None = None
    """DeepCache (Ma et al. 2024): run the whole UNet every ``feature_cache`` evaluations
    and, in between, only its shallowest layers on the deep feature kept from the last full
    one (`latentkit.models.unet.FeatureCache`); 1 is the plain result. None: off."""
    scheduler: str | Scheduler | None = None
    """A scheduler name (see ``latentkit.schedulers.names()``) or object; ``None``: the model's."""
    timesteps: Sequence[float] | None = None
    """This call's model timesteps, one per step in sampling (descending) order, instead of
    the scheduler's spacing (diffusers' ``timesteps=``); ``steps`` is their count. Taken by
    the schedulers whose diffusers class takes them (`latentkit.schedulers.custom`)."""
    sigmas: Sequence[float] | None = None
    """This call's noise levels ``sqrt((1 - alpha_bar) / alpha_bar)``, descending, the final one
    included (``n + 1`` values for ``n`` steps, e.g. Align Your Steps' published 11 ending at
    0), instead of the scheduler's (diffusers' ``sigmas=``; Euler takes them)."""
    seed: Seeds = None
    """An int (one CPU generator for the batch, as diffusers'
    ``torch.Generator("cpu").manual_seed(seed)``), one int per image, or ``None`` (fresh)."""
    generator: torch.Generator | Sequence[torch.Generator] | None = None
    """diffusers' convention instead of ``seed``: a ``torch.Generator`` for the batch or one per
    image, drawn from as given (its state advances); the PNG records each one's initial seed."""
    latents: torch.Tensor | None = None
    """Start from this noise (B, C, h, w) instead of drawing it (diffusers' ``latents``)."""
    prompt_syntax: Literal["a1111", "plain"] = "a1111"
    """``"a1111"``: ``(word:1.3)`` / ``[word]`` weight words; ``"plain"``: brackets are text."""
    height: int | None = None
    """Image height in pixels, a multiple of 8; ``None``: the input image's or the model's."""
    width: int | None = None
    """Image width in pixels, likewise."""
    num_images: int = 1
    """Images per prompt."""
    output_type: OutputType = "pil"
    """``"pil"``, ``"np"``, ``"pt"`` or ``"latent"`` (the denoised latents, e.g. for a refiner)."""
    callback: Callback | None = None
    """Called with a `latentkit.SamplerStep` after every network evaluation."""
    progress: bool = True
    """Show a progress bar on stderr."""
    clip_skip: int | None = None
    """Condition on the text encoder's layer this many before the usual one (A1111 and
    diffusers count 1 as the penultimate layer for SD 1.x/2.x)."""
    prompt_embeds: torch.Tensor | None = None
    """Precomputed text embeddings (batch, tokens, width) instead of ``prompt``."""
    negative_prompt_embeds: torch.Tensor | None = None
    """Precomputed embeddings for the negative prompt, same shape."""
    pooled_prompt_embeds: torch.Tensor | None = None
    """SDXL: the pooled text embedding (batch, width) that goes with ``prompt_embeds``."""
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    """SDXL: the pooled embedding that goes with ``negative_prompt_embeds``."""
    image: ImageInput | None = None
    """Start from this picture (image-to-image; with ``mask_image``, inpainting): a PIL image,
    an array (H, W, 3) or tensor (3, H, W) in [0, 1], a path, or latents (4, h, w) /
    (B, 4, h, w) such as ``output_type="latent"`` returns (a base→refiner handoff)."""
    mask_image: ImageInput | None = None
    """Where to repaint (white) and what to keep (black); resized to the image."""
    strength: float | None = None
    """How much of the schedule runs with ``image``, in [0, 1]; default: the family's
    (0.8 SD image-to-image, 0.3 SDXL image-to-image), 1.0 for inpainting."""
    outpaint: tuple[int, int, int, int] | None = None
    """Outpainting: extend ``image``'s canvas by ``(left, top, right, bottom)`` pixels
    (multiples of the autoencoder's factor, 8) and generate the new area so it continues the
    picture; the output is the larger canvas, with the picture's pixels unchanged outside a
    seam of 8 pixels (`latentkit.outpainting`). Inpainting models fill it with their extra
    channels, any other model by blending."""
    depth_map: ImageInput | None = None
    """Depth-to-image models: the depth to follow (grey image, array or tensor (H, W))."""
    control_image: ImageInput | Sequence[ImageInput] | None = None
    """ControlNet (``pipeline.with_controlnet``): the control image (edges, depth, pose...),
    or a list with one per ControlNet in the order they were attached; resized to the output
    size (text-to-image without ``height``/``width`` takes the first one's size)."""
    control_scale: float | Sequence[float] | None = None
    """How strongly the ControlNets steer (diffusers' ``controlnet_conditioning_scale``):
    one number for all, or one per ControlNet. ``None``: diffusers' default for the task,
    1.0 for text-to-image, 0.8 for image-to-image, 0.5 for inpainting (SDXL: 1.0)."""
    control_start: float | Sequence[float] = 0.0
    """The fraction of the run's evaluations before which a ControlNet is off (diffusers'
    ``control_guidance_start``); one for all, or one per ControlNet."""
    control_end: float | Sequence[float] = 1.0
    """The fraction of the run's evaluations after which a ControlNet is off (diffusers'
    ``control_guidance_end``); above ``control_start``."""
    guess_mode: bool = False
    """ControlNet guess mode: the ControlNets steer only the conditional branch of guidance,
    with residuals scaled from 0.1 (finest) to 1 (middle block), so the control image is
    followed even without a prompt (Zhang et al. 2023, sec. 4.1; guidance 3-5 recommended)."""
    denoising_start: float | None = None
    """Start this fraction of the way through the schedule from ``image`` as it is (no noise
    added): the refiner's half of an ensemble-of-experts handoff. Overrides ``strength``."""
    denoising_end: float | None = None
    """Stop this fraction of the way through the schedule (with ``output_type="latent"``, the
    base's half of a handoff)."""
    original_size: Size | None = None
    """SDXL micro-conditioning (Podell et al. 2023, sec. 2.2): the size the model should
    imagine the training image had; default: the output size."""
    target_size: Size | None = None
    """SDXL micro-conditioning: the intended output size; default: the output size."""
    crops_coords_top_left: tuple[int, int] = (0, 0)
    """SDXL micro-conditioning: the crop's top-left corner (0, 0 for centred subjects)."""
    negative_original_size: Size | None = None
    """SDXL: ``original_size`` for the unconditional branch; default: ``original_size``."""
    negative_target_size: Size | None = None
    """SDXL: ``target_size`` for the unconditional branch; default: ``target_size``."""
    negative_crops_coords_top_left: tuple[int, int] | None = None
    """SDXL: the crop corner for the unconditional branch; default: ``crops_coords_top_left``
    (the refiner: (0, 0), as diffusers)."""
    aesthetic_score: float = 6.0
    """SDXL refiner micro-conditioning: the aesthetic score to imitate (LAION scale)."""
    negative_aesthetic_score: float = 2.5
    """SDXL refiner: the aesthetic score of the unconditional branch."""
    noise_level: int = 20
    """x4 upscaler: how much noise (a step of its low-resolution DDPM schedule, 0 to the
    model's ``max_noise_level``, 350) is added to the input before the UNet reads it; more
    lets the model invent more detail and follow the input less."""

    def __post_init__(self) -> None:
        _check_prompts("prompt", self.prompt)
        for name in ("negative_prompt", "prompt_2", "negative_prompt_2"):
            _check_prompts(name, getattr(self, name))
        _int_at_least("steps", self.steps, 1, optional=True)
        self._check_schedule()
        _int_at_least("num_images", self.num_images, 1)
        _int_at_least("clip_skip", self.clip_skip, 0, optional=True)
        _number_in("guidance_scale", self.guidance_scale, 0.0, 1e4, optional=True)
        _number_in("guidance_rescale", self.guidance_rescale, 0.0, 1.0)
        _check_interval(self.guidance_interval)
        if self.guidance_interval is not None:
            object.__setattr__(self, "guidance_interval", tuple(self.guidance_interval))
        _int_at_least("feature_cache", self.feature_cache, 1, optional=True)
        _number_in("strength", self.strength, 0.0, 1.0, optional=True)
        for name in ("denoising_start", "denoising_end"):
            value = getattr(self, name)
            _number_in(name, value, 0.0, 1.0, optional=True)
            if value is not None and not 0.0 < value < 1.0:
                raise InvalidArgumentError(
                    f"{name} must be strictly between 0 and 1, got {value!r}"
                )
        if (
            self.denoising_start is not None
            and self.denoising_end is not None
            and self.denoising_start >= self.denoising_end
        ):
            raise InvalidArgumentError(
                f"denoising_start ({self.denoising_start}) must be below denoising_end "
                f"({self.denoising_end})"
            )
        _number_in("aesthetic_score", self.aesthetic_score, -1e3, 1e3)
        _number_in("negative_aesthetic_score", self.negative_aesthetic_score, -1e3, 1e3)
        _int_at_least("noise_level", self.noise_level, 0)
        _check_outpaint(self.outpaint)
        if self.outpaint is not None:
            object.__setattr__(self, "outpaint", tuple(self.outpaint))
        for name in ("height", "width"):
            _int_at_least(name, getattr(self, name), 1, optional=True)
        for name in (
            "original_size",
            "target_size",
            "crops_coords_top_left",
            "negative_original_size",
            "negative_target_size",
            "negative_crops_coords_top_left",
        ):
            _check_pair(name, getattr(self, name), low=0 if "crops" in name else 1)
        if self.output_type not in OUTPUT_TYPES:
            raise InvalidArgumentError(
                f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {self.output_type!r}"
            )
        if not isinstance(self.progress, bool):
            raise InvalidArgumentError(f"progress must be True or False, got {self.progress!r}")
        if self.prompt_syntax not in ("a1111", "plain"):
            raise InvalidArgumentError(
                f"prompt_syntax must be 'a1111' or 'plain', got {self.prompt_syntax!r}"
            )
        if self.generator is not None:
            items = (
                [self.generator] if isinstance(self.generator, torch.Generator) else self.generator
            )
            if (
                not isinstance(items, Sequence)
                or not items
                or not all(isinstance(g, torch.Generator) for g in items)
            ):
                raise InvalidArgumentError(
                    "generator must be a torch.Generator or a non-empty list of them"
                )
            if self.seed is not None:
                raise InvalidArgumentError("pass seed or generator, not both")
        if self.latents is not None:
            _check_tensor("latents", self.latents, ndim=4)
        if self.callback is not None and not callable(self.callback):
            raise InvalidArgumentError("callback must be callable")
        for name in (
            "prompt_embeds",
            "negative_prompt_embeds",
            "pooled_prompt_embeds",
            "negative_pooled_prompt_embeds",
        ):
            value = getattr(self, name)
            if value is not None:
                _check_tensor(name, value, ndim=2 if "pooled" in name else 3)
        self._check_limits()
        if (self.prompt is None) == (self.prompt_embeds is None):
            raise InvalidArgumentError("pass either prompt or prompt_embeds (exactly one)")
        if self.negative_prompt is not None and self.negative_prompt_embeds is not None:
            raise InvalidArgumentError("pass negative_prompt or negative_prompt_embeds, not both")
        if self.prompt_2 is not None and self.prompt is None:
            raise InvalidArgumentError("prompt_2 goes with prompt, not with prompt_embeds")
        self._check_control()
        if self.image is None:
            for name in ("mask_image", "strength", "denoising_start", "outpaint"):
                if getattr(self, name) is not None:
                    raise InvalidArgumentError(f"{name} needs image= (the picture to start from)")
        if self.outpaint is not None:
            for name in ("mask_image", "height", "width"):
                if getattr(self, name) is not None:
                    raise InvalidArgumentError(
                        f"{name} does not go with outpaint: the margins are the repainted area "
                        "and the canvas is the image plus the margins"
                    )

    def _check_schedule(self) -> None:
        """``timesteps`` / ``sigmas``: values, not both, and ``steps`` (if given) their count."""
        if self.timesteps is not None and self.sigmas is not None:
            raise InvalidArgumentError("pass timesteps or sigmas, not both")
        for kind in ("timesteps", "sigmas"):
            value = getattr(self, kind)
            if value is None:
                continue
            custom = CustomSchedule(kind, value)  # checks the values
            object.__setattr__(self, kind, custom.values)
            if self.steps is not None and self.steps != custom.steps:
                raise InvalidArgumentError(
                    f"steps={self.steps} disagrees with the {len(custom.values)} {kind} given "
                    f"({custom.steps} steps); leave steps out"
                )

    def _check_control(self) -> None:
        """The ``control_*`` keywords' types and ranges (their count against the attached
        ControlNets is the pipeline's check)."""
        image = self.control_image
        if isinstance(image, (list, tuple)) and not image:
            raise InvalidArgumentError("control_image must be an image or a non-empty list")
        for name, low, high in (
            ("control_scale", -1e3, 1e3),
            ("control_start", 0.0, 1.0),
            ("control_end", 0.0, 1.0),
        ):
            value = getattr(self, name)
            if value is None and name == "control_scale":
                continue  # the task's default
            values = list(value) if isinstance(value, (list, tuple)) else [value]
            if not values:
                raise InvalidArgumentError(f"{name} must be a number or a non-empty list")
            for v in values:
                _number_in(name, v, low, high)
        start, end = self.control_start, self.control_end
        if is_real(start) and is_real(end) and start >= end:  # type: ignore[operator]
            raise InvalidArgumentError(f"control_start ({start}) must be below control_end ({end})")
        if not isinstance(self.guess_mode, bool):
            raise InvalidArgumentError(f"guess_mode must be True or False, got {self.guess_mode!r}")
        if image is None:
            for name in ("control_scale", "control_start", "control_end", "guess_mode"):
                if name in self.given():
                    raise InvalidArgumentError(
                        f"{name} needs control_image= (and a ControlNet: pipe.with_controlnet)"
                    )

    def _check_limits(self) -> None:
        """The work this request asks for, against `limits` (before any allocation)."""
        bounds = limits()
        how = "raise it with latentkit.set_limits({}=...) or LATENTKIT_{}"
        steps = self.steps
        for values, extra in ((self.timesteps, 0), (self.sigmas, 1)):
            if values is not None:
                steps = len(values) - extra
        if steps is not None and steps > bounds.max_steps:
            raise InvalidArgumentError(
                f"steps={steps} exceeds the limit of {bounds.max_steps}; "
                + how.format("max_steps", "MAX_STEPS")
            )
        if self.height is not None and self.width is not None:
            pixels = self.height * self.width
            if pixels > bounds.max_pixels:
                raise InvalidArgumentError(
                    f"{self.height}x{self.width} = {pixels:,} pixels exceeds the limit of "
                    f"{bounds.max_pixels:,} per image; " + how.format("max_pixels", "MAX_PIXELS")
                )
        for name in ("height", "width"):
            side = getattr(self, name)
            if side is not None and side > bounds.max_pixels:
                raise InvalidArgumentError(
                    f"{name}={side} exceeds the limit of {bounds.max_pixels:,} pixels per image; "
                    + how.format("max_pixels", "MAX_PIXELS")
                )
        prompts = 1
        for value in (self.prompt, self.prompt_embeds):
            if isinstance(value, torch.Tensor):
                prompts = value.shape[0]
            elif isinstance(value, Sequence) and not isinstance(value, str):
                prompts = len(value)
        images = prompts * self.num_images
        if images > bounds.max_images:
            raise InvalidArgumentError(
                f"{prompts} prompt(s) x num_images={self.num_images} = {images} images exceeds "
                f"the limit of {bounds.max_images} per call; "
                + how.format("max_images", "MAX_IMAGES")
            )

    @classmethod
    def create(cls, prompt: Prompts | None = None, /, **options: Any) -> Request:
        """A request from ``generate``'s arguments; an unknown keyword is an
        `InvalidArgumentError` that names the closest valid ones."""
        unknown = sorted(set(options) - set(FIELDS))
        if unknown:
            hints = [
                f"{name!r} (did you mean {', '.join(map(repr, close))}?)"
                if (close := difflib.get_close_matches(name, FIELDS, n=2))
                else repr(name)
                for name in unknown
            ]
            raise InvalidArgumentError(
                f"unknown keyword {', '.join(hints)}; generate takes {', '.join(FIELDS)}"
            )
        if prompt is not None and "prompt" in options:
            raise InvalidArgumentError("prompt was given twice (positionally and as a keyword)")
        if prompt is not None:
            options["prompt"] = prompt
        return cls(**options)

    def given(self) -> dict[str, Any]:
        """The fields that differ from their defaults (what the caller set)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if not _same(getattr(self, f.name), f.default)
        }


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Request))
"""The keyword names ``generate`` takes, in declaration order."""


def _same(value: object, default: object) -> bool:
    if isinstance(value, torch.Tensor) or isinstance(default, torch.Tensor):
        return value is default
    try:
        return bool(value == default)
    except Exception:  # arrays and other objects without a boolean ==
        return value is default


def is_int(value: object) -> bool:
    """An integer that is not a bool (``True`` is an int in Python, never a count here)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """A finite real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _int_at_least(name: str, value: object, low: int, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not is_int(value) or value < low:  # type: ignore[operator]
        raise InvalidArgumentError(f"{name} must be an int ≥ {low}, got {value!r}")


def _number_in(
    name: str, value: object, low: float, high: float, *, optional: bool = False
) -> None:
    if value is None and optional:
        return
    if not is_real(value) or not low <= value <= high:  # type: ignore[operator]
        raise InvalidArgumentError(
            f"{name} must be a finite number in [{low:g}, {high:g}], got {value!r}"
        )


def _check_pair(name: str, value: object, *, low: int) -> None:
    if value is None:
        return
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or len(value) != 2
        or not all(is_int(v) and low <= v <= 2**20 for v in value)
    ):
        raise InvalidArgumentError(
            f"{name} must be a pair of ints (height, width) / (top, left) in [{low}, 2**20], "
            f"got {value!r}"
        )


def _check_outpaint(value: object) -> None:
    if value is None:
        return
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or len(value) != 4
        or not all(is_int(v) and 0 <= v <= 2**20 for v in value)
        or not any(value)
    ):
        raise InvalidArgumentError(
            "outpaint must be four ints (left, top, right, bottom) in [0, 2**20], not all 0; "
            f"got {value!r}"
        )


def _check_interval(value: object) -> None:
    if value is None:
        return
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or len(value) != 2
        or not is_real(value[0])
        or not (is_real(value[1]) or value[1] == math.inf)
        or not 0 <= value[0] < value[1]
    ):
        raise InvalidArgumentError(
            "guidance_interval must be two noise levels (low, high) with 0 <= low < high "
            f"(high may be math.inf); got {value!r}"
        )


def _check_prompts(name: str, value: object) -> None:
    if value is None or isinstance(value, str):
        return
    if not isinstance(value, Sequence) or not value or not all(isinstance(p, str) for p in value):
        raise InvalidArgumentError(
            f"{name} must be a string or a non-empty list of strings, got {type(value).__name__}"
        )


def _check_tensor(name: str, value: object, *, ndim: int) -> None:
    if not isinstance(value, torch.Tensor) or value.ndim != ndim or not value.is_floating_point():
        shape = {2: "(batch, width)", 3: "(batch, tokens, width)", 4: "(batch, C, h, w)"}[ndim]
        raise InvalidArgumentError(f"{name} must be a float tensor of shape {shape}")
    if not bool(torch.isfinite(value).all()):
        raise InvalidArgumentError(f"{name} contains NaN or infinite values")


def as_list(value: Prompts) -> list[str]:
    """A prompt or prompts as a list (the request has checked the types)."""
    return [value] if isinstance(value, str) else list(value)


FAMILY_OPTIONS = frozenset(
    {
        "prompt_2",
        "negative_prompt_2",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
        "original_size",
        "target_size",
        "crops_coords_top_left",
        "negative_original_size",
        "negative_target_size",
        "negative_crops_coords_top_left",
        "aesthetic_score",
        "negative_aesthetic_score",
        "noise_level",
    }
)
"""Keywords only some families take (SDXL's second prompt, pooled embeddings and
micro-conditioning, the x4 upscaler's ``noise_level``); a family lists those it accepts in
``Family.options``."""


# Read once at import: the environment can raise the limits without code changes.
_limits = Limits(
    **{
        f.name: int(value)
        for f in dataclasses.fields(Limits)
        if (value := os.environ.get(f"LATENTKIT_{f.name.upper()}", "")).isdigit()
    }
)

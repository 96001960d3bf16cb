"""Image tasks: what a call starts from besides noise, shared by every family.

Image-to-image (a picture, or latents handed over from another model), inpainting (by a
9-channel UNet or by blending), depth-to-image, outpainting, and a family's own extra input
channels: the inputs are read and checked before any network runs (`image_inputs`), then
turned into the sampler's start (`start`): noise, clean latents, extra channels, the blend.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from latentkit import images
from latentkit.conditioners.depth import DepthConditioner, DepthInput
from latentkit.conditioners.mask import MaskConditioner, MaskedImage
from latentkit.errors import InvalidArgumentError
from latentkit.noise import first_generator, randn
from latentkit.outpainting import Outpaint, check_margins, extend
from latentkit.protocols import Generators
from latentkit.request import Request, is_int, limits

if TYPE_CHECKING:
    from latentkit.pipelines.base import LatentDiffusion


@dataclass(frozen=True)
class ImageInputs:
    """The image inputs of one call, read and resized (see `latentkit.images`)."""

    pixels: torch.Tensor | None
    """(1, 3, H, W) in [-1, 1]; None when only a depth map or latents are given."""
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
    latents: torch.Tensor | None = None
    """Given latents (B, C, h, w), already scaled (a base model's ``output_type="latent"``)."""
    paste: Outpaint | None = None
    """Outpainting: the picture to paste back over the decoded canvas (`Outpaint.paste`)."""

    @property
    def from_noise(self) -> bool:
        """Sampling starts from pure noise: depth-only text-to-image, or inpainting at full
        strength (image-to-image always starts from the noised picture)."""
        if self.pixels is None and self.latents is None:
            return True
        return self.mask is not None and self.strength == 1.0


@dataclass(frozen=True)
class Start:
    """Where sampling starts, and what stays fixed while it runs."""

    noise: torch.Tensor
    init: torch.Tensor | None = None
    """Clean latents to noise to the start position (image-to-image)."""
    resume: torch.Tensor | None = None
    """Latents already at the start position (``denoising_start``: a handoff)."""
    concat: torch.Tensor | None = None
    """Extra UNet input channels (inpainting models' mask and picture, a depth map)."""
    blend: tuple[torch.Tensor, torch.Tensor] | None = None
    """(mask, known latents): a 4-channel model inpaints by keeping the known region."""


def image_inputs(pipe: LatentDiffusion, request: Request) -> ImageInputs | None:
    """Read and check the image inputs (cheap: before any network runs)."""
    image, mask_image, depth_map = request.image, request.mask_image, request.depth_map
    channels = pipe.unet.config.in_channels
    if pipe.spec.image_conditions:
        # The family reads image= itself (`Family.concat`): nothing starts from it.
        for name in ("mask_image", "strength", "depth_map", "outpaint", "denoising_start"):
            if getattr(request, name) is not None:
                raise InvalidArgumentError(
                    f"{name} does not go with {pipe.name} (family {pipe.family}): its "
                    "image= is the input it conditions on, not a picture to start from"
                )
        return None
    outpaint = request.outpaint
    if depth_map is not None and channels != 5:
        raise InvalidArgumentError(
            f"depth_map needs a depth-to-image model (in_channels=5); {pipe.name} has "
            f"in_channels={channels}"
        )
    if (mask_image is not None or outpaint is not None) and channels == 5:
        raise InvalidArgumentError(
            f"{pipe.name} is a depth-to-image model (in_channels=5): it cannot inpaint"
        )
    if channels == 9 and (image is None or mask_image is None) and outpaint is None:
        raise InvalidArgumentError(
            f"{pipe.name} is an inpainting model (in_channels=9): pass image= and mask_image="
        )
    if channels == 5 and image is None and depth_map is None:
        raise InvalidArgumentError(
            f"{pipe.name} is a depth-to-image model (in_channels=5): pass image= or depth_map="
        )
    if channels == 5 and image is not None and depth_map is None and pipe.depth is None:
        raise InvalidArgumentError(f"{pipe.name} has no depth estimator: pass depth_map=")
    if image is None and depth_map is None:
        return None
    repaints = mask_image is not None or outpaint is not None
    default = pipe.spec.inpaint_strength if repaints else pipe.spec.img2img_strength
    strength = default if request.strength is None else request.strength
    for label, value in (("height", request.height), ("width", request.width)):
        if value is not None:
            check_size(label, value, pipe.vae.scale_factor)
    latents = given_latents(pipe, image)
    if latents is not None:
        if repaints or channels != 4:
            raise InvalidArgumentError(
                "latents as image= work for image-to-image only (no mask or outpaint, a "
                "4-channel UNet)"
            )
        factor = pipe.vae.scale_factor
        size = (latents.shape[-2] * factor, latents.shape[-1] * factor)
        if (request.height or size[0], request.width or size[1]) != size:
            raise InvalidArgumentError(
                f"height/width {request.height}x{request.width} do not match the given "
                f"latents' {size[0]}x{size[1]} pixels"
            )
        return ImageInputs(None, None, float(strength), size, latents=latents)
    picture = None if image is None else images.open_image(image, "image")
    if picture is not None and outpaint is not None:
        return outpaint_inputs(pipe, picture, outpaint, float(strength))
    depth = None if depth_map is None else images.open_image(depth_map, "depth_map")
    source = picture if picture is not None else depth
    assert source is not None
    if picture is None and (request.height is not None or request.width is not None):
        size = (request.height or pipe.default_size[0], request.width or pipe.default_size[1])
    else:
        size = images.target_size(source, request.height, request.width, pipe.vae.scale_factor)
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


def outpaint_inputs(
    pipe: LatentDiffusion, picture: Any, margins: tuple[int, int, int, int], strength: float
) -> ImageInputs:
    """Outpainting as inpainting: the canvas (the picture, its edges repeated into the
    margins), the margins plus a seam as the mask, and the picture to paste back."""
    factor = pipe.vae.scale_factor
    check_margins(margins, factor)
    own = images.target_size(picture, None, None, 1)
    if images.target_size(picture, None, None, factor) != own:
        raise InvalidArgumentError(
            f"outpainting keeps the image's pixels, so its size must be a multiple of "
            f"{factor}; it is {own[0]}x{own[1]}: crop it to "
            f"{own[0] - own[0] % factor}x{own[1] - own[1] % factor} first"
        )
    left, top, right, bottom = margins
    size = (own[0] + top + bottom, own[1] + left + right)
    if size[0] * size[1] > limits().max_pixels:  # before the canvas is allocated
        raise InvalidArgumentError(
            f"the outpainted canvas {size[0]}x{size[1]} exceeds the limit of "
            f"{limits().max_pixels:,} pixels; raise it with latentkit.set_limits(max_pixels=...)"
        )
    grown = extend(images.image_tensor(picture, own), margins)
    return ImageInputs(
        pixels=grown.canvas,
        mask=grown.mask,
        strength=strength,
        size=size,
        picture=picture,
        paste=grown,
    )


def given_latents(pipe: LatentDiffusion, image: Any) -> torch.Tensor | None:
    """``image`` as latents (B, C, h, w) if it is latents: a tensor (or list of tensors)
    with the autoencoder's latent channel count, as diffusers tells them apart."""
    if (
        isinstance(image, (list, tuple))
        and image
        and all(isinstance(t, torch.Tensor) for t in image)
    ):
        image = torch.stack(list(image))
    channels = pipe.vae.latent_channels
    if not isinstance(image, torch.Tensor) or image.shape[-3:-2] != (channels,):
        return None
    latents = image[None] if image.ndim == 3 else image
    if latents.ndim != 4 or not latents.is_floating_point():
        raise InvalidArgumentError(
            f"latents as image= must be a float tensor (B, {channels}, h, w), got "
            f"{tuple(image.shape)}"
        )
    if not bool(torch.isfinite(latents).all()):
        raise InvalidArgumentError("the latents given as image= contain NaN or inf")
    return latents


def start(
    pipe: LatentDiffusion,
    inputs: ImageInputs | None,
    shape: tuple[int, int, int, int],
    generators: Generators,
    request: Request,
) -> Start:
    """`_image_start`, with the family's extra UNet channels (`Family.concat`) after the
    image task's. They are made first: diffusers draws the x4 upscaler's low-resolution
    noise before the starting noise."""
    extra = pipe.spec.concat(
        pipe,
        request,
        latent_size=(shape[-2], shape[-1]),
        generator=first_generator(generators),
        device=pipe.device,
        dtype=pipe.dtype,
    )
    start = image_start(pipe, inputs, shape, generators, request)
    if extra is None:
        return start
    extra = extra.repeat(shape[0], 1, 1, 1)
    concat = extra if start.concat is None else torch.cat([start.concat, extra], dim=1)
    return dataclasses.replace(start, concat=concat)


def image_start(
    pipe: LatentDiffusion,
    inputs: ImageInputs | None,
    shape: tuple[int, int, int, int],
    generators: Generators,
    request: Request,
) -> Start:
    """Noise, clean latents to start from, extra UNet channels and the inpainting blend.

    The generator is drawn from in diffusers' order (picture latents, noise, masked
    picture latents), so a seed gives diffusers' image for the same task.
    """
    device, dtype = pipe.device, pipe.dtype
    batch = shape[0]
    given = request.latents
    if given is not None and tuple(given.shape) != shape:
        raise InvalidArgumentError(
            f"latents must have shape {shape} for this call, got {tuple(given.shape)}"
        )

    def draw() -> torch.Tensor:
        if given is not None:  # the caller's noise; the generator is not drawn from
            return given.to(device=device, dtype=dtype)
        return randn(shape, generator=generators, device=device, dtype=dtype)

    if inputs is None:
        return Start(draw())
    channels = pipe.unet.config.in_channels
    known = None
    if inputs.latents is not None:
        known = inputs.latents.to(device=device, dtype=dtype)
        if known.shape[0] not in (1, batch):
            raise InvalidArgumentError(
                f"got latents for {known.shape[0]} images as image= but the call makes "
                f"{batch}; give one or one per image"
            )
        known = known.expand(batch, -1, -1, -1)
        if request.denoising_start is not None:
            # A handoff: the latents are already at the start position, no noise added.
            return Start(known, resume=known)
    elif inputs.pixels is not None and not (channels == 9 and inputs.from_noise):
        pixels = inputs.pixels.to(device=device, dtype=dtype)
        if inputs.mask is None and isinstance(generators, list):
            pixels = pixels.repeat(batch, 1, 1, 1)  # image-to-image encodes one per generator
        known = pipe._encode(pixels, generators)
        known = known.repeat(batch // known.shape[0], 1, 1, 1)
        if request.denoising_start is not None and inputs.mask is None:
            return Start(known, resume=known)
    noise = draw()
    init = None if inputs.from_noise else known
    concat = None
    if channels == 5:
        depth = pipe.depth or DepthConditioner()
        value = DepthInput(
            latent_size=shape[-2:], depth_map=inputs.depth_map, picture=inputs.picture
        )
        concat = depth.encode(value, device=device, dtype=dtype).repeat(batch, 1, 1, 1)
    if inputs.mask is None or inputs.pixels is None:
        return Start(noise, init=init, concat=concat)
    if request.denoising_start is not None:
        raise InvalidArgumentError("denoising_start with a mask is not supported yet")
    masked = MaskedImage(pixels=inputs.pixels, mask=inputs.mask)
    if channels == 9:
        extra = MaskConditioner(autoencoder=PipelineAutoencoder(pipe)).encode(
            masked, device=device, dtype=dtype, generator=generators
        )
        return Start(noise, init=init, concat=extra.repeat(batch, 1, 1, 1))
    # A 4-channel model repaints by blending; diffusers still samples the masked
    # picture's latents here, so draw the same noise to keep a seed's later draws equal.
    randn((1, *shape[1:]), generator=first_generator(generators), device=device, dtype=dtype)
    mask = F.interpolate(inputs.mask, size=shape[-2:]).to(device=device, dtype=dtype)
    assert known is not None
    return Start(noise, init=init, blend=(mask.repeat(batch, 1, 1, 1), known))


class PipelineAutoencoder:
    """The pipeline's autoencoder as a conditioner sees it: inputs and outputs in the
    pipeline's dtype, the work in the autoencoder's own (float32 for an upcast SDXL VAE)."""

    def __init__(self, pipe: LatentDiffusion) -> None:
        self.pipe = pipe
        self.scale_factor = pipe.vae.scale_factor
        self.latent_channels = pipe.vae.latent_channels

    def encode(self, images: torch.Tensor, *, generator: Generators = None) -> torch.Tensor:
        return self.pipe._encode(images, first_generator(generator))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.pipe.vae.decode(latents.to(self.pipe._vae_dtype)).to(self.pipe.dtype)


def check_size(label: str, size: int, factor: int) -> None:
    if not is_int(size) or size <= 0 or size % factor:
        hint = max(factor, size // factor * factor) if isinstance(size, int) else 512
        raise InvalidArgumentError(
            f"{label} must be a positive multiple of {factor} (the autoencoder's downsampling "
            f"factor), got {size!r}; try {hint}"
        )

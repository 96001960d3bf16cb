"""What `latentkit.generate` returns, and how images are written with their parameters."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

if TYPE_CHECKING:
    from PIL import Image

OutputType = Literal["pil", "np", "pt", "latent"]
OUTPUT_TYPES: tuple[str, ...] = ("pil", "np", "pt", "latent")


@dataclass(frozen=True)
class GenerationParameters:
    """The settings that produced an image, written into PNGs in the A1111 convention."""

    prompt: str
    negative_prompt: str
    steps: int
    scheduler: str
    guidance_scale: float
    seed: int
    width: int
    height: int
    model: str
    strength: float | None = None
    """Denoising strength of image-to-image and inpainting (None for text-to-image)."""
    clip_skip: int | None = None
    guidance_rescale: float = 0.0

    def a1111(self) -> str:
        """The ``parameters`` text A1111-compatible tools read from a PNG."""
        extra = ""
        if self.strength is not None:
            extra += f", Denoising strength: {self.strength:g}"
        if self.clip_skip is not None:
            extra += f", Clip skip: {self.clip_skip}"
        if self.guidance_rescale:
            extra += f", Guidance rescale: {self.guidance_rescale:g}"
        return (
            f"{self.prompt}\n"
            f"Negative prompt: {self.negative_prompt}\n"
            f"Steps: {self.steps}, Sampler: {self.scheduler}, CFG scale: {self.guidance_scale:g}, "
            f"Seed: {self.seed}, Size: {self.width}x{self.height}, Model: {self.model}{extra}"
        )


@dataclass(frozen=True)
class GenerationResult:
    """Images and the parameters of each (one entry per image, in order).

    ``images`` holds PIL images, or for ``output_type="np"`` float32 arrays (H, W, 3) in
    ``[0, 1]``, for ``"pt"`` float tensors (3, H, W) in ``[0, 1]``, for ``"latent"`` the
    scaled latents (C, h, w).
    """

    images: list[Any]
    parameters: list[GenerationParameters] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return [p.seed for p in self.parameters]

    def save(self, path: str | Path, *, overwrite: bool = False) -> list[Path]:
        """Save PIL images as PNGs carrying their parameters; several images get ``-N`` suffixes.

        Existing files are not replaced unless ``overwrite=True``.
        """
        paths = output_paths(path, len(self.images), overwrite=overwrite)
        for image, params, p in zip(self.images, self.parameters, paths, strict=True):
            save_png(image, p, params, overwrite=overwrite)
        return paths


def output_paths(path: str | Path, count: int, *, overwrite: bool = False) -> list[Path]:
    """The files `GenerationResult.save` writes for ``count`` images; raises if any
    exists and ``overwrite`` is off, so callers can check before generating."""
    from latentkit.errors import InvalidArgumentError

    target = Path(path)
    if count == 1:
        paths = [target]
    else:
        paths = [target.with_name(f"{target.stem}-{i}{target.suffix}") for i in range(count)]
    taken = [str(p) for p in paths if p.exists()]
    if taken and not overwrite:
        raise InvalidArgumentError(
            f"{', '.join(taken)} already exist(s); pass overwrite=True to replace"
        )
    return paths


def save_png(
    image: Image.Image, path: Path, params: GenerationParameters | None, *, overwrite: bool = False
) -> None:
    """Write ``image`` as PNG with a ``parameters`` text chunk (A1111 convention).

    Without ``overwrite`` the file is created exclusively, so a file that appeared since
    the check (another process) is never replaced.
    """
    from PIL import Image as PILImage
    from PIL.PngImagePlugin import PngInfo

    if not isinstance(image, PILImage.Image):
        from latentkit.errors import InvalidArgumentError

        raise InvalidArgumentError("only PIL images can be saved; generate with output_type='pil'")
    info = PngInfo()
    if params is not None:
        info.add_text("parameters", params.a1111())
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "wb" if overwrite else "xb") as file:
            image.save(file, format="PNG", pnginfo=info)
    except FileExistsError as e:
        from latentkit.errors import InvalidArgumentError

        raise InvalidArgumentError(
            f"{path} already exists; pass overwrite=True to replace it"
        ) from e


def to_output(images: torch.Tensor, output_type: OutputType) -> list[Any]:
    """Decoded images in ``[-1, 1]`` (B, 3, H, W) → the requested output type."""
    images = (images / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return list(images)
    array = images.cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return list(array)
    from PIL import Image as PILImage

    return [PILImage.fromarray((a * 255).round().astype(np.uint8)) for a in array]

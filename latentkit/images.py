"""Image inputs for image-to-image and inpainting: PIL images, numpy arrays, tensors or paths.

Sizes: the output takes ``height``/``width`` when given, else the input image's size; either
way each side is rounded down to a multiple of the autoencoder's factor (8 for Stable
Diffusion). Images and masks of another size are resized to it: PIL inputs with Lanczos
resampling, arrays and tensors with nearest-neighbour (as diffusers does). Masks are
converted to grey and binarised at 0.5: white (1) is repainted, black (0) is kept.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
import torch
import torch.nn.functional as F

from latentkit.errors import InvalidArgumentError

if TYPE_CHECKING:
    from PIL import Image

ImageInput = Union["Image.Image", np.ndarray, torch.Tensor, str, os.PathLike[str]]
"""A PIL image; an array (H, W, C) or tensor (C, H, W) with values in [0, 1] (uint8 arrays
are read as 0..255); or the path of an image file."""


def open_image(value: ImageInput, what: str) -> Image.Image | np.ndarray | torch.Tensor:
    """``value`` itself, or the image its path names (an unreadable path is an error)."""
    if not isinstance(value, (str, os.PathLike)):
        from PIL import Image as PILImage

        if not isinstance(value, (PILImage.Image, np.ndarray, torch.Tensor)):
            raise InvalidArgumentError(
                f"{what} must be a PIL image, a numpy array, a tensor or a path, not {type(value).__name__}"
            )
        return value
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    path = Path(value)
    if not path.is_file():
        raise InvalidArgumentError(f"{what}: no image file at {path}")
    from latentkit.request import limits

    try:
        with PILImage.open(path) as opened:
            # The header gives the size: refuse a decompression bomb before decoding it.
            width, height = opened.size
            if width * height > limits().max_input_pixels:
                raise InvalidArgumentError(
                    f"{what}: {path} is {width}x{height} pixels, over the limit of "
                    f"{limits().max_input_pixels:,}; raise it with "
                    "latentkit.set_limits(max_input_pixels=...)"
                )
            opened.load()
            return opened.copy()
    except PILImage.DecompressionBombError as e:
        raise InvalidArgumentError(
            f"{what}: {path} is too large to decode safely ({e}); latentkit reads at most "
            f"{limits().max_input_pixels:,} pixels (latentkit.set_limits(max_input_pixels=...)) "
            "and PIL refuses more than 2 x PIL.Image.MAX_IMAGE_PIXELS"
        ) from e
    except (UnidentifiedImageError, OSError) as e:
        raise InvalidArgumentError(f"{what}: cannot read {path} as an image ({e})") from e


def target_size(
    image: Image.Image | np.ndarray | torch.Tensor,
    height: int | None,
    width: int | None,
    factor: int,
) -> tuple[int, int]:
    """(height, width) of the output: as asked, else the image's, rounded down to ``factor``."""
    from PIL import Image as PILImage

    if isinstance(image, PILImage.Image):
        own_h, own_w = image.height, image.width
    elif isinstance(image, np.ndarray):
        own_h, own_w = image.shape[0], image.shape[1]  # (H, W) or (H, W, C)
    else:
        own_h, own_w = image.shape[-2], image.shape[-1]
    h, w = (height or own_h), (width or own_w)
    h, w = h - h % factor, w - w % factor
    if h < factor or w < factor:
        raise InvalidArgumentError(f"the image is smaller than {factor}x{factor} pixels")
    return h, w


def _as_tensor(
    image: Image.Image | np.ndarray | torch.Tensor, size: tuple[int, int], grey: bool
) -> torch.Tensor:
    """(1, C, H, W) float32 in [0, 1] at ``size``."""
    from PIL import Image as PILImage

    if isinstance(image, PILImage.Image):
        if (image.height, image.width) != size:
            image = image.resize((size[1], size[0]), resample=PILImage.Resampling.LANCZOS)
        image = image.convert("L" if grey else "RGB")
        array = np.asarray(image).astype(np.float32) / 255.0
        tensor = torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1)[None]
    else:
        if isinstance(image, np.ndarray):
            array = (
                image.astype(np.float32) / 255.0
                if image.dtype == np.uint8
                else image.astype(np.float32)
            )
            if array.ndim == 2:
                array = array[..., None]
            tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None]
        else:
            tensor = image.detach().float().cpu()
            tensor = (
                tensor[None, None]
                if tensor.ndim == 2
                else tensor[None]
                if tensor.ndim == 3
                else tensor
            )
        if tensor.ndim != 4 or tensor.shape[0] != 1:
            raise InvalidArgumentError(
                f"expected one image, got an array of shape {tuple(tensor.shape)}"
            )
        if tuple(tensor.shape[-2:]) != size:
            tensor = F.interpolate(tensor, size=size)
        if grey and tensor.shape[1] == 3:
            r, g, b = tensor[:, 0:1], tensor[:, 1:2], tensor[:, 2:3]
            tensor = 0.299 * r + 0.587 * g + 0.114 * b  # ITU-R 601, as PIL's "L"
        if not grey and tensor.shape[1] == 4:
            tensor = tensor[:, :3]  # drop alpha, as PIL's convert("RGB") does
        if not grey and tensor.shape[1] == 1:
            tensor = tensor.expand(-1, 3, -1, -1)
        if tensor.shape[1] not in (1, 3):
            raise InvalidArgumentError(
                f"expected an image with 1, 3 or 4 channels (arrays as (H, W, C), tensors as "
                f"(C, H, W)), got shape {tuple(image.shape)}"
            )
    if tensor.min() < 0 or tensor.max() > 1:
        raise InvalidArgumentError("image values must lie in [0, 1] (or 0..255 for uint8 arrays)")
    return tensor


def image_tensor(
    image: Image.Image | np.ndarray | torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """An RGB image as (1, 3, H, W) in [-1, 1], the autoencoder's input range."""
    return _as_tensor(image, size, grey=False) * 2.0 - 1.0


def rgb_tensor(
    image: Image.Image | np.ndarray | torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """An RGB image as (1, 3, H, W) in [0, 1]: a ControlNet's control image, read as
    diffusers' ``VaeImageProcessor(do_normalize=False)`` reads it."""
    return _as_tensor(image, size, grey=False)


def mask_tensor(
    mask: Image.Image | np.ndarray | torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """A mask as (1, 1, H, W) of 0 (keep) and 1 (repaint)."""
    tensor = _as_tensor(mask, size, grey=True)
    if tensor.shape[1] != 1:
        raise InvalidArgumentError(f"a mask has one or three channels, got {tensor.shape[1]}")
    return (tensor >= 0.5).float()


def depth_tensor(depth: Image.Image | np.ndarray | torch.Tensor) -> torch.Tensor:
    """A depth map as a float tensor (1, H, W); any range (it is normalised later)."""
    from PIL import Image as PILImage

    if isinstance(depth, PILImage.Image):
        tensor = torch.from_numpy(np.asarray(depth.convert("F"), dtype=np.float32).copy())
    elif isinstance(depth, np.ndarray):
        tensor = torch.from_numpy(depth.astype(np.float32))
    else:
        tensor = depth.detach().float().cpu()
    tensor = tensor.squeeze()
    if tensor.ndim != 2:
        raise InvalidArgumentError(
            f"a depth map has one channel (H, W), got shape {tuple(tensor.shape)}"
        )
    if not torch.isfinite(tensor).all() or tensor.max() == tensor.min():
        raise InvalidArgumentError("a depth map must be finite and not constant")
    return tensor[None]

"""Picking the device and dtype: ``"auto"`` means CUDA, then MPS, then CPU; fp16 off the CPU."""

from __future__ import annotations

import torch

from latentkit.errors import InvalidArgumentError

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


SUPPORTED_DEVICES = ("cpu", "cuda", "mps")
"""Device types latentkit runs on."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The device for ``device``; ``"auto"`` picks CUDA, then MPS, then the CPU.

    A device this machine lacks, or one latentkit does not run on (``meta``, ``xpu``, ...),
    is an `InvalidArgumentError`.
    """
    if not isinstance(device, (str, torch.device)):
        raise InvalidArgumentError(
            f"device must be a string or a torch.device, not {type(device).__name__}"
        )
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise InvalidArgumentError(
            f"unknown device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
        ) from e
    if resolved.type not in SUPPORTED_DEVICES:
        raise InvalidArgumentError(
            f"device {device!r} is not supported; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
        )
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgumentError("device 'cuda' was asked for but CUDA is not available here")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise InvalidArgumentError(
                f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidArgumentError("device 'mps' was asked for but MPS is not available here")
    return resolved


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype for ``dtype`` on ``device``; ``"auto"`` is fp16 on CUDA/MPS and fp32 on the CPU."""
    if not isinstance(dtype, (str, torch.dtype)):
        raise InvalidArgumentError(
            f"dtype must be a string or a torch.dtype, not {type(dtype).__name__}"
        )
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES:
            raise InvalidArgumentError(f"dtype {dtype} is not supported; use fp32, fp16 or bf16")
        return dtype
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if dtype.lower() not in _DTYPES:
        raise InvalidArgumentError(
            f"unknown dtype {dtype!r}; valid dtypes: auto, {', '.join(sorted(set(_DTYPES)))}"
        )
    return _DTYPES[dtype.lower()]

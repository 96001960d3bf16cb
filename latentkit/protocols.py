"""The typed contracts latentkit is built on.

A `Pipeline` turns a prompt into images. It owns a `Conditioner` per input
(text, depth, mask), a denoising network, a `Scheduler` that samples from it, and an
`Autoencoder` that maps between pixels and latents (Rombach et al. 2022, sec. 3).
Anything with these methods and attributes plugs in; nothing needs to inherit from latentkit.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import (
    TYPE_CHECKING,
    Any,
    ClassVar,
    Literal,
    NamedTuple,
    Protocol,
    TypeVar,
    runtime_checkable,
)

import torch

from latentkit.errors import InvalidArgumentError

if TYPE_CHECKING:
    from latentkit.results import GenerationResult

PredictionType = Literal["epsilon", "v_prediction", "sample"]
"""What the network predicts: the noise, the velocity ``v`` (Salimans & Ho 2022, sec. 4) or ``x0``."""

Generators = torch.Generator | Sequence[torch.Generator] | None
"""One generator for the batch, one per image (drawn per image, as diffusers does), or none."""

ConditionTarget = Literal["cross_attention", "concat", "vector", "control"]
"""Where a conditioner's output enters the network: as cross-attention context, as extra
input channels concatenated to the latents, as a vector added to the time embedding, or as
`ControlResiduals` added to the UNet's skip connections and middle block (ControlNet)."""


class ControlResiduals(NamedTuple):
    """What a control adapter (ControlNet, Zhang et al. 2023) adds to a UNet evaluation.

    ``down[i]`` is added to the UNet's ``i``-th skip connection (``conv_in``'s output, then
    every ResNet/attention layer and downsampler of the down blocks, in order) and ``mid`` to
    the middle block's output, exactly where diffusers adds ``down_block_additional_residuals``
    and ``mid_block_additional_residual``. A named tuple, so compiled and CUDA-graph UNet
    calls see plain tensors.
    """

    down: tuple[torch.Tensor, ...]
    mid: torch.Tensor

    def plus(self, other: ControlResiduals) -> ControlResiduals:
        """Both residuals summed (several ControlNets: diffusers' ``MultiControlNetModel``).
        (``+`` on a named tuple concatenates, so it is not used.)"""
        if len(other.down) != len(self.down):
            raise InvalidArgumentError(
                f"cannot add control residuals for {len(other.down)} skip connections to "
                f"residuals for {len(self.down)}"
            )
        return ControlResiduals(
            tuple(a + b for a, b in zip(self.down, other.down, strict=True)), self.mid + other.mid
        )


InputT_contra = TypeVar("InputT_contra", contravariant=True)


class Denoiser(Protocol):
    """The contract a scheduler samples against.

    ``model(x, t)`` returns the network output (of the scheduler's ``prediction_type``)
    for the already scaled model input ``x`` at model timestep ``t`` (a 0-d tensor), with
    classifier-free guidance applied. A scheduler never sees prompts, guidance or weights.
    """

    def __call__(self, x: torch.Tensor, t: torch.Tensor, /) -> torch.Tensor: ...


@dataclass(frozen=True)
class SamplerStep:
    """What a sampling loop yields after each network evaluation."""

    index: int
    """0-based position in this run (a run that starts part-way counts from 0 too)."""
    total: int
    """Network evaluations this run makes (``len(scheduler.timesteps(steps)) - start``)."""
    timestep: torch.Tensor
    """The model timestep just evaluated."""
    sample: torch.Tensor
    """The latents after this step; the final step's sample is the result."""


SamplerRun = Generator[SamplerStep, torch.Tensor | None, None]
"""A sampling loop: yields a `SamplerStep` after every network evaluation.

``next(run)`` (or ``run.send(None)``) continues from the step's sample; ``run.send(x)``
continues from ``x`` instead, as diffusers' pipelines do when they replace ``latents`` between
``scheduler.step`` calls (inpainting with an ordinary 4-channel model keeps the known region
so). A tensor sent after the last step ends the run like ``next``.
"""


@runtime_checkable
class Scheduler(Protocol):
    """An immutable description of a sampler; per-call state lives in `sample`'s loop.

    Because a scheduler holds no per-call state, one object can serve many threads at once.
    """

    name: ClassVar[str]

    @property
    def prediction_type(self) -> PredictionType:
        """What the network predicts (read-only: schedulers are immutable)."""
        ...

    def timesteps(self, steps: int) -> torch.Tensor:
        """The model timesteps evaluated for ``steps`` inference steps, in sampling order."""
        ...

    def start_index(self, steps: int, strength: float) -> int:
        """The position in ``timesteps(steps)`` where image-to-image with ``strength`` starts.

        As diffusers' img2img ``get_timesteps``: ``int(steps * strength)`` steps are run (all
        of them for ``strength=1``); the skipped ones are counted in network evaluations
        (diffusers' ``scheduler.order`` per step: 2 for Heun, else 1).
        Raises `InvalidArgumentError` for a strength outside ``[0, 1]`` or one that leaves no step.
        """
        ...

    def noised(
        self, x0: torch.Tensor, noise: torch.Tensor, *, steps: int, index: int
    ) -> torch.Tensor:
        """Clean latents ``x0`` noised with ``noise`` to the level of position ``index`` of
        ``timesteps(steps)``, in this scheduler's own state space (diffusers' ``add_noise``)."""
        ...

    def sample(
        self,
        model: Denoiser,
        noise: torch.Tensor,
        *,
        steps: int,
        generator: Generators = None,
        start: int = 0,
        init: torch.Tensor | None = None,
        resume: torch.Tensor | None = None,
    ) -> SamplerRun:
        """Sample from unit Gaussian ``noise``, yielding after every network evaluation.

        With ``init`` (clean latents, image-to-image), the run starts at position ``start`` of
        ``timesteps(steps)`` (see `start_index`) from ``noised(init, noise, steps=steps,
        index=start)``, with fresh solver state; with ``resume``, from ``resume`` itself: a
        sample already at position ``start`` in this scheduler's state space (the second half
        of a run handed over between models, ``denoising_start``). ``start`` must be 0
        without either.
        The run is a `SamplerRun`: ``send`` a tensor to replace the sample between steps.
        """
        ...

    def to_config(self) -> dict[str, Any]:
        """The diffusers-style config (``_class_name`` plus fields) that recreates this scheduler."""
        ...


@runtime_checkable
class Conditioner(Protocol[InputT_contra]):
    """Turns one kind of input (a prompt, a depth map, a mask) into tensors for the denoiser."""

    name: ClassVar[str]
    target: ClassVar[ConditionTarget]

    def encode(
        self,
        value: InputT_contra,
        *,
        device: torch.device,
        dtype: torch.dtype,
        generator: Generators = None,
    ) -> torch.Tensor | ControlResiduals:
        """Encode inputs; the result's first dimension is the batch (a ``"control"``
        conditioner returns `ControlResiduals`, batched likewise). Conditioners that sample
        (an autoencoder's posterior) draw from ``generator``; others ignore it."""
        ...


@runtime_checkable
class Autoencoder(Protocol):
    """Maps images in ``[-1, 1]`` to the latent space the denoiser works in, and back."""

    scale_factor: int
    """Pixels per latent along each side (8 for Stable Diffusion)."""
    latent_channels: int

    def encode(self, images: torch.Tensor, *, generator: Generators = None) -> torch.Tensor:
        """Latents for ``images`` (B, 3, H, W), already multiplied by the model's scaling factor."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in ``[-1, 1]`` for scaled ``latents`` (the inverse of `encode`)."""
        ...


Seeds = int | Sequence[int] | None
"""An int (one CPU generator for the batch), one int per image, or None (a fresh seed)."""

Callback = Callable[[SamplerStep], Any]
"""Called after every network evaluation with the loop's `SamplerStep`."""


@runtime_checkable
class Pipeline(Protocol):
    """Anything that generates images from a prompt with the keywords of `latentkit.generate`.

    Pipelines for other tasks add keywords of their own (with defaults) and still conform.
    """

    def generate(
        self, prompt: str | Sequence[str] | None = None, **options: Any
    ) -> GenerationResult:
        """Generate images; see `latentkit.generate` for the keywords."""
        ...

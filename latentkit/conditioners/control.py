"""ControlNet conditioning (Zhang, Rao & Agrawala 2023): a control image steers the UNet
through residuals added to its skip connections and middle block (target ``"control"``).

`ControlNetConditioner` holds one loaded `latentkit.models.controlnet.ControlNet` and turns
(control image, latents, timestep, text context, vector, scale) into `ControlResiduals`;
``pipeline.with_controlnet(source)`` attaches one (several: multi-ControlNet, residuals
summed). `ControlRun` is one call's control: the prepared images and, per UNet evaluation,
each net's scale inside its ``[control_start, control_end]`` window, with diffusers'
batching for classifier-free guidance and guess mode.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from latentkit import images
from latentkit.conditioners import register
from latentkit.errors import (
    InvalidArgumentError,
    LatentkitError,
    MissingComponentError,
    PickleWeightsError,
    UnsupportedModelError,
)
from latentkit.protocols import ConditionTarget, ControlResiduals, Generators

if TYPE_CHECKING:
    from latentkit.images import ImageInput
    from latentkit.loading import ModelFiles
    from latentkit.models.controlnet import ControlNet, ControlNetConfig
    from latentkit.models.unet import UNetConfig
    from latentkit.request import Request

CONFIG = "config.json"
WEIGHTS_STEM = "diffusion_pytorch_model"


@dataclass(frozen=True)
class ControlInput:
    """What a ControlNet reads at one UNet evaluation."""

    image: torch.Tensor
    """(B, 3, H, W) in [0, 1] at the output size, one row per latent row."""
    latents: torch.Tensor
    """(B, C, h, w): the scaled model input the UNet sees (its first ``C`` channels)."""
    timestep: torch.Tensor
    """The model timestep (0-d)."""
    context: torch.Tensor
    """(B, tokens, D): the cross-attention context."""
    vector: torch.Tensor | None = None
    """(B, V): SDXL's vector condition; None for SD 1.x/2.x."""
    scale: float = 1.0
    """Multiplies the residuals (``control_scale`` inside the window, else 0)."""
    ramp: bool = False
    """Guess mode's per-depth scales (`ControlNet.forward`'s ``ramp``)."""


@register("controlnet")
class ControlNetConditioner:
    """A loaded ControlNet as a conditioner: control image and latents in, `ControlResiduals`
    out. Immutable, so one can be attached to several pipelines of the same base."""

    name: ClassVar[str] = "controlnet"
    target: ClassVar[ConditionTarget] = "control"

    def __init__(self, *, network: ControlNet, source: str = "", file: Path | None = None) -> None:
        self.network = network
        self.source = source
        self.a1111_model = a1111_model(source, file)
        """How the PNG names this ControlNet (`a1111_model`), taken now: the file may be gone
        by the time an image is written."""

    def __repr__(self) -> str:
        return f"ControlNetConditioner({self.source!r})"

    @classmethod
    def load(
        cls,
        source: str | os.PathLike[str],
        *,
        device: torch.device,
        dtype: torch.dtype,
        revision: str | None = None,
        variant: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        allow_pickle: bool = False,
        progress: bool = True,
        fits: Callable[[ControlNetConfig, str], None] | None = None,
    ) -> ControlNetConditioner:
        """Load a ControlNet in diffusers' layout: a Hub repo id or a local folder with
        ``config.json`` and ``diffusion_pytorch_model[.variant].safetensors`` at its root
        (sharded weights too; pickle ``.bin`` only with ``allow_pickle``), through
        `latentkit.loading.resolve` (the same file checks, cache and offline rules as a
        pipeline's). ``fits(config, name)`` may refuse the config before any weight is read
        (`check_base`)."""
        from latentkit.loading import load_into, read_state_dict, resolve
        from latentkit.models.controlnet import ControlNet

        files = resolve(
            source,
            revision=revision,
            variant=variant,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            allow_pickle=allow_pickle,
            progress=progress,
            select=select_controlnet_files,
        )
        config = read_controlnet_config(files)
        if fits is not None:
            fits(config, files.name)
        with torch.device("meta"):
            network = ControlNet(config)
        tensors = read_state_dict(files.weights["controlnet"], device=device, dtype=dtype)
        load_into(network, tensors, name=f"ControlNet {files.name}")
        return cls(network=network, source=files.name, file=files.weights["controlnet"][0])

    def check_base(
        self, unet: UNetConfig, *, latent_channels: int, scale_factor: int, name: str
    ) -> None:
        """`check_base` for this ControlNet."""
        check_base(
            self.network.control_config,
            unet,
            latent_channels=latent_channels,
            scale_factor=scale_factor,
            name=name,
            source=self.source,
        )

    def prepare(
        self,
        image: ImageInput,
        *,
        size: tuple[int, int],
        device: torch.device,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """The control ``image`` as (1, 3, H, W) in [0, 1] at the output ``size`` (PIL
        images resized with Lanczos, arrays and tensors nearest-neighbour, as diffusers'
        ``control_image_processor`` does)."""
        opened = images.open_image(image, "control_image")
        return images.rgb_tensor(opened, size).to(device=device, dtype=dtype)

    def encode(
        self,
        value: ControlInput,
        *,
        device: torch.device,
        dtype: torch.dtype,
        generator: Generators = None,
    ) -> ControlResiduals:
        """The residuals for one UNet evaluation (the generator is not used)."""
        latents = value.latents[:, : self.network.config.in_channels]
        residuals: ControlResiduals = self.network(
            latents.to(device=device, dtype=dtype),
            value.timestep,
            value.context.to(device=device, dtype=dtype),
            value.image.to(device=device, dtype=dtype),
            None if value.vector is None else value.vector.to(device=device, dtype=dtype),
            scale=value.scale,
            ramp=value.ramp,
        )
        return residuals


def check_base(
    mine: ControlNetConfig,
    unet: UNetConfig,
    *,
    latent_channels: int,
    scale_factor: int,
    name: str,
    source: str,
) -> None:
    """Refuse a ControlNet (config ``mine``) built for another base model than the
    pipeline ``name`` (its UNet's config, latent channels and autoencoder factor) with
    `UnsupportedModelError`: its residuals must fit the UNet's skip connections, and it must
    read the same text context and vector (an SDXL ControlNet on SD 1.5 differs in all three)."""
    own = mine.unet
    differences = []
    for key, what in (
        ("cross_attention_dim", "text context width"),
        ("vector_dim", "added vector width (SDXL's addition embedding)"),
        ("block_out_channels", "block widths"),
        ("layers_per_block", "layers per block"),
    ):
        if getattr(own, key) != getattr(unet, key):
            differences.append(f"{what} {key}={getattr(own, key)!r} vs {getattr(unet, key)!r}")
    if own.vector_dim is not None and (
        own.addition_time_embed_dim,
        own.flip_sin_to_cos,
        own.freq_shift,
    ) != (unet.addition_time_embed_dim, unet.flip_sin_to_cos, unet.freq_shift):
        differences.append("the size ids' sinusoids (addition_time_embed_dim, ...)")
    if own.in_channels != latent_channels:
        differences.append(
            f"in_channels={own.in_channels} vs the autoencoder's {latent_channels} latent channels"
        )
    if mine.downscale != scale_factor:
        differences.append(
            f"its control image embedding downsamples by {mine.downscale}, the "
            f"autoencoder by {scale_factor}"
        )
    if mine.conditioning_channels != 3:
        differences.append(
            f"conditioning_channels={mine.conditioning_channels} (latentkit feeds RGB "
            "control images)"
        )
    if differences:
        raise UnsupportedModelError(
            f"the ControlNet {source} does not fit {name}: "
            + "; ".join(differences)
            + ". A ControlNet works only with the base model family it was trained on "
            "(SD 1.x, SD 2.x or SDXL)"
        )


SINGLE_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
"""File endings of single-file ControlNets; all but safetensors are pickle."""


def is_single_file(source: object) -> bool:
    """Whether ``source`` names one weights file (by its ending), local or ``org/repo/file``."""
    return isinstance(source, (str, os.PathLike)) and os.fspath(source).lower().endswith(
        SINGLE_FILE_SUFFIXES
    )


def load_single_file(
    source: str | os.PathLike[str],
    *,
    base: UNetConfig,
    device: torch.device,
    dtype: torch.dtype,
    allow_pickle: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    fits: Callable[[ControlNetConfig, str], None] | None = None,
) -> ControlNetConditioner:
    """A ControlNet from one file: the original layout (``control_model.input_blocks...``,
    ``input_hint_block``, ``zero_convs``, ``middle_block_out``, as lllyasviel's and A1111's
    files) or diffusers' keys, local or ``org/repo/file`` on the Hub.

    A single file has no config: the encoder's is the base UNet's (``base``; a ControlNet is
    a copy of its base's encoder), with what the tensors say instead where they say it
    (input and control image channels, the control embedding's widths, the text width and
    the vector), so ``fits`` refuses a ControlNet for another base before any tensor is
    read. A "shuffle" ControlNet's ``global_pool_conditions`` cannot be read off a file.
    """
    import dataclasses

    from latentkit.adapters.common import find_adapter_file
    from latentkit.checkpoints.keys import CONTROLNET_PREFIX, UNetLayout, controlnet_keys
    from latentkit.checkpoints.single_file import Checkpoint
    from latentkit.errors import WeightMismatchError
    from latentkit.loading import load_into
    from latentkit.models.controlnet import ControlNet, ControlNetConfig

    name = os.fspath(source)
    weight_name = None
    hub = not name.startswith((".", "/", "~")) and name.count("/") >= 2
    if hub and not Path(name).expanduser().exists():
        owner, repo, weight_name = name.split("/", 2)  # org/repo/file on the Hub
        name = f"{owner}/{repo}"
    path = find_adapter_file(
        name,
        weight_name=weight_name,
        default_names=(),
        allow_pickle=allow_pickle,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        token=token,
        what="ControlNet",
    )
    checkpoint = Checkpoint(path, allow_pickle=allow_pickle)
    prefix = CONTROLNET_PREFIX if any(k.startswith(CONTROLNET_PREFIX) for k in checkpoint) else ""
    keys = {k[len(prefix) :]: k for k in checkpoint if k.startswith(prefix)}
    shapes = {short: checkpoint.shapes[full] for short, full in keys.items()}
    original = "controlnet_cond_embedding.conv_in.weight" not in shapes
    names = _ORIGINAL_NAMES if original else _DIFFUSERS_NAMES

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise WeightMismatchError(
                f"{path}: no {prefix}{key}; this is not a ControlNet file (or not one latentkit "
                "reads: original lllyasviel/A1111 keys or diffusers' ControlNetModel keys)",
                path=path,
            )
        return shapes[key]

    # The control embedding's widths: its first convolution's, then each stride-2 one's.
    at = len(names["hint"]) + 1
    hint = sorted(
        int(k[at:].split(".")[0])
        for k in shapes
        if k.startswith(names["hint"] + ".") and k.endswith(".weight")
    )
    if original:
        widths = [shape(f"input_hint_block.{4 * m}.weight")[0] for m in range(len(hint) // 2)]
    else:
        first = shape("controlnet_cond_embedding.conv_in.weight")[0]
        strided = [shape(f"controlnet_cond_embedding.blocks.{b}.weight")[0] for b in hint[1::2]]
        widths = [first, *strided]
    context = next(s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight"))
    vector = shapes.get(names["vector"])
    inputs = shape(names["conv_in"])[1]
    unet = dataclasses.replace(
        base,
        in_channels=inputs,
        out_channels=inputs,
        cross_attention_dim=context,
        addition_embed_type=None if vector is None else "text_time",
        addition_time_embed_dim=None if vector is None else base.addition_time_embed_dim or 256,
        projection_class_embeddings_input_dim=None if vector is None else vector[1],
    )
    config = ControlNetConfig(
        unet=unet,
        conditioning_channels=shape(names["hint_in"])[1],
        conditioning_embedding_out_channels=tuple(widths),
    )
    if fits is not None:
        fits(config, os.fspath(source))
    keymap = (
        controlnet_keys(UNetLayout.from_config(unet), hint_convs=len(hint)) if original else None
    )

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for short, full in keys.items():
            ours = None if keymap is None else keymap.ours(short)
            if ours == ():
                continue  # a tensor the format carries and the network has no place for
            tensor = checkpoint[full]
            if not tensor.is_floating_point():
                raise WeightMismatchError(f"{path}: {full} is {tensor.dtype}, not float", path=path)
            yield (short if not ours else ours[0]), tensor.to(device=device, dtype=dtype)

    with torch.device("meta"):
        network = ControlNet(config)
    load_into(network, tensors(), name=f"ControlNet {os.fspath(source)}")
    return ControlNetConditioner(network=network, source=os.fspath(source), file=path)


def a1111_model(source: str, file: Path | None) -> str:
    """A ControlNet as A1111's ControlNet extension names it in PNGs: ``name [hash]``, the
    hash A1111's short legacy one (``sd_models.model_hash``: the first 8 hex digits of the
    sha256 of the 64 KiB from 1 MiB into the weights file, of nothing for a smaller file).
    The name is a single file's without its ending (A1111's), a local folder's, else the
    Hub repo id; ``,`` and ``:`` become ``_``, as the extension's reader splits items there.
    Without a file (a network built in memory), the name alone."""
    if is_single_file(source):
        name = Path(source).stem
    elif source and Path(source).expanduser().is_dir():
        name = Path(source).expanduser().resolve().name
    else:
        name = source or "controlnet"
    name = re.sub(r"[,:]", "_", name)
    if file is None:
        return name
    import hashlib

    try:
        with open(file, "rb") as f:
            f.seek(0x100000)
            digest = hashlib.sha256(f.read(0x10000)).hexdigest()
    except OSError:  # unreadable now: the name alone (A1111 writes NOFILE)
        return name
    return f"{name} [{digest[:8]}]"


_ORIGINAL_NAMES = {
    "hint": "input_hint_block",
    "hint_in": "input_hint_block.0.weight",
    "conv_in": "input_blocks.0.0.weight",
    "vector": "label_emb.0.0.weight",
}
_DIFFUSERS_NAMES = {
    "hint": "controlnet_cond_embedding.blocks",
    "hint_in": "controlnet_cond_embedding.conv_in.weight",
    "conv_in": "conv_in.weight",
    "vector": "add_embedding.linear_1.weight",
}


def read_controlnet_config(files: ModelFiles) -> ControlNetConfig:
    """The `ControlNetConfig` of resolved ControlNet files; a refusal names the file."""
    from latentkit.models.controlnet import ControlNetConfig
    from latentkit.readers import read_json_object

    path = files.root / CONFIG
    try:
        return ControlNetConfig.from_dict(read_json_object(path))
    except LatentkitError as e:
        if e.args and isinstance(e.args[0], str) and os.fspath(path) not in e.args[0]:
            e.args = (f"{path}: {e.args[0]}", *e.args[1:])
        raise


def select_controlnet_files(
    files: Iterable[str], *, variant: str | None, allow_pickle: bool, name: str
) -> tuple[list[str], dict[str, list[str]]]:
    """The files of a ControlNet in diffusers' layout, from a folder's or repo's listing:
    ``config.json`` and one weight file (or an index and its shards) at the root; the
    ``variant``'s weights when it has them. `latentkit.loading.Selector`."""
    available = {f.replace(os.sep, "/") for f in files}
    if CONFIG not in available:
        raise MissingComponentError(
            f"{name}: no {CONFIG} at its root; a ControlNet in diffusers' layout has "
            f"{CONFIG} and {WEIGHTS_STEM}.safetensors"
        )
    for ext in ("safetensors", "bin"):
        for v in ([variant] if variant else []) + [None]:
            tag = f".{v}" if v else ""
            single = f"{WEIGHTS_STEM}{tag}.{ext}"
            index = f"{WEIGHTS_STEM}.{ext}.index{tag}.json"
            shard = re.compile(re.escape(f"{WEIGHTS_STEM}{tag}") + rf"-\d+-of-\d+\.{ext}$")
            chosen = (
                [single]
                if single in available
                else [index, *sorted(f for f in available if shard.match(f))]
                if index in available
                else []
            )
            if not chosen:
                continue
            if ext == "bin" and not allow_pickle:
                raise PickleWeightsError(
                    f"{name}: the ControlNet has only pickle weights ({', '.join(chosen)}); "
                    "pickle files can run code when loaded. Pass allow_pickle=True if you "
                    "trust it (latentkit then loads them with torch.load(weights_only=True))"
                )
            return [CONFIG, *chosen], {"controlnet": chosen}
    raise MissingComponentError(
        f"{name}: no ControlNet weights (looked for {WEIGHTS_STEM}"
        f"[.{variant or 'VARIANT'}].safetensors at its root)"
    )


class ControlRun:
    """One call's control: called once per UNet evaluation, in order, with the evaluation's
    inputs; returns the summed residuals of every ControlNet, or None when none is active.

    Mirrors diffusers' ControlNet pipelines: net ``k`` contributes at evaluation ``i`` of
    ``n`` only if ``start_k <= i / n`` and ``(i + 1) / n <= end_k`` (``controlnet_keep``);
    when the evaluation is guided (``x_in`` is ``x`` twice), it reads both halves of the
    batch, except in guess mode, where it reads the conditional half only and the
    unconditional half gets zero residuals.
    """

    def __init__(
        self,
        adapters: Sequence[ControlNetConditioner],
        images: Sequence[torch.Tensor],
        *,
        scales: Sequence[float],
        windows: Sequence[tuple[float, float]],
        guess_mode: bool,
        evaluations: int,
    ) -> None:
        self.adapters = tuple(adapters)
        self.images = tuple(images)
        """One control image per adapter, one row per image of the batch."""
        self.scales = tuple(scales)
        self.windows = tuple(windows)
        """Each net's (``control_start``, ``control_end``)."""
        self.guess_mode = guess_mode
        n = evaluations
        self.keep = [
            [1.0 - float(i / n < start or (i + 1) / n > end) for start, end in windows]
            for i in range(n)
        ]
        self.index = 0

    def __call__(
        self,
        x: torch.Tensor,
        x_in: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        vector: torch.Tensor | None,
    ) -> ControlResiduals | None:
        """Residuals for the evaluation at ``t`` of the latents ``x``, as the UNet gets them
        in ``x_in`` (``[x, x]`` when guided: unconditional rows first), conditioned on the
        ``context`` and ``vector`` of ``x_in``'s rows."""
        keep = self.keep[min(self.index, len(self.keep) - 1)]
        self.index += 1
        # Whether this evaluation is guided is read off the batch, so a loop that skips
        # guidance for some steps (a guidance interval) gets residuals for the rows it runs.
        doubled = x_in.shape[0] == 2 * x.shape[0]
        split = self.guess_mode and doubled
        latents, ctx, vec = x_in, context, vector
        if split:
            # Guess mode: the ControlNet sees the conditional branch only (diffusers' rule).
            latents, ctx = x, context.chunk(2)[1]
            vec = None if vector is None else vector.chunk(2)[1]
        total: ControlResiduals | None = None
        for adapter, image, scale, k in zip(
            self.adapters, self.images, self.scales, keep, strict=True
        ):
            weight = scale * k
            if weight == 0.0:
                continue  # zero residuals: adding them changes nothing, so skip the network
            rows = torch.cat([image, image]) if doubled and not split else image
            value = ControlInput(rows, latents, t, ctx, vec, scale=weight, ramp=self.guess_mode)
            out = adapter.encode(value, device=latents.device, dtype=latents.dtype)
            total = out if total is None else total.plus(out)
        if total is None or not split:
            return total
        return ControlResiduals(
            tuple(torch.cat([torch.zeros_like(d), d]) for d in total.down),
            torch.cat([torch.zeros_like(total.mid), total.mid]),
        )


def start_control(
    controls: Sequence[ControlNetConditioner],
    request: Request,
    *,
    size: tuple[int, int],
    batch: int,
    evaluations: int,
    defaults: Mapping[str, float],
    device: torch.device,
    dtype: torch.dtype,
) -> ControlRun | None:
    """One call's `ControlRun` (None without ControlNets): the control images read at the
    output ``size``, one row per image of the ``batch``, and each net's scale and window
    over the run's ``evaluations``. Without ``control_scale``, the scale is the family's
    default for the task (``defaults``: `latentkit.pipelines.Family.control_scales`). A
    ``global_pool_conditions`` first ControlNet turns guess mode on, as in diffusers."""
    if not controls or request.control_image is None:
        return None
    count = len(controls)
    guess = request.guess_mode or controls[0].network.control_config.global_pool_conditions
    prepared = [
        control.prepare(image, size=size, device=device, dtype=dtype).expand(batch, -1, -1, -1)
        for control, image in zip(controls, control_images(request.control_image), strict=True)
    ]
    starts = per_control("control_start", request.control_start, count)
    ends = per_control("control_end", request.control_end, count)
    scale = request.control_scale
    if scale is None:
        task = (
            "inpainting"
            if request.mask_image is not None
            else "image-to-image"
            if request.image is not None
            else "text-to-image"
        )
        scale = defaults[task]
    return ControlRun(
        controls,
        prepared,
        scales=[float(s) for s in per_control("control_scale", scale, count)],
        windows=[(float(a), float(b)) for a, b in zip(starts, ends, strict=True)],
        guess_mode=guess,
        evaluations=evaluations,
    )


def per_control(name: str, value: object, count: int) -> list[Any]:
    """A ``control_*`` keyword as one value per ControlNet: a single value for all, or a
    list with one each (`InvalidArgumentError` for another count)."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise InvalidArgumentError(
                f"{name} has {len(value)} values for {count} ControlNet(s); give one value "
                "or one per ControlNet"
            )
        return list(value)
    return [value] * count


def control_images(value: object) -> list[Any]:
    """``control_image`` as a list of images (a single image, or one per ControlNet)."""
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def check_request(
    controls: Sequence[ControlNetConditioner], request: Request, *, name: str
) -> None:
    """The checks of the ``control_*`` keywords that need the pipeline: a control image
    per ControlNet, and none without one."""
    if request.control_image is None:
        if controls:
            raise InvalidArgumentError(
                f"{name} has {len(controls)} ControlNet(s) attached: pass control_image= "
                "(one image per ControlNet)"
            )
        return
    if not controls:
        raise InvalidArgumentError(
            "control_image needs a ControlNet: attach one with pipe.with_controlnet(source)"
        )
    given = control_images(request.control_image)
    if len(given) != len(controls):
        raise InvalidArgumentError(
            f"got {len(given)} control images for {len(controls)} ControlNet(s); give one "
            "per ControlNet, in the order they were attached"
        )
    for image in given:
        images.open_image(image, "control_image")  # a bad type or unreadable file: now
    for label in ("control_scale", "control_start", "control_end"):
        per_control(label, getattr(request, label), len(controls))
    starts = per_control("control_start", request.control_start, len(controls))
    ends = per_control("control_end", request.control_end, len(controls))
    for i, (start, end) in enumerate(zip(starts, ends, strict=True)):
        if start >= end:
            raise InvalidArgumentError(
                f"control_start ({start}) must be below control_end ({end})"
                + (f" for ControlNet {i}" if len(controls) > 1 else "")
            )


def first_control_image(request: Request) -> Any:
    """The first control image, opened (the output size follows it in text-to-image when
    height and width are not given, as in diffusers)."""
    return images.open_image(control_images(request.control_image)[0], "control_image")


def existing_path(value: object) -> Path | None:
    """``value`` as a path if it names an existing file (a single-file ControlNet)."""
    if isinstance(value, (str, os.PathLike)):
        path = Path(value).expanduser()
        if path.is_file():
            return path
    return None

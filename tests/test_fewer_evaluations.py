"""Fewer evaluations for the same picture: guidance in a limited interval
(``generate(guidance_interval=...)``) and DeepCache (``generate(feature_cache=N)``).

The guidance interval is checked against diffusers switching guidance per step through its
``callback_on_step_end`` (the documented way to change guidance mid-run), at 1e-4 on fp32
images in [0, 1]; its limits against the plain path (equal: 0.0). DeepCache's shallow
evaluation is checked against the same composition of diffusers' own UNet blocks on identical
weights (1e-5 on the UNet output), its interval 1 against the plain path (0.0).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import latentkit
from latentkit.errors import InvalidArgumentError
from latentkit.models.unet import CACHE_SKIP, FeatureCache, UNet2DCondition, UNetConfig
from latentkit.performance import Performance
from latentkit.protocols import ControlResiduals

TOL = 1e-4  # images, fp32, [0, 1]
UNET_TOL = 1e-5  # UNet outputs, fp32
SIZE = 32  # pixels: the tiny VAE downsamples by 2
PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def sd1(sd1_path: Path) -> latentkit.LatentDiffusion:
    return latentkit.load_pipeline(sd1_path, device="cpu", dtype="fp32", progress=False)


def ours(pipe: latentkit.LatentDiffusion, **kw: Any) -> np.ndarray:
    kw = {"steps": 6, "seed": 3, "scheduler": "ddim", "guidance_scale": 7.5, **kw}
    result = pipe.generate(PROMPTS, height=SIZE, width=SIZE, output_type="np", progress=False, **kw)
    return np.stack(result.images)


class Rows:
    """Counts the UNet's evaluations and the batch rows they ran (a forward pre-hook)."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.batches.append(int(args[0].shape[0]))


@pytest.fixture
def rows(sd1: latentkit.LatentDiffusion) -> Iterator[Rows]:
    counter = Rows()
    handle = sd1.unet.register_forward_pre_hook(counter, with_kwargs=True)
    yield counter
    handle.remove()


def sigma(pipe: latentkit.LatentDiffusion, t: int) -> float:
    alpha_bar = float(pipe.resolve_scheduler("ddim").alphas_cumprod[t])  # type: ignore[attr-defined]
    return math.sqrt((1 - alpha_bar) / alpha_bar)


# ---------------------------------------------------------------- guidance interval


def test_guidance_interval_covering_every_step_is_plain_guidance(sd1: Any) -> None:
    assert np.abs(ours(sd1, guidance_interval=(0.0, math.inf)) - ours(sd1)).max() == 0.0


def test_guidance_interval_covering_no_step_is_no_guidance(sd1: Any, rows: Rows) -> None:
    outside = ours(sd1, guidance_interval=(1e3, 1e4))  # SD's schedule tops out at 14.6
    assert rows.batches == [2] * 6  # the conditional rows only, at every step
    assert np.abs(outside - ours(sd1, guidance_scale=1.0)).max() == 0.0


def test_guidance_interval_matches_diffusers_switching_guidance(
    sd1: Any, sd1_path: Path, rows: Rows
) -> None:
    import diffusers

    steps = 6
    timesteps = [int(t) for t in sd1.resolve_scheduler("ddim").timesteps(steps)]
    # Guided in the middle only: (sigma(t4), sigma(t1)] holds t1, t2, t3 (sigma grows with t).
    interval = (sigma(sd1, timesteps[4]), sigma(sd1, timesteps[1]))
    guided = [interval[0] < sigma(sd1, t) <= interval[1] for t in timesteps]
    assert guided == [False, True, True, True, False, False]

    got = ours(sd1, steps=steps, guidance_interval=interval)
    assert rows.batches == [2 * (1 + g) for g in guided]  # half the rows outside

    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(sd1_path), safety_checker=None)
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    cond, uncond = ref.encode_prompt(PROMPTS, "cpu", 1, True)

    def switch(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        # diffusers reads its guidance scale and prompt embeddings anew at every step.
        if i + 1 < steps:
            pipe._guidance_scale = 7.5 if guided[i + 1] else 1.0
            kwargs["prompt_embeds"] = torch.cat([uncond, cond]) if guided[i + 1] else cond
        return kwargs

    expected = ref(
        prompt_embeds=cond,
        guidance_scale=1.0,  # the first step is outside the interval
        num_inference_steps=steps,
        generator=torch.Generator("cpu").manual_seed(3),
        height=SIZE,
        width=SIZE,
        output_type="np",
        callback_on_step_end=switch,
        callback_on_step_end_tensor_inputs=["prompt_embeds"],
    ).images
    assert np.abs(got - expected).max() <= TOL
    assert np.abs(got - ours(sd1, steps=steps)).max() > 1e-3  # it is not plain guidance


@pytest.mark.parametrize(
    "interval",
    [(1.0,), (2.0, 1.0), (-1.0, 2.0), (0.0, float("nan")), ("0", 1.0), (0.0, 1.0, 2.0), "ab"],
)
def test_bad_guidance_intervals_are_refused(interval: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="guidance_interval"):
        latentkit.Request.create("a cat", guidance_interval=interval)


@pytest.mark.parametrize("guess_mode", [False, True])
def test_guidance_interval_with_a_controlnet(
    sd1: Any, sd1_controlnet_path: Path, guess_mode: bool
) -> None:
    """The ControlNet gets residuals for the rows each evaluation runs (a guidance interval
    halves them): every step inside is plain guidance, none inside is no guidance."""
    pipe = sd1.with_controlnet(sd1_controlnet_path, progress=False)
    control = np.random.default_rng(0).random((SIZE, SIZE, 3))
    kw: dict[str, Any] = {"control_image": control, "guess_mode": guess_mode}
    plain = ours(pipe, **kw)
    assert np.abs(ours(pipe, guidance_interval=(0.0, math.inf), **kw) - plain).max() == 0.0
    unguided = ours(pipe, guidance_scale=1.0, **kw)
    assert np.abs(ours(pipe, guidance_interval=(1e3, 1e4), **kw) - unguided).max() == 0.0
    middle = ours(pipe, guidance_interval=(0.5, 5.0), **kw)
    assert np.abs(middle - plain).max() > 1e-3 and np.abs(middle - unguided).max() > 1e-3


# ---------------------------------------------------------------- DeepCache


def test_feature_cache_of_1_is_the_plain_network(sd1: Any) -> None:
    assert np.abs(ours(sd1, feature_cache=1) - ours(sd1)).max() == 0.0


def test_feature_cache_of_1_is_the_plain_network_for_sdxl(sdxl_path: Path) -> None:
    pipe = latentkit.load_pipeline(sdxl_path, device="cpu", dtype="fp32", progress=False)
    kw: dict[str, Any] = {"steps": 3, "seed": 1, "output_type": "np", "progress": False}
    plain = np.stack(pipe.generate("a cat", **kw).images)
    assert np.abs(np.stack(pipe.generate("a cat", feature_cache=1, **kw).images) - plain).max() == 0


class Calls:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self, *args: Any) -> None:
        self.count += 1


@pytest.mark.parametrize(("interval", "full"), [(2, 4), (3, 3), (4, 2), (7, 1)])
def test_feature_cache_runs_the_deep_blocks_only_on_refresh_steps(
    sd1: Any, rows: Rows, interval: int, full: int
) -> None:
    mid, deep_down, shallow_down = Calls(), Calls(), Calls()
    hooks = [
        sd1.unet.mid_block.register_forward_pre_hook(mid),
        sd1.unet.down_blocks[1].register_forward_pre_hook(deep_down),
        sd1.unet.down_blocks[0].resnets[0].register_forward_pre_hook(shallow_down),
    ]
    try:
        cached = ours(sd1, steps=7, feature_cache=interval)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(rows.batches) == 7  # every step still evaluates the (shallow) network
    assert mid.count == deep_down.count == full  # evaluations 0, N, 2N, ...
    assert shallow_down.count == 7
    # Close to the plain image: nearer to it than the plain image of another seed is.
    plain = ours(sd1, steps=7)
    assert 1e-4 < np.abs(cached - plain).mean() < np.abs(ours(sd1, steps=7, seed=4) - plain).mean()


def test_a_changed_batch_refreshes_the_cache(sd1: Any) -> None:
    """With a guidance interval the batch halves where guidance stops: the kept feature is
    of the other batch, so that evaluation runs the whole network."""
    mid = Calls()
    hook = sd1.unet.mid_block.register_forward_pre_hook(mid)
    timesteps = [int(t) for t in sd1.resolve_scheduler("ddim").timesteps(6)]
    interval = (sigma(sd1, timesteps[3]), math.inf)  # guided at evaluations 0-2
    try:
        ours(sd1, steps=6, feature_cache=5, guidance_interval=interval)
    finally:
        hook.remove()
    assert mid.count == 2  # evaluation 0, and 3 (the batch halves), not 5


def test_feature_cache_is_per_call_and_counts(sd1: Any) -> None:
    cache = FeatureCache(3)
    x = torch.zeros(2, 4, 8, 8)
    assert [cache.refresh(x) for _ in range(2)] == [True, True]  # nothing kept yet
    cache.keep(torch.zeros(2, 64, 8, 8))
    assert [cache.refresh(x) for _ in range(5)] == [False, False, True, False, False]
    assert cache.refresh(x[:1]) is True  # another batch
    assert (cache.full, cache.partial) == (4, 4)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(InvalidArgumentError, match="feature_cache"):
            FeatureCache(bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match="feature_cache"):
            latentkit.Request.create("a cat", feature_cache=bad)


@pytest.mark.parametrize("option", ["compile", "unet_tiling"])
def test_feature_cache_is_refused_where_the_unet_is_not_eager_and_whole(
    sd1_path: Path, option: str
) -> None:
    pipe = latentkit.load_pipeline(
        sd1_path,
        device="cpu",
        dtype="fp32",
        progress=False,
        performance=Performance(**{option: True}),  # type: ignore[arg-type]
    )
    with pytest.raises(InvalidArgumentError, match=f"feature_cache does not go with.*{option}"):
        pipe.generate("a cat", feature_cache=2, steps=2, progress=False)


# The shallow evaluation against diffusers' own blocks: conv_in and the first layer of the
# first down block make skips 0 and 1; the last up block is entered at the layer that reads
# skip 1, from the feature the last full evaluation fed that layer.


def _unet_kwargs(kind: str) -> dict[str, Any]:
    from tiny_models import sd1_unet_kwargs

    if kind == "sd1":  # one layer per block, cross-attention in the first block
        return sd1_unet_kwargs()
    # SDXL-like: two layers per block, no attention in the first (outermost) block
    return {
        **sd1_unet_kwargs(),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    }


def _shallow_reference(
    ref: Any,
    sample: torch.Tensor,
    t: torch.Tensor,
    context: torch.Tensor,
    feature: torch.Tensor,
    residuals: ControlResiduals | None,
) -> torch.Tensor:
    """DeepCache's partial evaluation written with diffusers' modules (Ma et al. 2024)."""
    temb = ref.time_embedding(ref.time_proj(t.expand(sample.shape[0])).to(sample.dtype))
    first = ref.down_blocks[0]
    skips = [ref.conv_in(sample)]
    h = first.resnets[0](skips[0], temb)
    if getattr(first, "attentions", None):
        h = first.attentions[0](h, encoder_hidden_states=context, return_dict=False)[0]
    skips.append(h)
    if residuals is not None:
        skips = [s + r for s, r in zip(skips, residuals.down, strict=False)]
    up = ref.up_blocks[-1]
    x = feature
    for i in range(len(up.resnets) - 1 - CACHE_SKIP, len(up.resnets)):
        x = up.resnets[i](torch.cat([x, skips.pop()], dim=1), temb)
        if getattr(up, "attentions", None):
            x = up.attentions[i](x, encoder_hidden_states=context, return_dict=False)[0]
    out: torch.Tensor = ref.conv_out(ref.conv_act(ref.conv_norm_out(x)))
    return out


@pytest.mark.parametrize("kind", ["sd1", "two-layers"])
@pytest.mark.parametrize("control", [False, True], ids=["plain", "control"])
def test_shallow_evaluations_match_diffusers_blocks(kind: str, control: bool) -> None:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    ref = UNet2DConditionModel(**_unet_kwargs(kind)).eval()
    with torch.device("meta"):
        unet = UNet2DCondition(UNetConfig.from_dict(dict(ref.config)))
    unet.load_state_dict(ref.state_dict(), strict=True, assign=True)
    unet.eval()
    layers = ref.config.layers_per_block
    entry = ref.up_blocks[-1].resnets[layers - CACHE_SKIP]
    kept: list[torch.Tensor] = []
    hook = entry.register_forward_pre_hook(lambda m, a: kept.append(a[0]))
    context = torch.randn(2, 5, 32)
    residuals = None
    if control:
        shapes = [(2, 32, 8, 8)] * (layers + 1) + [(2, 32, 4, 4)] + [(2, 64, 4, 4)] * layers
        residuals = ControlResiduals(
            tuple(torch.randn(s) for s in shapes), torch.randn(2, 64, 4, 4)
        )
    extra: dict[str, Any] = {}
    if residuals is not None:
        extra = {
            "down_block_additional_residuals": residuals.down,
            "mid_block_additional_residual": residuals.mid,
        }
    cache = FeatureCache(3)
    with torch.no_grad():
        for step in range(4):
            sample, t = torch.randn(2, 4, 8, 8), torch.tensor(900.0 - 200 * step)
            got = unet(sample, t, context, control=residuals, cache=cache)
            if step % 3 == 0:  # a refresh: the whole network, its feature kept
                expected = ref(sample, t, context, **extra).sample
                feature = kept[-1][:, :-32]  # the layer's input less skip 1 (32 channels)
                assert cache.feature is not None
                assert (cache.feature - feature).abs().max() <= UNET_TOL
            else:
                expected = _shallow_reference(ref, sample, t, context, feature, residuals)
            assert (got - expected).abs().max() <= UNET_TOL
    hook.remove()
    assert (cache.full, cache.partial) == (2, 2)

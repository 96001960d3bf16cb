"""LoRA (`latentkit.adapters.lora`) against diffusers + PEFT and the closed form.

UNet LoRAs are compared with diffusers' ``load_lora_weights`` (unfused, and after
``fuse_lora``) on the tiny SD 1.x and SDXL pipelines, for files in the diffusers/PEFT
format (written by ``save_lora_weights``) and in kohya's (written here from the naming
rules; SDXL's with the original block names, which diffusers converts with its own code).
Text-encoder LoRAs are compared with the closed form ``W + scale * alpha/rank * up @ down``
on transformers' modules (diffusers needs peft >= 0.22 for them with transformers 5).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tiny_models
import torch
from safetensors.torch import save_file
from torch import nn

from latentkit.adapters import AdapterMismatchError, PartialAdapterWarning
from latentkit.adapters.common import get_module
from latentkit.adapters.lora import (
    Lora,
    LoraConv2d,
    LoraLinear,
    LoraWeights,
    apply_lora,
    load_lora,
    lora_from_state_dict,
)
from latentkit.checkpoints.keys import UNetLayout, unet_keys
from latentkit.errors import PickleWeightsError, UnsupportedModelError
from latentkit.models.layers import Conv2d, Upsample
from latentkit.models.text_encoder import CLIPTextConfig, CLIPTextEncoder, rename_checkpoint_key
from latentkit.models.unet import UNet2DCondition, UNetConfig, time_ids_embedding

MODULE_ATOL = 1e-5
"""Largest difference allowed between a network's output with our LoRA and the reference's."""

LORA_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
]
"""Layers the PEFT LoRAs adapt: attention, feed-forward, projections and the ResNets'
convolutions (conv LoRA)."""


# ---------------------------------------------------------------- helpers


def our_unet(reference: Any) -> UNet2DCondition:
    with torch.device("meta"):
        unet = UNet2DCondition(UNetConfig.from_dict(dict(reference.config)))
    unet.load_state_dict(reference.state_dict(), strict=True, assign=True)
    return unet.eval()


def our_text_encoder(reference: Any) -> CLIPTextEncoder:
    config = {**reference.config.to_dict(), "architectures": [type(reference).__name__]}
    with torch.device("meta"):
        encoder = CLIPTextEncoder(CLIPTextConfig.from_dict(config))
    state = {rename_checkpoint_key(k): v for k, v in reference.state_dict().items()}
    encoder.load_state_dict({k: v for k, v in state.items() if k}, strict=True, assign=True)
    return encoder.eval()


Call = Callable[..., torch.Tensor]


def adapt(
    module: nn.Module, lora: Lora | list[Lora], component: str = "unet", **options: Any
) -> Any:
    """`apply_lora` on one network; returns the new network."""
    out = apply_lora({component: module}, lora, **options)[component]
    assert out is not None
    return out


def unet_call(unet: nn.Module, config: UNetConfig) -> Call:
    """A fixed input for ``unet`` (sample, timestep, text, and SDXL's vector); calls return its output."""
    gen = torch.Generator().manual_seed(3)
    sample = torch.randn(2, config.in_channels, 8, 8, generator=gen)
    context = torch.randn(2, 5, config.cross_attention_dim, generator=gen)
    vector = None
    if config.vector_dim is not None:
        assert config.addition_time_embed_dim is not None
        ids = torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)
        ids = ids[:, : (config.vector_dim - tiny_models.SDXL_PROJECTION_DIM) // 8]
        pooled = torch.randn(2, tiny_models.SDXL_PROJECTION_DIM, generator=gen)
        vector = torch.cat(
            [
                pooled,
                time_ids_embedding(
                    ids, config.addition_time_embed_dim, flip_sin_to_cos=True, freq_shift=0
                ),
            ],
            dim=-1,
        )

    def call(module: Any = None) -> torch.Tensor:
        out: torch.Tensor
        with torch.no_grad():
            net: Any = module if module is not None else unet
            if isinstance(net, UNet2DCondition):
                out = net(sample, 500, context, vector)
                return out
            kwargs: dict[str, Any] = {}
            if vector is not None:
                kwargs["added_cond_kwargs"] = {
                    "text_embeds": vector[:, : tiny_models.SDXL_PROJECTION_DIM],
                    "time_ids": ids,
                }
            out = net(sample, 500, context, **kwargs).sample
            return out

    return call


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def lora_layers(root: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """The Linear/Conv2d layers of ``root`` whose path ends with one of ``names``."""
    return {
        p: m
        for p, m in root.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
        and any(p == n or p.endswith("." + n) for n in names)
    }


def random_lora(
    layers: dict[str, nn.Module], *, rank: int = 4, seed: int = 0
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random (down, up) for each layer: conv layers get a down kernel like the layer's.
    Sized so the change is a fair fraction of the (tiny, random) weight, as a trained LoRA's."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for path, layer in layers.items():
        if isinstance(layer, nn.Conv2d):
            down = torch.randn(rank, layer.in_channels, *layer.kernel_size, generator=gen) * 0.1
            up = torch.randn(layer.out_channels, rank, 1, 1, generator=gen) * 0.1
        else:
            assert isinstance(layer, nn.Linear)
            down = torch.randn(rank, layer.in_features, generator=gen) * 0.1
            up = torch.randn(layer.out_features, rank, generator=gen) * 0.1
        out[path] = (down, up)
    return out


def closed_form(
    root: nn.Module,
    matrices: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    alpha: float | None,
    scale: float = 1.0,
) -> nn.Module:
    """A deep copy of ``root`` with ``W += scale * alpha/rank * up @ down`` on each layer."""
    merged = copy.deepcopy(root)
    with torch.no_grad():
        for path, (down, up) in matrices.items():
            layer = get_module(merged, path)
            assert isinstance(layer, (nn.Linear, nn.Conv2d))
            rank = down.shape[0]
            factor = scale * (rank if alpha is None else alpha) / rank
            layer.weight += factor * (up.flatten(1) @ down.flatten(1)).reshape(layer.weight.shape)
    return merged


def kohya_state(
    matrices: dict[str, tuple[torch.Tensor, torch.Tensor]],
    prefix: str,
    *,
    alpha: float | None,
    rename: Callable[[str], str] = lambda p: p,
) -> dict[str, torch.Tensor]:
    """kohya's file layout: ``<prefix><path with . as _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``."""
    state = {}
    for path, (down, up) in matrices.items():
        name = prefix + rename(path).replace(".", "_")
        state[f"{name}.lora_down.weight"] = down
        state[f"{name}.lora_up.weight"] = up
        if alpha is not None:
            state[f"{name}.alpha"] = torch.tensor(alpha)
    return state


def parameters_shared(base: nn.Module, adapted: nn.Module, changed: set[str]) -> None:
    """Every parameter of ``adapted`` outside the ``changed`` layers is the base's own tensor."""
    base_params = dict(base.named_parameters())
    for name, param in adapted.named_parameters():
        layer = name.rsplit(".", 1)[0]
        if layer not in changed:
            assert param.data_ptr() == base_params[name].data_ptr(), name


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sd1() -> Any:
    return tiny_models.build_pipeline("sd1")


@pytest.fixture(scope="module")
def sdxl() -> Any:
    return tiny_models.build_pipeline("sdxl")


def peft_file(pipe: Any, folder: Path, **config: Any) -> Path:
    """A LoRA with random weights on ``pipe``'s UNet, saved by diffusers in the PEFT format."""
    from peft import LoraConfig, get_peft_model_state_dict

    unet = copy.deepcopy(pipe.unet)
    torch.manual_seed(5)
    lora_config: Any = LoraConfig(init_lora_weights=False, target_modules=LORA_TARGETS, **config)
    unet.add_adapter(lora_config)
    type(pipe).save_lora_weights(
        str(folder),
        unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=lora_config.to_dict(),
    )
    return folder


def diffusers_outputs(
    pipe_kind: str, source: Path, call: Callable[[Any], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet outputs of a fresh diffusers pipeline with the LoRA at ``source`` loaded:
    unfused (PEFT's side path), then after ``fuse_lora``."""
    reference = tiny_models.build_pipeline(pipe_kind)
    reference.load_lora_weights(str(source))
    unfused = call(reference.unet)
    reference.fuse_lora()
    return unfused, call(reference.unet)


# ---------------------------------------------------------------- UNet LoRAs vs diffusers


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_peft_unet_lora_matches_diffusers_unfused_and_fused(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """diffusers/PEFT file (rank and alpha patterns in its metadata) on the UNet: our
    unfused and fused outputs against diffusers' unfused and ``fuse_lora`` outputs."""
    pipe = request.getfixturevalue(kind)
    source = peft_file(
        pipe, tmp_path, r=4, lora_alpha=8, rank_pattern={"conv1": 2}, alpha_pattern={"to_k": 3}
    )
    unet = our_unet(pipe.unet)
    call = unet_call(unet, unet.config)
    base_out = call()
    lora = load_lora(source, modules={"unet": unet})
    assert len(lora.weights) == len(lora_layers(unet, LORA_TARGETS))
    to_k = next(w for k, w in lora.weights.items() if k.endswith("attn1.to_k"))
    conv1 = next(w for k, w in lora.weights.items() if k.endswith("resnets.0.conv1"))
    assert (to_k.alpha, to_k.rank, conv1.rank, conv1.alpha) == (3.0, 4, 2, 8.0)
    references = diffusers_outputs(kind, source, call)
    for fuse, expected in zip((False, True), references, strict=True):
        got = call(adapt(unet, lora, fuse=fuse))
        assert max_diff(got, base_out) > 0.05  # the LoRA changes the output
        assert max_diff(got, expected) <= MODULE_ATOL, fuse
    assert torch.equal(call(), base_out)  # the base is untouched, bit for bit


def test_kohya_sd1_unet_lora_matches_diffusers_and_closed_form(sd1: Any, tmp_path: Path) -> None:
    """kohya SD 1.x names are diffusers' module paths with ``_``; conv layers (3x3 kernels,
    the downsampler) get conv LoRAs. Checked against the closed form and diffusers."""
    unet = our_unet(sd1.unet)
    call = unet_call(unet, unet.config)
    layers = lora_layers(
        unet, [*LORA_TARGETS, "conv_in", "downsamplers.0.conv", "upsamplers.0.conv"]
    )
    matrices = random_lora(layers)
    save_file(kohya_state(matrices, "lora_unet_", alpha=2.0), str(tmp_path / "kohya.safetensors"))
    lora = load_lora(tmp_path / "kohya.safetensors", modules={"unet": unet})
    assert len(lora.weights) == len(layers)
    expected = call(closed_form(unet, matrices, alpha=2.0, scale=0.7))
    for fuse in (False, True):
        adapted = adapt(unet, lora, scale=0.7, fuse=fuse)
        assert max_diff(call(adapted), expected) <= MODULE_ATOL
    references = diffusers_outputs("sd1", tmp_path / "kohya.safetensors", call)
    for fuse, reference in zip((False, True), references, strict=True):
        got = call(adapt(unet, lora, fuse=fuse))
        assert max_diff(got, reference) <= MODULE_ATOL


def test_kohya_sdxl_unet_lora_with_original_block_names_matches_diffusers(
    sdxl: Any, tmp_path: Path
) -> None:
    """kohya SDXL files name the UNet's layers by the original (sgm) blocks. diffusers reads
    them with its own converter; ours reads them through `checkpoints.keys.unet_keys`."""
    unet = our_unet(sdxl.unet)
    call = unet_call(unet, unet.config)
    layers = lora_layers(
        unet,
        [
            *LORA_TARGETS,
            "conv_in",
            "conv_out",
            "downsamplers.0.conv",
            "upsamplers.0.conv",
            "linear_1",
        ],
    )
    keys = unet_keys(UNetLayout.from_config(unet.config))
    original = {p: keys.original(p) for p in layers}
    # Spot checks of the names, written from the sgm layout (3 levels of 2 layers).
    assert original["down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"] == (
        "input_blocks.4.1.transformer_blocks.1.attn2.to_k"
    )
    assert original["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.2.conv"
    assert original["down_blocks.0.downsamplers.0.conv"] == "input_blocks.3.0.op"
    assert original["add_embedding.linear_1"] == "label_emb.0.0"
    assert original["mid_block.resnets.1.time_emb_proj"] == "middle_block.2.emb_layers.1"
    matrices = random_lora(layers, seed=1)
    state = kohya_state(matrices, "lora_unet_", alpha=8.0, rename=lambda p: original[p] or p)
    assert "lora_unet_input_blocks_0_0.lora_down.weight" in state  # conv_in
    save_file(state, str(tmp_path / "sdxl_kohya.safetensors"))
    lora = load_lora(tmp_path / "sdxl_kohya.safetensors", modules={"unet": unet})
    assert set(lora.weights) == {f"unet.{p}" for p in layers}
    expected = call(closed_form(unet, matrices, alpha=8.0))
    assert max_diff(expected, call()) > 0.05
    # diffusers agrees on every name: its outputs equal ours in both modes.
    references = diffusers_outputs("sdxl", tmp_path / "sdxl_kohya.safetensors", call)
    for fuse, reference in zip((False, True), references, strict=True):
        got = call(adapt(unet, lora, fuse=fuse))
        assert max_diff(got, reference) <= MODULE_ATOL, fuse
    for fuse in (False, True):
        assert max_diff(call(adapt(unet, lora, fuse=fuse)), expected) <= MODULE_ATOL


# ---------------------------------------------------------------- text encoders vs closed form


@pytest.mark.parametrize("dialect", ["kohya", "peft", "old-diffusers"])
def test_text_encoder_lora_matches_closed_form_on_transformers_modules(
    sd1: Any, dialect: str, tmp_path: Path
) -> None:
    reference = sd1.text_encoder  # transformers 5: no `text_model.` level in its module paths
    ours = our_text_encoder(reference)
    layers = lora_layers(reference, ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    matrices = random_lora(layers, seed=2)
    if dialect == "kohya":
        # kohya writes transformers 4's paths, with `text_model.`
        state = kohya_state(matrices, "lora_te_", alpha=2.0, rename=lambda p: f"text_model.{p}")
        alpha: float | None = 2.0
    else:
        alpha = None  # no alpha in the file: alpha = rank
        state = {}
        for path, (down, up) in matrices.items():
            if dialect == "peft":
                state[f"text_encoder.{path}.lora_A.weight"] = down
                state[f"text_encoder.{path}.lora_B.weight"] = up
            else:
                old = path.replace("q_proj", "to_q_lora").replace("k_proj", "to_k_lora")
                old = old.replace("v_proj", "to_v_lora").replace("out_proj", "to_out_lora")
                old = old if "lora" in old else f"{old}.lora_linear_layer"
                state[f"text_encoder.text_model.{old}.down.weight"] = down
                state[f"text_encoder.text_model.{old}.up.weight"] = up
    save_file(state, str(tmp_path / "te.safetensors"))
    ids = torch.tensor([[98, 5, 17, 40, 99, 99]])
    expected = closed_form(reference, matrices, alpha=alpha, scale=1.5)(ids).last_hidden_state
    for module in (ours, reference):  # latentkit's encoder, and transformers' own modules
        lora = load_lora(tmp_path / "te.safetensors", modules={"text_encoder": module})
        assert len(lora.weights) == len(layers)
        for fuse in (False, True):
            adapted = apply_lora({"text_encoder": module}, lora, scale=1.5, fuse=fuse)
            with torch.no_grad():
                got = adapted["text_encoder"](ids)[0]  # type: ignore[misc]
            assert max_diff(got, expected) <= MODULE_ATOL, (type(module).__name__, fuse)


def test_sdxl_kohya_te1_te2_loras_match_closed_form(sdxl: Any, tmp_path: Path) -> None:
    te1, te2 = our_text_encoder(sdxl.text_encoder), our_text_encoder(sdxl.text_encoder_2)
    m1 = random_lora(lora_layers(te1, ["q_proj", "fc2"]), seed=3)
    m2 = random_lora(lora_layers(te2, ["v_proj", "fc1", "text_projection"]), seed=4)
    state = kohya_state(m1, "lora_te1_", alpha=1.0) | kohya_state(m2, "lora_te2_", alpha=6.0)
    modules = {"text_encoder": te1, "text_encoder_2": te2}
    lora = lora_from_state_dict(state, modules=modules)
    adapted: dict[str, Any] = apply_lora(modules, lora)
    ids = torch.tensor([[0, 5, 17, 40, 2, 1]])
    with torch.no_grad():
        for module, matrices, alpha, name in (
            (te1, m1, 1.0, "text_encoder"),
            (te2, m2, 6.0, "text_encoder_2"),
        ):
            expected = closed_form(module, matrices, alpha=alpha)(ids)
            got = adapted[name](ids)
            assert max_diff(got.last_hidden_state, expected.last_hidden_state) <= MODULE_ATOL
            assert max_diff(got.pooler_output, expected.pooler_output) <= MODULE_ATOL
        assert (
            max_diff(
                adapted["text_encoder_2"](ids).text_embeds,
                closed_form(te2, m2, alpha=6.0)(ids).text_embeds,
            )
            <= MODULE_ATOL
        )


# ---------------------------------------------------------------- semantics


def test_alpha_missing_means_alpha_equals_rank(sd1: Any) -> None:
    unet = our_unet(sd1.unet)
    call = unet_call(unet, unet.config)
    matrices = random_lora(lora_layers(unet, ["to_q", "conv2"]), rank=3)
    without = lora_from_state_dict(
        kohya_state(matrices, "lora_unet_", alpha=None), modules={"unet": unet}
    )
    assert all(w.alpha is None and w.scaling == 1.0 for w in without.weights.values())
    expected = call(closed_form(unet, matrices, alpha=3.0))
    assert max_diff(call(adapt(unet, without)), expected) <= MODULE_ATOL
    halved = lora_from_state_dict(
        kohya_state(matrices, "lora_unet_", alpha=1.5), modules={"unet": unet}
    )
    assert max_diff(call(adapt(unet, halved, scale=2.0)), expected) <= MODULE_ATOL


def test_base_untouched_and_unaffected_parameters_shared(sd1: Any) -> None:
    unet = our_unet(sd1.unet)
    call = unet_call(unet, unet.config)
    before = call()
    state_before = {k: v.clone() for k, v in unet.state_dict().items()}
    layers = lora_layers(unet, ["attn2.to_q", "conv1"])
    lora = lora_from_state_dict(
        kohya_state(random_lora(layers), "lora_unet_", alpha=4.0), modules={"unet": unet}
    )
    unfused = adapt(unet, lora)
    fused = adapt(unet, lora, fuse=True)
    assert unfused is not unet and fused is not unet
    # Unfused: every parameter is the base's own tensor; fused: all but the adapted weights.
    parameters_shared(unet, unfused, changed=set())
    parameters_shared(unet, fused, changed=set(layers))
    fused_params = dict(fused.named_parameters())
    for path in layers:
        base_layer: Any = get_module(unet, path)
        assert fused_params[f"{path}.weight"].data_ptr() != base_layer.weight.data_ptr()
        if f"{path}.bias" in fused_params:
            assert fused_params[f"{path}.bias"].data_ptr() == base_layer.bias.data_ptr()
        assert type(get_module(unfused, path)) in (LoraLinear, LoraConv2d)
        assert type(get_module(unet, path)) in (nn.Linear, Conv2d)  # the base keeps its layers
    # Modules off the adapted paths are the base's own objects.
    assert unfused.conv_in is unet.conv_in and unfused.time_embedding is unet.time_embedding
    assert unfused.up_blocks[0].upsamplers is unet.up_blocks[0].upsamplers
    call(unfused), call(fused)
    assert torch.equal(call(), before)
    assert all(torch.equal(v, state_before[k]) for k, v in unet.state_dict().items())
    assert unfused.state_dict().keys() == unet.state_dict().keys()  # side paths are not saved


def test_stacked_loras_in_both_modes_match_closed_form(sd1: Any) -> None:
    unet = our_unet(sd1.unet)
    call = unet_call(unet, unet.config)
    first = random_lora(lora_layers(unet, ["to_q", "to_v", "conv1"]), seed=6)
    second = random_lora(lora_layers(unet, ["to_q", "ff.net.2", "conv1"]), seed=7, rank=2)
    a = lora_from_state_dict(kohya_state(first, "lora_unet_", alpha=2.0), modules={"unet": unet})
    b = lora_from_state_dict(kohya_state(second, "lora_unet_", alpha=1.0), modules={"unet": unet})
    expected = call(closed_form(closed_form(unet, first, alpha=2.0, scale=0.5), second, alpha=1.0))
    for fuse_a in (False, True):
        for fuse_b in (False, True):
            one = apply_lora({"unet": unet}, a, scale=0.5, fuse=fuse_a)
            two: Any = apply_lora(one, b, fuse=fuse_b)["unet"]
            assert max_diff(call(two), expected) <= MODULE_ATOL, (fuse_a, fuse_b)
            if not fuse_a and not fuse_b:
                layer = get_module(two, "down_blocks.0.resnets.0.conv1")
                assert isinstance(layer, LoraConv2d) and len(layer.adapters) == 2
    together = adapt(unet, [a, b], scale=[0.5, 1.0])
    assert max_diff(call(together), expected) <= MODULE_ATOL


@pytest.mark.parametrize("fuse", [False, True])
def test_lora_on_fused_qkv_projections(sd1: Any, fuse: bool) -> None:
    """A LoRA on to_q/to_k/to_v adapts the rows of latentkit's fused to_qkv / to_kv, applied
    before or after fusing (an attention with side paths then stays unfused)."""
    unet = our_unet(sd1.unet)
    call = unet_call(unet, unet.config)
    matrices = random_lora(lora_layers(unet, ["to_q", "to_k", "to_v"]), seed=8)
    expected = call(closed_form(unet, matrices, alpha=4.0))
    fused_base: Any = copy.deepcopy(unet)
    for module in fused_base.modules():
        if hasattr(module, "fuse_projections"):
            module.fuse_projections()
    assert not hasattr(fused_base.mid_block.attentions[0].transformer_blocks[0].attn1, "to_q")
    lora = lora_from_state_dict(
        kohya_state(matrices, "lora_unet_", alpha=4.0), modules={"unet": fused_base}
    )
    after = adapt(fused_base, lora, fuse=fuse)
    assert max_diff(call(after), expected) <= MODULE_ATOL
    # Adapt first, fuse after (the order build -> load -> adapt -> prepare).
    lora = lora_from_state_dict(
        kohya_state(matrices, "lora_unet_", alpha=4.0), modules={"unet": unet}
    )
    before = adapt(unet, lora, fuse=fuse)
    assert before is not None
    for module in before.modules():
        if hasattr(module, "fuse_projections"):
            module.fuse_projections()
    assert max_diff(call(before), expected) <= MODULE_ATOL


def test_conv_lora_on_a_gemm_convolution_and_an_upsampler_by_phases() -> None:
    """Conv LoRA: ``down`` convolves with the layer's kernel/stride/padding, ``up`` is 1x1;
    latentkit's `Conv2d.gemm` is kept, and an upsampler by phases uses the side path."""
    torch.manual_seed(0)
    conv = Conv2d(8, 6, kernel_size=3, stride=2, padding=1)
    conv.gemm = True
    down, up = torch.randn(2, 8, 3, 3) * 0.1, torch.randn(6, 2, 1, 1) * 0.1
    lora = Lora({"unet.conv": LoraWeights(down, up, alpha=1.0)})
    x = torch.randn(1, 8, 8, 8)
    holder = nn.Module()
    holder.conv = conv
    expected = torch.nn.functional.conv2d(
        x,
        conv.weight + 0.5 * (up.flatten(1) @ down.flatten(1)).reshape(6, 8, 3, 3),
        conv.bias,
        2,
        1,
    )
    for fuse in (False, True):
        adapted: Any = adapt(holder, lora, fuse=fuse)
        assert adapted.conv.gemm is True
        assert max_diff(adapted.conv(x), expected) <= MODULE_ATOL
    upsample = Upsample(8)
    upsample.phases = True
    x = torch.randn(1, 8, 16, 16)
    lora = Lora(
        {"unet.conv": LoraWeights(torch.randn(2, 8, 3, 3) * 0.1, torch.randn(8, 2, 1, 1) * 0.1)}
    )
    with torch.no_grad():
        unfused: Any = adapt(upsample, lora)
        fused: Any = adapt(upsample, lora, fuse=True)
        assert fused.phases and unfused.phases  # the flag stays; the side path is honoured
        assert max_diff(unfused(x, (32, 32)), fused(x, (32, 32))) <= MODULE_ATOL
        assert max_diff(unfused(x, (32, 32)), upsample(x, (32, 32))) > 0.05


# ---------------------------------------------------------------- errors and warnings


def test_sdxl_lora_on_sd1_is_an_error_naming_the_matched_count(sd1: Any, sdxl: Any) -> None:
    unet1, unetxl = our_unet(sd1.unet), our_unet(sdxl.unet)
    keys = unet_keys(UNetLayout.from_config(unetxl.config))
    layers = lora_layers(unetxl, ["to_q", "to_k", "proj_in"])
    state = kohya_state(
        random_lora(layers), "lora_unet_", alpha=1.0, rename=lambda p: keys.original(p) or p
    )
    with pytest.raises(AdapterMismatchError, match=r"of \d+ LoRA modules match") as info:
        lora_from_state_dict(state, modules={"unet": unet1})
    assert info.value.total == len(layers) and info.value.matched < len(layers)


def test_shape_mismatch_is_always_an_error(sd1: Any) -> None:
    unet = our_unet(sd1.unet)
    layers = lora_layers(unet, ["attn2.to_k"])
    matrices = random_lora(layers)
    path = next(iter(matrices))
    down, up = matrices[path]
    matrices[path] = (torch.randn(4, down.shape[1] + 1), up)  # wrong input width
    with pytest.raises(
        AdapterMismatchError, match=r"\d+ of \d+ LoRA modules match.*other shapes"
    ) as info:
        lora_from_state_dict(kohya_state(matrices, "lora_unet_", alpha=1.0), modules={"unet": unet})
    assert info.value.matched == len(layers) - 1
    # A Lora read for one network and applied to another of different shape: also an error.
    good = lora_from_state_dict(
        kohya_state(random_lora(layers), "lora_unet_", alpha=1.0), modules={"unet": unet}
    )
    with pytest.raises(AdapterMismatchError, match="fit these networks"):
        apply_lora({"unet": our_unet(tiny_models.build_pipeline("sd2").unet)}, good)


def test_a_file_without_lora_weights_is_an_error(sd1: Any) -> None:
    unet = our_unet(sd1.unet)
    with pytest.raises(AdapterMismatchError, match="no LoRA weights") as info:
        lora_from_state_dict(dict(sd1.unet.state_dict()), modules={"unet": unet})
    assert info.value.matched == 0


def test_unsupported_adapter_kinds_are_refused_by_name(sd1: Any) -> None:
    unet = our_unet(sd1.unet)
    for key, kind in (
        ("lora_unet_conv_in.hada_w1_a", "LoHa"),
        ("lora_unet_conv_in.dora_scale", "DoRA"),
        ("unet.conv_in.lora_magnitude_vector", "DoRA"),
        ("lora_unet_conv_in.lokr_w1", "LoKr"),
    ):
        with pytest.raises(UnsupportedModelError, match=kind):
            lora_from_state_dict({key: torch.zeros(1)}, modules={"unet": unet})


def test_parts_for_a_missing_encoder_are_a_warning_listing_them(sd1: Any) -> None:
    unet, te = our_unet(sd1.unet), our_text_encoder(sd1.text_encoder)
    state = kohya_state(random_lora(lora_layers(unet, ["to_q"])), "lora_unet_", alpha=1.0)
    state |= kohya_state(random_lora(lora_layers(te, ["q_proj"])), "lora_te_", alpha=1.0)
    with pytest.warns(PartialAdapterWarning, match=r"text_encoder: 2 modules \(lora_te_.*q_proj"):
        lora = lora_from_state_dict(state, modules={"unet": unet, "text_encoder": None})
    assert lora.components() == ["unet"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # complete match: no warning
        full = lora_from_state_dict(state, modules={"unet": unet, "text_encoder": te})
    assert full.components() == ["text_encoder", "unet"]


# ---------------------------------------------------------------- sources


def test_sources_file_folder_hub_cache_and_pickles(
    sd1: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unet = our_unet(sd1.unet)
    state = kohya_state(random_lora(lora_layers(unet, ["to_q"])), "lora_unet_", alpha=1.0)
    folder = tmp_path / "folder"
    folder.mkdir()
    save_file(state, str(folder / "pytorch_lora_weights.safetensors"))
    expected = load_lora(folder / "pytorch_lora_weights.safetensors", modules={"unet": unet})
    from_folder = load_lora(folder, modules={"unet": unet})
    assert from_folder.weights.keys() == expected.weights.keys()
    # A Hub repo, from a cache laid out as huggingface_hub does, offline.
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--lora" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (cache / "models--someone--lora" / "refs").mkdir()
    (cache / "models--someone--lora" / "refs" / "main").write_text("a" * 40)
    save_file(state, str(snapshot / "pytorch_lora_weights.safetensors"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from_hub = load_lora(
        "someone/lora", modules={"unet": unet}, cache_dir=cache, local_files_only=True
    )
    assert all(torch.equal(from_hub.weights[k].down, w.down) for k, w in expected.weights.items())
    torch.save(state, str(tmp_path / "lora.pt"))
    with pytest.raises(PickleWeightsError):
        load_lora(tmp_path / "lora.pt", modules={"unet": unet})
    pickled = load_lora(tmp_path / "lora.pt", modules={"unet": unet}, allow_pickle=True)
    assert pickled.weights.keys() == expected.weights.keys()

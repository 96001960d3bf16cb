"""Training building blocks: closed-form checks of each piece, and short runs on tiny
synthetic problems in which each loss must fall."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentkit import schedulers
from latentkit.errors import InvalidArgumentError
from latentkit.lab.training import (
    EMA,
    autoencoder_loss,
    build_word_tokenizer,
    contrastive_loss,
    denoiser_loss,
    drop_context,
    kl_to_standard_normal,
    train_autoencoder,
    train_controlnet,
    train_denoiser,
)
from latentkit.models.autoencoder import AutoencoderKL, AutoencoderKLConfig
from latentkit.models.controlnet import ControlNet
from latentkit.models.unet import UNet2DCondition, UNetConfig

WORDS = ["a", "an", "small", "large", "red", "green", "blue", "circle", "square", "triangle"]
WORDS += ["on", "of", "and", "cat", "scat", "aaaa", "aa", "über", "7", "!"]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from intra-op threads, and on a busy shared machine their
    synchronisation dominates (training here ran 40x slower with 2 threads and a busy core)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- tokenizer


def test_each_vocabulary_word_is_one_token() -> None:
    tok = build_word_tokenizer(WORDS, model_max_length=16)
    for word in WORDS:
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, word
        assert tok.decode(ids) == word
    # Words that contain one another stay whole (merges of later words never apply to
    # earlier ones and vice versa).
    assert tok.tokenize("scat cat aa aaaa") == ["scat</w>", "cat</w>", "aa</w>", "aaaa</w>"]


def test_captions_round_trip() -> None:
    tok = build_word_tokenizer(WORDS, model_max_length=16)
    # Decoding puts a space after each word-final token, as CLIP's does ("cats!" -> "cats !"),
    # so captions of space-separated words round-trip.
    for caption in ["a small red circle on a blue square", "über 7 cats ! xq", "zebra"]:
        encoded = tok(caption, padding="max_length", max_length=16, truncation=True)
        assert len(encoded.input_ids) == 16
        assert encoded.input_ids[0] == tok.bos_token_id
        assert tok.decode(encoded.input_ids, skip_special_tokens=True) == caption
    # Unknown words fall back to byte tokens; known words cost one token each.
    assert len(tok("a large green triangle", add_special_tokens=False).input_ids) == 4
    assert tok.tokenize("zebra") == ["z", "e", "b", "r", "a</w>"]


def test_tokenizer_layout() -> None:
    tok = build_word_tokenizer(["red", "red", "blue"], model_max_length=77)
    assert tok.model_max_length == 77
    vocab = tok.get_vocab()
    # 512 byte tokens, the merged prefixes of "red" (re, red</w>) and "blue" (bl, blu, blue</w>).
    assert len(vocab) == 512 + 5 + 2
    assert vocab["<|startoftext|>"] == len(vocab) - 2 == tok.bos_token_id
    assert vocab["<|endoftext|>"] == len(vocab) - 1 == tok.eos_token_id == tok.pad_token_id
    # The same words give the same ids: a saved tokenizer can be rebuilt.
    again = build_word_tokenizer(["red", "blue"])
    assert again.get_vocab() == vocab


@pytest.mark.parametrize("word", ["Red", "red circle", "red-circle", "a1", ""])
def test_tokenizer_rejects_words_clip_would_split(word: str) -> None:
    with pytest.raises(InvalidArgumentError, match="vocabulary word"):
        build_word_tokenizer([word])


# ---------------------------------------------------------------- autoencoder


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        AutoencoderKLConfig(
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=2,
            norm_num_groups=4,
            sample_size=8,
            mid_block_add_attention=False,
        )
    )


def shape_images(n: int, seed: int) -> Tensor:
    """8x8 images in [-1, 1]: a coloured axis-aligned rectangle on a coloured background."""
    g = torch.Generator().manual_seed(seed)
    images = torch.empty(n, 3, 8, 8)
    for i in range(n):
        background, colour = torch.rand(2, 3, 1, 1, generator=g) * 2 - 1
        y0, x0 = torch.randint(0, 5, (2,), generator=g).tolist()
        images[i] = background
        images[i, :, y0 : y0 + 4, x0 : x0 + 4] = colour
    return images


def test_kl_closed_form() -> None:
    mean = torch.tensor([[0.0, 1.0, -2.0]])
    logvar = torch.tensor([[0.0, math.log(4.0), 0.0]])
    # 0.5 * (mu^2 + var - 1 - log var) per element: 0, 0.5 * (1 + 4 - 1 - log 4), 2
    expected = 0.5 * (1 + 4 - 1 - math.log(4.0)) + 2.0
    assert kl_to_standard_normal(mean, logvar).item() == pytest.approx(expected)


def test_autoencoder_loss_terms() -> None:
    vae = tiny_vae()
    images = shape_images(4, seed=1)
    g = torch.Generator().manual_seed(0)
    l1 = autoencoder_loss(vae, images, kl_weight=0.0, generator=g)
    assert l1.total.item() == pytest.approx(l1.reconstruction.item())
    heavy = autoencoder_loss(vae, images, kl_weight=1.0, generator=torch.Generator().manual_seed(0))
    assert heavy.kl.item() > 0
    values = 3 * 8 * 8
    assert heavy.total.item() == pytest.approx(l1.reconstruction.item() + heavy.kl.item() / values)
    with pytest.raises(InvalidArgumentError, match="reconstruction"):
        autoencoder_loss(vae, images, kl_weight=0.0, reconstruction="l3")  # type: ignore[arg-type]


def test_autoencoder_training_lowers_the_loss() -> None:
    vae = tiny_vae()
    batches = [shape_images(8, seed=s) for s in range(2)]
    log = train_autoencoder(
        vae, batches, steps=60, lr=1e-2, kl_weight=1e-3, max_grad_norm=None, progress=False
    )
    assert [s for s, _ in log] == list(range(1, 61))
    first = sum(v for _, v in log[:4]) / 4  # two batches, so each mean covers both twice
    last = sum(v for _, v in log[-4:]) / 4
    assert last < 0.65 * first, (first, last)  # measured: 0.50 -> 0.26


# ---------------------------------------------------------------- denoiser


class Oracle(nn.Module):
    """Knows the one clean sample ``x0``, so it predicts the exact target from ``(x_t, t)``."""

    def __init__(self, x0: Tensor, scheduler: Any) -> None:
        super().__init__()
        self.x0, self.scheduler = x0, scheduler

    def forward(self, x_t: Tensor, t: Tensor, context: Tensor) -> Tensor:
        a = self.scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        eps = (x_t - a.sqrt() * self.x0) / (1 - a).sqrt()
        kind = self.scheduler.prediction_type
        if kind == "epsilon":
            return eps
        if kind == "sample":
            return self.x0.expand_as(x_t)
        return a.sqrt() * eps - (1 - a).sqrt() * self.x0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_denoiser_loss_is_zero_for_the_exact_prediction(prediction_type: str) -> None:
    scheduler = schedulers.create("ddpm", prediction_type=prediction_type)
    x0 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    latents = x0.expand(64, -1, -1, -1)
    oracle = Oracle(x0, scheduler)
    g = torch.Generator().manual_seed(1)
    assert denoiser_loss(oracle, scheduler, latents, torch.zeros(64, 1, 1), g).item() < 1e-6
    # A network predicting zeros has loss E[target^2]: 1 for epsilon (unit noise).
    if prediction_type == "epsilon":
        zero: Any = lambda x, t, c: torch.zeros_like(x)  # noqa: E731
        loss = denoiser_loss(zero, scheduler, latents, torch.zeros(64, 1, 1), g)
        assert loss.item() == pytest.approx(1.0, abs=0.05)


def test_timesteps_are_uniform() -> None:
    scheduler = schedulers.create("ddpm", num_train_timesteps=10)
    seen: list[Tensor] = []

    def spy(x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        seen.append(t)
        return x

    g = torch.Generator().manual_seed(0)
    denoiser_loss(spy, scheduler, torch.zeros(5000, 1, 1, 1), torch.zeros(5000, 1, 1), g)  # type: ignore[arg-type]
    counts = torch.bincount(seen[0], minlength=10).float()
    assert counts.shape == (10,)
    # Each of the 10 timesteps has 500 expected draws, sd ~21: all within 5 sd.
    assert (counts - 500).abs().max() < 5 * math.sqrt(5000 * 0.1 * 0.9)


def tiny_unet() -> UNet2DCondition:
    torch.manual_seed(0)
    return UNet2DCondition(
        UNetConfig(
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            num_attention_heads=(2, 2),
            cross_attention_dim=8,
            norm_num_groups=8,
        )
    )


def latent_set() -> list[tuple[Tensor, Tensor]]:
    """Two batches of (latents, context): 4x4 latents that are smooth functions of a class,
    and a context that names the class."""
    g = torch.Generator().manual_seed(0)
    prototypes = torch.randn(4, 4, 1, 1, generator=g) * torch.linspace(-1, 1, 4).reshape(1, 1, 4, 1)
    prototypes = prototypes + torch.randn(4, 4, 4, 4, generator=g) * 0.1
    names = torch.randn(4, 3, 8, generator=g)
    batches = []
    for _ in range(2):
        classes = torch.randint(0, 4, (8,), generator=g)
        batches.append((prototypes[classes], names[classes]))
    return batches


def held_out_loss(unet: nn.Module, scheduler: Any) -> float:
    """The loss on fixed draws (same noise and timesteps every call), 8 repeats of the data."""
    latents = torch.cat([b[0] for b in latent_set()] * 4)
    context = torch.cat([b[1] for b in latent_set()] * 4)
    with torch.no_grad():
        loss = denoiser_loss(unet, scheduler, latents, context, torch.Generator().manual_seed(99))
    return loss.item()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_denoiser_training_lowers_the_loss(prediction_type: str) -> None:
    scheduler = schedulers.create("ddpm", prediction_type=prediction_type)
    unet = tiny_unet()
    before = held_out_loss(unet, scheduler)
    log = train_denoiser(
        unet,
        scheduler,
        latent_set(),
        steps=30,
        lr=2e-3,
        empty_context=torch.zeros(3, 8),
        p_uncond=0.1,
        progress=False,
    )
    after = held_out_loss(unet, scheduler)
    assert len(log) == 30
    assert after < 0.7 * before, (before, after)  # measured: eps 1.10 -> 0.54, v 0.79 -> 0.41


def test_same_seed_same_losses() -> None:
    scheduler = schedulers.create("ddpm")
    start = tiny_unet()

    def run(seed: int) -> list[tuple[int, float]]:
        unet = copy.deepcopy(start)
        return train_denoiser(
            unet,
            scheduler,
            latent_set(),
            steps=4,
            lr=1e-3,
            empty_context=torch.zeros(3, 8),
            ema=EMA(unet, decay=0.9),
            seed=seed,
            progress=False,
        )

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_progress_bar_and_callback(capfd: pytest.CaptureFixture[str]) -> None:
    scheduler = schedulers.create("ddpm")
    seen: list[tuple[int, float]] = []
    log = train_denoiser(
        tiny_unet(),
        scheduler,
        latent_set(),
        steps=2,
        progress=False,
        callback=lambda step, loss: seen.append((step, loss)),
    )
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    assert seen == log
    train_denoiser(tiny_unet(), scheduler, latent_set(), steps=1, progress=True)
    assert "training denoiser" in capfd.readouterr().err


def test_batches_restart_or_run_out() -> None:
    scheduler = schedulers.create("ddpm")
    data = latent_set()  # two batches, reused for five steps
    assert len(train_denoiser(tiny_unet(), scheduler, data, steps=5, progress=False)) == 5
    with pytest.raises(InvalidArgumentError, match="ran out"):
        train_denoiser(tiny_unet(), scheduler, iter(data), steps=3, progress=False)
    with pytest.raises(InvalidArgumentError, match="trainable"):
        train_denoiser(tiny_unet().requires_grad_(False), scheduler, data, steps=1, progress=False)


# ---------------------------------------------------------------- ControlNet


def control_set() -> list[tuple[Tensor, Tensor, Tensor]]:
    """Two batches of (latents, context, control image): 4x4 latents of one of 4 classes that
    only the control image tells apart (a bright column at a class's place in an 8x8
    picture); the context is the same for all."""
    g = torch.Generator().manual_seed(1)
    prototypes = torch.randn(4, 4, 4, 4, generator=g)
    images = torch.zeros(4, 3, 8, 8)
    for k in range(4):
        images[k, :, :, 2 * k : 2 * k + 2] = 1.0
    batches = []
    for _ in range(2):
        classes = torch.randint(0, 4, (8,), generator=g)
        batches.append((prototypes[classes], torch.zeros(8, 3, 8), images[classes]))
    return batches


def controlled_loss(
    unet: UNet2DCondition, controlnet: ControlNet, scheduler: Any, shuffle: bool = False
) -> float:
    """The loss on fixed draws, 8 repeats of the data; ``shuffle``: each item gets another
    item's control image."""
    data = control_set() * 4
    latents, context, images = (torch.cat([b[i] for b in data]) for i in range(3))
    if shuffle:
        images = images.roll(1, dims=0)

    def model(x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        return unet(x, t, c, control=controlnet(x, t, c, images))

    with torch.no_grad():
        loss = denoiser_loss(model, scheduler, latents, context, torch.Generator().manual_seed(99))  # type: ignore[arg-type]
    return loss.item()


def test_controlnet_training_learns_to_read_the_control_image() -> None:
    scheduler = schedulers.create("ddpm", prediction_type="v_prediction")
    # A base model first, as in practice: a UNet that denoises the latents without knowing
    # their class, then frozen.
    unet = tiny_unet()
    unconditional = [(latents, context) for latents, context, _ in control_set()]
    train_denoiser(unet, scheduler, unconditional, steps=40, lr=2e-3, progress=False)
    unet.requires_grad_(False)
    weights = copy.deepcopy(unet.state_dict())
    torch.manual_seed(0)
    controlnet = ControlNet.from_unet(unet, conditioning_embedding_out_channels=(4, 8))
    before = controlled_loss(unet, controlnet, scheduler)
    log = train_controlnet(
        controlnet, unet, scheduler, control_set(), steps=80, lr=5e-3, progress=False
    )
    after = controlled_loss(unet, controlnet, scheduler)
    shuffled = controlled_loss(unet, controlnet, scheduler, shuffle=True)
    assert len(log) == 80
    # Measured: 0.816 before, 0.613 after, 0.875 with shuffled control images.
    assert after < 0.85 * before, (before, after)
    # What it learnt is in the control image: with another item's, the loss is higher.
    assert after < 0.8 * shuffled, (after, shuffled)
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in weights.items())  # frozen


def test_controlnet_training_checks_and_repeats() -> None:
    scheduler = schedulers.create("ddpm")
    unet = tiny_unet()
    with pytest.raises(InvalidArgumentError, match="frozen UNet"):
        train_controlnet(
            ControlNet.from_unet(unet, conditioning_embedding_out_channels=(4, 8)),
            unet,
            scheduler,
            control_set(),
            steps=1,
            progress=False,
        )
    unet.requires_grad_(False)
    start = ControlNet.from_unet(unet, conditioning_embedding_out_channels=(4, 8))

    def run(seed: int) -> list[tuple[int, float]]:
        return train_controlnet(
            copy.deepcopy(start),
            unet,
            scheduler,
            control_set(),
            steps=3,
            lr=1e-3,
            empty_context=torch.zeros(3, 8),
            seed=seed,
            progress=False,
        )

    assert run(0) == run(0)
    assert run(0) != run(1)


# ---------------------------------------------------------------- classifier-free guidance


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_context_dropout_fraction(p: float) -> None:
    n = 20_000
    context = torch.ones(n, 2, 3)
    empty = torch.zeros(2, 3)
    out = drop_context(context, empty, p_uncond=p, generator=torch.Generator().manual_seed(0))
    dropped = (out == 0).all(dim=(1, 2))
    kept = (out == 1).all(dim=(1, 2))
    assert bool((dropped | kept).all())  # each item is wholly one or the other
    assert abs(dropped.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_context_dropout_edges() -> None:
    context = torch.randn(16, 2, 3)
    empty = torch.randn(1, 2, 3)
    assert torch.equal(drop_context(context, empty, p_uncond=0.0), context)
    assert torch.equal(drop_context(context, empty, p_uncond=1.0), empty.expand(16, 2, 3))
    with pytest.raises(InvalidArgumentError, match="p_uncond"):
        drop_context(context, empty, p_uncond=1.5)
    with pytest.raises(InvalidArgumentError, match="shape"):
        drop_context(context, torch.zeros(3, 3), p_uncond=0.5)


# ---------------------------------------------------------------- EMA


def test_ema_warmup_math() -> None:
    net = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = EMA(net, decay=0.4)
    expected = 0.0
    for n, value in enumerate([1.0, 2.0, 4.0, 8.0, 16.0, 32.0], start=1):
        with torch.no_grad():
            net.weight.fill_(value)
        d = min(0.4, (1 + n) / (10 + n))  # 2/11, 3/12, 4/13, 5/14, then the cap 0.4
        assert ema.current_decay() == pytest.approx(d)
        ema.update(net)
        expected = d * expected + (1 - d) * value
        assert ema.shadow["weight"].item() == pytest.approx(expected)
    assert ema.updates == 6
    # the first update keeps 2/11 of the start
    assert pytest.approx(1 - min(0.5, 2 / 11)) == (1 - 2 / 11)
    ema.copy_to(net)
    assert net.weight.item() == pytest.approx(expected)


def test_ema_cap_and_state() -> None:
    net = nn.Linear(1, 1, bias=False)
    ema = EMA(net, decay=0.9)
    ema.updates = 1000
    assert ema.current_decay() == 0.9  # warm-up over: the cap
    assert EMA(net, decay=0.9, warmup=False).current_decay() == 0.9
    other = EMA(nn.Linear(1, 1, bias=False), decay=0.1)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1000 and other.decay == 0.9
    assert torch.equal(other.shadow["weight"], ema.shadow["weight"])


def test_min_snr_weights_follow_the_paper() -> None:
    """Hang et al. 2023: x0 targets get weight min(SNR_t, gamma); with a zero prediction and
    x0 = 1 every item's squared error is 1, so the loss is the mean weight of the drawn t."""
    scheduler = schedulers.create("ddpm", prediction_type="sample")
    drawn: list[Tensor] = []

    def zero(x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        drawn.append(t)
        return torch.zeros_like(x)

    g = torch.Generator().manual_seed(0)
    loss = denoiser_loss(
        zero, scheduler, torch.ones(256, 1, 2, 2), torch.zeros(256, 1, 1), g, snr_gamma=5.0
    )  # type: ignore[arg-type]
    a = scheduler.alphas_cumprod.double()[drawn[0]]
    expected = (a / (1 - a)).clamp(max=5.0).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_min_snr_with_a_huge_gamma_is_the_plain_epsilon_loss() -> None:
    scheduler = schedulers.create("ddpm")
    x0 = torch.randn(32, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    half: Any = lambda x, t, c: 0.5 * x  # noqa: E731
    plain = denoiser_loss(
        half, scheduler, x0, torch.zeros(32, 1, 1), torch.Generator().manual_seed(1)
    )
    weighted = denoiser_loss(
        half, scheduler, x0, torch.zeros(32, 1, 1), torch.Generator().manual_seed(1), snr_gamma=1e12
    )
    assert weighted.item() == pytest.approx(plain.item(), rel=1e-5)
    with pytest.raises(InvalidArgumentError, match="snr_gamma"):
        denoiser_loss(half, scheduler, x0, torch.zeros(32, 1, 1), snr_gamma=0.0)


# ---------------------------------------------------------------- contrastive (CLIP)


def test_contrastive_loss_with_one_positive_is_clips_cross_entropy() -> None:
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    logits = 5.0 * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    expected = F.cross_entropy(logits, torch.arange(6))  # Radford et al. 2021, fig. 3
    got = contrastive_loss(image, text, torch.eye(6, dtype=torch.bool), logit_scale=5.0)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # only directions count: CLIP compares normalised features
    scaled = contrastive_loss(
        3 * image, 0.5 * text, torch.eye(6, dtype=torch.bool), logit_scale=5.0
    )
    torch.testing.assert_close(scaled, expected, rtol=1e-6, atol=1e-6)


def test_contrastive_loss_shares_probability_among_positives() -> None:
    g = torch.Generator().manual_seed(1)
    image, text = torch.randn(2, 4, generator=g), torch.randn(5, 4, generator=g)
    positives = torch.zeros(2, 5, dtype=torch.bool)
    positives[0, [1, 3]] = True
    positives[1, 4] = True
    p = (2.0 * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T).softmax(dim=1)
    expected = -(torch.log(p[0, 1] + p[0, 3]) + torch.log(p[1, 4])) / 2
    got = contrastive_loss(image, text, positives, logit_scale=2.0)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_contrastive_loss_checks_its_inputs() -> None:
    image, text = torch.randn(2, 4), torch.randn(3, 4)
    with pytest.raises(InvalidArgumentError, match="positives must be"):
        contrastive_loss(image, text, torch.ones(3, 2, dtype=torch.bool), logit_scale=1.0)
    none = torch.zeros(2, 3, dtype=torch.bool)
    none[0, 0] = True
    with pytest.raises(InvalidArgumentError, match="at least one positive"):
        contrastive_loss(image, text, none, logit_scale=1.0)

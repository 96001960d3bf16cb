"""Train latentkit's small text-to-image model on the procedural shapes dataset.

Four stages, all on one device and deterministic from ``--seed`` (on the CPU):

1. a KL autoencoder (64x64 RGB -> 4x16x16 latents) with `train_autoencoder`;
2. latents of the whole training set, encoded once with the trained encoder (posterior
   mean), and ``scaling_factor = 1 / std`` so the denoiser sees unit-variance latents;
3. a CLIP text encoder, trained from scratch with CLIP's contrastive objective against a
   small image tower on the latents (`contrastive_loss`; every other training caption is a
   negative, so "left of" must differ from "right of"), then frozen as in Stable Diffusion;
4. a UNet (v-prediction, Min-SNR weighting, prompt dropout for classifier-free guidance,
   EMA), then everything is saved with `latentkit.saving.save_pipeline` in the diffusers
   layout.

Trained jointly with the UNet instead (an earlier recipe), the text encoder mapped all four
relation words to nearly the same vector and the model placed shapes little better than
chance.

    python examples/train_shapes.py --output latentkit/assets/shapes --overwrite

Load the result with ``latentkit.load_pipeline(folder)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from latentkit import schedulers
from latentkit.lab.evaluation import evaluate
from latentkit.lab.shapes import (
    COLOURS,
    KINDS,
    RELATIONS,
    ShapesDataset,
    all_captions,
    mirrored,
)
from latentkit.lab.training import (
    EMA,
    contrastive_loss,
    denoiser_loss,
    drop_context,
    forever,
    train_autoencoder,
)
from latentkit.models.autoencoder import AutoencoderKL, AutoencoderKLConfig
from latentkit.models.layers import Attention
from latentkit.models.unet import UNet2DCondition, UNetConfig
from latentkit.saving import save_pipeline

MAX_TOKENS = 16  # the longest caption is 9 words + start and end tokens

VAE_CONFIG = {
    "block_out_channels": [16, 32, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 64,
    "mid_block_add_attention": False,
}

TEXT_WIDTH = 64

# 16x16 latents; cross-attention at 8x8, 4x4 and the mid block, where a token spans the
# shapes, and none at 16x16, where self-attention over 256 tokens would cost more than the
# rest of the network on a CPU.
UNET_CONFIG = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [64, 128, 128],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": TEXT_WIDTH,
    "attention_head_dim": 4,  # a head count, as in SD configs
    "norm_num_groups": 16,
}


def vocabulary() -> list[str]:
    words = ["a", *COLOURS, *KINDS]
    for relation in RELATIONS:
        words += relation.split()
    return words


def render_images(n: int, seed: int) -> tuple[Tensor, list[str]]:
    """``n`` training images as uint8 (n, 3, 64, 64) and their captions."""
    data = ShapesDataset(n, seed=seed, size=64, split="train")
    images = np.empty((n, 64, 64, 3), dtype=np.uint8)
    captions = []
    for i in range(n):
        image, text = data[i]
        images[i] = np.asarray(image.convert("RGB"))
        captions.append(text)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), captions


def to_unit(images: Tensor) -> Tensor:
    return images.float() / 127.5 - 1.0


class Batches:
    """Re-iterable shuffled minibatches of ``tensors`` (one epoch per iteration)."""

    def __init__(self, *tensors: Tensor, batch: int, seed: int, transform=None) -> None:
        self.tensors, self.batch, self.transform = tensors, batch, transform
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        n = self.tensors[0].shape[0]
        order = torch.randperm(n, generator=self.generator)
        for start in range(0, n - self.batch + 1, self.batch):
            index = order[start : start + self.batch]
            items = [t[index] for t in self.tensors]
            if self.transform is not None:
                items = self.transform(*items)
            yield items[0] if len(items) == 1 else tuple(items)


def build_text_encoder(tokenizer, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=TEXT_WIDTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = "eager"  # tiny heads: faster than fused kernels on a CPU
    return CLIPTextModel(config)


def token_ids(tokenizer, texts: list[str]) -> Tensor:
    # The layout latentkit's text conditioner feeds the encoder: start, words, end, pad (= end).
    return tokenizer(
        texts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids


class ImageTower(nn.Module):
    """CLIP's image encoder in miniature, reading the autoencoder's latents. Strided
    convolutions and a flattening projection (no global pooling) keep *where* things are,
    which the relation words are about."""

    def __init__(self, channels: int, size: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 64, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(128, 128, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Flatten(),
            nn.Linear(128 * (size // 4) ** 2, width),
        )

    def forward(self, latents: Tensor) -> Tensor:
        return self.net(latents)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="continue training the UNet of a saved model (its VAE and text encoder are kept)",
    )
    parser.add_argument(
        "--vae-from",
        type=Path,
        default=None,
        help="reuse the autoencoder of a saved model and train a new text encoder and UNet",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--images", type=int, default=10000, help="training set size")
    parser.add_argument("--vae-steps", type=int, default=1000)
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bfloat16 autocast while training the denoiser (weights and optimiser stay float32)",
    )
    parser.add_argument(
        "--prediction-type",
        choices=["epsilon", "v_prediction"],
        default="v_prediction",
        help="the denoiser's target (v gives the high-noise steps, where layout is decided, "
        "a full-weight signal)",
    )
    parser.add_argument("--snr-gamma", type=float, default=5.0, help="Min-SNR weighting")
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-6)
    parser.add_argument("--clip-steps", type=int, default=1000)
    parser.add_argument("--clip-batch", type=int, default=256)
    parser.add_argument("--clip-lr", type=float, default=1e-3)
    parser.add_argument("--unet-steps", type=int, default=3500)
    parser.add_argument("--unet-batch", type=int, default=64)
    parser.add_argument("--unet-lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--p-uncond", type=float, default=0.1)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--fp16", action="store_true", help="save weights as float16")
    parser.add_argument("--log-every", type=int, default=100)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)

    def autocast() -> torch.autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    started = time.perf_counter()

    def stamp() -> str:
        return f"[{(time.perf_counter() - started) / 60:5.1f} min]"

    if args.resume is not None and args.vae_from is not None:
        parser.error("--resume already keeps the saved autoencoder; give one of the two")
    resumed = None
    if args.resume is not None or args.vae_from is not None:
        from latentkit import load_pipeline

        resumed = load_pipeline(
            args.resume or args.vae_from, device=device, dtype="fp32", progress=False
        )
        saved_target = resumed.scheduler_config.get("prediction_type", "epsilon")
        if args.resume is not None and saved_target != args.prediction_type:
            parser.error(
                f"{args.resume} predicts {saved_target!r}; resume it with "
                f"--prediction-type {saved_target}"
            )

    images, captions = render_images(args.images, args.seed)
    print(f"{stamp()} rendered {len(captions)} images", flush=True)

    # ------------------------------------------------------------ 1. autoencoder
    torch.manual_seed(args.seed + 1)
    vae = AutoencoderKL(AutoencoderKLConfig.from_dict(VAE_CONFIG)).to(device)
    if resumed is not None:
        vae = resumed.vae

    def vae_log(step: int, loss: float) -> None:
        if step % args.log_every == 0 or step == args.vae_steps:
            print(f"{stamp()} vae step {step}/{args.vae_steps} loss {loss:.4f}", flush=True)

    vae_s = 0.0
    if resumed is None:
        t0 = time.perf_counter()
        # The autoencoder trains in float32: under bfloat16 autocast its loss fell 7x slower
        # (0.77 vs 0.11 after 150 steps), while the denoiser's curve is the same in both.
        train_autoencoder(
            vae,
            Batches(
                images, batch=args.vae_batch, seed=args.seed + 2, transform=lambda x: [to_unit(x)]
            ),
            steps=args.vae_steps,
            lr=args.vae_lr,
            kl_weight=args.kl_weight,
            seed=args.seed + 3,
            callback=vae_log,
        )
        vae_s = time.perf_counter() - t0
        print(f"{stamp()} vae: {args.vae_steps / vae_s:.2f} it/s", flush=True)

    # ------------------------------------------------------------ 2. latents
    vae.eval()
    with torch.no_grad():
        means = torch.cat(
            [
                vae.posterior(to_unit(images[i : i + 256]).to(device)).mean.cpu()
                for i in range(0, len(images), 256)
            ]
        )
        check = to_unit(images[:256]).to(device)
        rec = vae.decode(vae.posterior(check).mean * vae.scaling_factor)
        rec_l1 = float((rec - check).abs().mean())
    # The ceiling for the whole model: how many reconstructions the evaluator still accepts.
    rec_images = [
        Image.fromarray(x)
        for x in ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    ]
    rec_report = evaluate(rec_images, captions[:256])
    std = float(means.std()) if resumed is None else 1.0 / vae.scaling_factor
    if resumed is None:
        vae_config = dataclasses.replace(vae.config, scaling_factor=1.0 / std)
        shipped_vae = AutoencoderKL(vae_config)
        shipped_vae.load_state_dict(vae.state_dict())
        vae = shipped_vae.to(device).eval()
    latents = means / std
    print(
        f"{stamp()} latents {tuple(latents.shape)} std {std:.4f} -> scaling_factor "
        f"{1 / std:.4f}; reconstruction L1 (mean) {rec_l1:.4f}, adherence "
        f"{rec_report.overall.adherence:.3f} ({rec_report.overall.correct}/{rec_report.overall.n})",
        flush=True,
    )

    # ------------------------------------------------------------ 3. CLIP text encoder
    from tqdm.auto import tqdm

    from latentkit.lab.training import build_word_tokenizer

    # Every caption of the training split: the text side of the contrastive objective, and
    # the table of text embeddings the UNet trains with (the encoder is frozen after this).
    vocab = all_captions(split="train")
    index = {text: i for i, text in enumerate(vocab)}
    caption_index = torch.tensor([index[c] for c in captions])
    # An image's right captions: its own and the mirrored wording ("A left of B" is
    # "B right of A"); every other caption of the split is a negative.
    positives = torch.zeros(len(vocab), len(vocab), dtype=torch.bool)
    for text, i in index.items():
        positives[i, i] = True
        other = mirrored(text)
        if other is not None and other in index:
            positives[i, index[other]] = True

    clip_s = 0.0
    if args.resume is None:
        tokenizer = build_word_tokenizer(vocabulary(), model_max_length=MAX_TOKENS)
        text_encoder = build_text_encoder(tokenizer, args.seed + 4).to(device)
        torch.manual_seed(args.seed + 8)
        tower = ImageTower(latents.shape[1], latents.shape[-1], TEXT_WIDTH).to(device)
        text_head = nn.Linear(TEXT_WIDTH, TEXT_WIDTH, bias=False).to(device)
        logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07), device=device))
        clip_params = [
            *text_encoder.parameters(),
            *tower.parameters(),
            *text_head.parameters(),
            logit_scale,
        ]
        clip_optimizer = torch.optim.AdamW(clip_params, lr=args.clip_lr, weight_decay=0.01)
        vocab_ids = token_ids(tokenizer, vocab).to(device)
        clip_batches = Batches(latents, caption_index, batch=args.clip_batch, seed=args.seed + 9)
        t0 = time.perf_counter()
        data = forever(clip_batches)
        with tqdm(total=args.clip_steps, desc="training text encoder (CLIP)") as bar:
            for step in range(1, args.clip_steps + 1):
                z, which = next(data)
                for group in clip_optimizer.param_groups:
                    group["lr"] = args.clip_lr * min(1.0, step / args.warmup)
                text_features = text_head(text_encoder(vocab_ids).pooler_output)
                loss = contrastive_loss(
                    tower(z.to(device)),
                    text_features,
                    positives[which].to(device),
                    logit_scale=logit_scale.clamp(max=math.log(100)).exp(),  # CLIP's cap
                )
                clip_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                clip_optimizer.step()
                bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
                bar.update()
                if step % args.log_every == 0 or step == args.clip_steps:
                    print(f"{stamp()} clip step {step}/{args.clip_steps} loss {float(loss):.4f}")
        clip_s = time.perf_counter() - t0
        torch.manual_seed(args.seed + 5)
        unet = UNet2DCondition(UNetConfig.from_dict(UNET_CONFIG)).to(device)
    else:
        tokenizer, text_encoder, unet = (
            resumed.text[0].tokenizer,
            resumed.text[0].text_encoder,
            resumed.unet,
        )
        unet.requires_grad_(True)

    # ------------------------------------------------------------ 4. UNet
    text_encoder.eval().requires_grad_(False)
    with torch.no_grad():  # the whole conditioning, computed once: (captions, tokens, width)
        table = text_encoder(token_ids(tokenizer, vocab).to(device))[0]
        empty = text_encoder(token_ids(tokenizer, [""]).to(device))[0]
    unet.train()
    for module in unet.modules():
        if isinstance(module, Attention):
            module.backend = "math"  # tiny heads: faster than the fused kernels' CPU backward
    scheduler = schedulers.create(
        "ddpm",
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        steps_offset=1,
        prediction_type=args.prediction_type,
    )
    ema = EMA(unet, decay=args.ema_decay)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, weight_decay=0.01)

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step <= args.warmup:
            return args.unet_lr * step / args.warmup
        p = (step - args.warmup) / max(1, args.unet_steps - args.warmup)
        return args.unet_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    batches = Batches(latents, caption_index, batch=args.unet_batch, seed=args.seed + 6)
    generator = torch.Generator(device).manual_seed(args.seed + 7)

    t0 = time.perf_counter()
    running, data = [], forever(batches)
    with tqdm(total=args.unet_steps, desc="training unet") as bar:
        for step in range(1, args.unet_steps + 1):
            x0, which = next(data)
            x0 = x0.to(device)
            context = drop_context(
                table[which.to(device)], empty, p_uncond=args.p_uncond, generator=generator
            )
            with autocast():
                loss = denoiser_loss(
                    unet, scheduler, x0, context, generator, snr_gamma=args.snr_gamma
                )
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            ema.update(unet)
            running.append(float(loss.detach()))
            bar.set_postfix(loss=f"{running[-1]:.4f}", refresh=False)
            bar.update()
            if step % args.log_every == 0 or step == args.unet_steps:
                mean = sum(running) / len(running)
                running = []
                rate = step / (time.perf_counter() - t0)
                print(
                    f"{stamp()} unet step {step}/{args.unet_steps} loss {mean:.4f} "
                    f"lr {lr_at(step):.2e} ({rate:.2f} it/s)",
                    flush=True,
                )
    unet_s = time.perf_counter() - t0

    # ------------------------------------------------------------ save
    ema.copy_to(unet)
    unet.eval()
    for module in unet.modules():
        if isinstance(module, Attention):
            module.backend = "sdpa"
    if args.fp16:
        for module in (unet, text_encoder, vae):
            module.half()
    sampler = schedulers.create(
        "dpm-solver++",
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        prediction_type=args.prediction_type,
    )
    folder = save_pipeline(
        args.output,
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=sampler,
        overwrite=args.overwrite,
        generation_defaults={"steps": 20, "guidance_scale": 2.0},
    )
    sizes = {
        "vae": sum(p.numel() for p in vae.parameters()),
        "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
        "unet": sum(p.numel() for p in unet.parameters()),
    }
    total_mb = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20
    print(
        f"{stamp()} saved {folder} ({total_mb:.1f} MB); params {sizes}; "
        f"vae {vae_s / 60:.1f} min, text encoder {clip_s / 60:.1f} min, unet {unet_s / 60:.1f} min",
        flush=True,
    )


if __name__ == "__main__":
    main()

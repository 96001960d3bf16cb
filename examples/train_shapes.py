"""Train latentkit's small text-to-image model on the procedural shapes dataset.

Three stages, all on one device and deterministic from ``--seed`` (on the CPU):

1. a KL autoencoder (64x64 RGB -> 4x16x16 latents) with `train_autoencoder`;
2. latents of the whole training set, encoded once with the trained encoder (posterior
   mean), and ``scaling_factor = 1 / std`` so the denoiser sees unit-variance latents;
3. a CLIP text encoder and a UNet trained jointly from scratch (epsilon prediction,
   prompt dropout for classifier-free guidance, EMA of both), then saved with
   `latentkit.saving.save_pipeline` in the diffusers layout.

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
from latentkit.data.shapes import COLOURS, KINDS, RELATIONS, ShapesDataset
from latentkit.evaluation import evaluate
from latentkit.models.autoencoder import AutoencoderKL, AutoencoderKLConfig
from latentkit.models.layers import Attention
from latentkit.models.unet import UNet2DCondition, UNetConfig
from latentkit.saving import save_pipeline
from latentkit.training import EMA, denoiser_loss, drop_context, train_autoencoder

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


class Joint(nn.Module):
    """Text encoder + UNet as one module, so one optimiser and one EMA cover both."""

    def __init__(self, text_encoder: nn.Module, unet: nn.Module) -> None:
        super().__init__()
        self.text_encoder, self.unet = text_encoder, unet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="continue training the text encoder and UNet of a saved model (its VAE is kept)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--images", type=int, default=10000, help="training set size")
    parser.add_argument("--vae-steps", type=int, default=700)
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bfloat16 autocast while training the denoiser (weights and optimiser stay float32)",
    )
    parser.add_argument("--snr-gamma", type=float, default=5.0, help="Min-SNR weighting")
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-6)
    parser.add_argument("--unet-steps", type=int, default=4000)
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

    images, captions = render_images(args.images, args.seed)
    print(f"{stamp()} rendered {len(captions)} images", flush=True)

    resumed = None
    if args.resume is not None:
        from latentkit import load_pipeline

        resumed = load_pipeline(args.resume, device=device, dtype="fp32", progress=False)

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

    # ------------------------------------------------------------ 3. text encoder + UNet
    from latentkit.training import build_word_tokenizer

    if resumed is None:
        tokenizer = build_word_tokenizer(vocabulary(), model_max_length=MAX_TOKENS)
        text_encoder = build_text_encoder(tokenizer, args.seed + 4).to(device)
        torch.manual_seed(args.seed + 5)
        unet = UNet2DCondition(UNetConfig.from_dict(UNET_CONFIG)).to(device)
    else:
        tokenizer, text_encoder, unet = (
            resumed.text.tokenizer,
            resumed.text.text_encoder,
            resumed.unet,
        )
        text_encoder.config._attn_implementation = "eager"
        for p in (*text_encoder.parameters(), *unet.parameters()):
            p.requires_grad_(True)
    ids = token_ids(tokenizer, captions)
    empty_ids = token_ids(tokenizer, [""]).to(device)
    model = Joint(text_encoder, unet).train()
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
    )
    ema = EMA(model, decay=args.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.unet_lr, weight_decay=0.01)

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step <= args.warmup:
            return args.unet_lr * step / args.warmup
        p = (step - args.warmup) / max(1, args.unet_steps - args.warmup)
        return args.unet_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    batches = Batches(latents, ids, batch=args.unet_batch, seed=args.seed + 6)
    generator = torch.Generator(device).manual_seed(args.seed + 7)
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    running, data = [], iter(())
    with tqdm(total=args.unet_steps, desc="training text encoder + unet") as bar:
        for step in range(1, args.unet_steps + 1):
            try:
                x0, batch_ids = next(data)
            except StopIteration:
                data = iter(batches)
                x0, batch_ids = next(data)
            x0, batch_ids = x0.to(device), batch_ids.to(device)
            with autocast():
                context = text_encoder(batch_ids)[0]
                empty = text_encoder(empty_ids)[0]
                context = drop_context(context, empty, p_uncond=args.p_uncond, generator=generator)
                loss = denoiser_loss(
                    unet, scheduler, x0, context, generator, snr_gamma=args.snr_gamma
                )
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            ema.update(model)
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
    ema.copy_to(model)
    model.eval()
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
        f"vae {vae_s / 60:.1f} min, unet {unet_s / 60:.1f} min",
        flush=True,
    )


if __name__ == "__main__":
    main()

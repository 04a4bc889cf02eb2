"""Training the demo VAE: a small `AutoencoderKL` fitted to the demo's talking-face frames.

The embedded demo has no pretrained SD-VAE, so `fit_vae` trains one from `demo_vae_config` on
the demo videos and saves it with `save_pretrained`; `pipeline.vae.load_vae` then loads it like
any other diffusers VAE, so the demo's latent space decodes to real pictures.
"""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import lightning as L
import numpy as np
import torch
from diffusers import AutoencoderKL
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from pipeline.media import FPS, read_video
from pipeline.metrics.appearance import psnr
from pipeline.vae import calibrate_scaling_factor, check_frames, demo_vae_config, reconstruct


class VAEModule(L.LightningModule):
    """An `AutoencoderKL` trained with L1 reconstruction + a small KL term.

    The KL is averaged per latent element (diffusers sums it per sample) and weighted by
    `kl_weight` (1e-4: a mild pull towards the prior that costs no visible quality). The
    reconstruction decodes a sampled latent, so the decoder also learns to decode slightly-off
    latents, as diffusion produces. The posterior log-variance starts at `init_logvar` (-6: std
    0.05) rather than 0 (std 1, noise that swamps the untrained latents): in a ~100 s budget
    this gave a lower loss and a better-kept mouth opening.
    """

    def __init__(
        self,
        latent_channels: int = 4,
        block_out_channels: tuple[int, ...] = (16, 16, 32),
        lr: float = 2e-3,
        kl_weight: float = 1e-4,
        warmup_steps: int = 20,
        max_steps: int = 1200,
        init_logvar: float = -6.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.vae = AutoencoderKL(**demo_vae_config(latent_channels, tuple(block_out_channels)))
        with torch.no_grad():  # quant_conv outputs [mean (C), logvar (C)] channels
            self.vae.quant_conv.bias[latent_channels:] += init_logvar

    def losses(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L1 reconstruction, KL per latent element) for uint8 frames [B, H, W, 3]."""
        x = frames.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # [B, 3, H, W] in [-1, 1]
        posterior = self.vae.encode(x).latent_dist
        reconstruction = self.vae.decode(posterior.sample()).sample  # [B, 3, H, W]
        rec = (reconstruction - x).abs().mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        return rec, kl

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        rec, kl = self.losses(batch)
        self.log("vae/rec", rec, prog_bar=True)
        self.log("vae/kl", kl)
        return rec + self.hparams.kl_weight * kl

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.vae.parameters(), lr=self.hparams.lr, weight_decay=0.0)
        warmup, total = self.hparams.warmup_steps, max(self.hparams.max_steps, 1)

        def factor(step: int) -> float:  # linear warm-up, then cosine decay to 5% of lr
            if step < warmup:
                return (step + 1) / warmup
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _read_frames(videos: Path, size: int, max_frames: int) -> np.ndarray:
    """Evenly spaced frames from every .mp4 in `videos`, at most ~max_frames in all: uint8 [N, size, size, 3]."""
    paths = sorted(videos.glob("*.mp4"))
    if not paths:
        raise ValueError(f"{videos}: no .mp4 videos to train the VAE on")
    per_video = max(1, max_frames // len(paths))
    chunks = []
    for path in paths:
        frames = read_video(path, fps=FPS, size=size)  # [T, size, size, 3]
        keep = np.unique(np.linspace(0, len(frames) - 1, min(per_video, len(frames))).round().astype(int))
        chunks.append(frames[keep])
    return np.concatenate(chunks)


def train_vae(
    frames: np.ndarray,
    out: str | Path,
    max_steps: int = 1200,
    batch_size: int = 8,
    lr: float = 2e-3,
    seed: int = 0,
    latent_channels: int = 4,
    max_time_s: float | None = None,
    block_out_channels: tuple[int, ...] = (16, 16, 32),
) -> tuple[Path, float]:
    """Train the demo VAE on uint8 frames [N, H, W, 3], calibrate its scaling factor, save it to `out`.

    A random tenth of the frames (at most 256) is held out; returns (out, held-out PSNR in dB of
    encode(mean) -> decode, the path the pipeline uses).
    """
    check_frames(frames, 2 ** (len(block_out_channels) - 1))
    if len(frames) < 2:
        raise ValueError(f"need at least 2 frames to train and validate the VAE, got {len(frames)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(seed, verbose=False)
    order = np.random.default_rng(seed).permutation(len(frames))
    num_val = min(256, max(1, len(frames) // 10))
    val, train = frames[order[:num_val]], frames[order[num_val:]]

    module = VAEModule(latent_channels, tuple(block_out_channels), lr=lr, max_steps=max_steps)
    loader = DataLoader(torch.from_numpy(train), batch_size=min(batch_size, len(train)), shuffle=True, drop_last=True)
    logger = CSVLogger(out / "logs", name="vae")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        max_epochs=-1,
        max_time=timedelta(seconds=max_time_s) if max_time_s else None,
        logger=logger,
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, loader)

    vae = module.vae.eval().requires_grad_(False)
    vae.register_to_config(scaling_factor=calibrate_scaling_factor(vae, train[:512]))
    val_psnr = psnr(reconstruct(vae, val), val)
    logger.log_metrics({"vae/val_psnr": val_psnr}, step=trainer.global_step)
    logger.save()
    vae.save_pretrained(out)
    print(f"fit-vae: {trainer.global_step} steps, held-out PSNR {val_psnr:.2f} dB, "
          f"scaling_factor {vae.config.scaling_factor:.4f} -> {out}")
    return out, val_psnr


def fit_vae(
    videos: str | Path,
    out: str | Path,
    size: int = 64,
    max_steps: int = 1200,
    batch_size: int = 8,
    lr: float = 2e-3,
    seed: int = 0,
    latent_channels: int = 4,
    max_time_s: float | None = None,
    max_frames: int = 4096,
    block_out_channels: tuple[int, ...] = (16, 16, 32),
) -> Path:
    """`letstalk fit-vae`: train the demo VAE on (at most ~max_frames) frames of the .mp4s in `videos`; returns `out`.

    Measured on 2 CPU cores: ~12.5 steps/s at batch 8, so the default 1200 steps take ~100 s in
    all. The cosine schedule spans `max_steps`; `max_time_s` is a safety stop that cuts it short.
    """
    frames = _read_frames(Path(videos), size, max_frames)
    path, _ = train_vae(frames, out, max_steps, batch_size, lr, seed, latent_channels, max_time_s, block_out_channels)
    return path

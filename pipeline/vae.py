"""The video VAE: load a diffusers `AutoencoderKL` or `AutoencoderDC`, encode frames to latents and decode them back.

Two latent spaces, chosen by the saved model's `config.json` (`_class_name`):
- "kl": the SD-VAE family (`AutoencoderKL`, usually f8c4); shards store the posterior MEAN.
- "dc": deep-compression autoencoders (`AutoencoderDC`, e.g. f32c32); shards store the
  deterministic latent.
Either way shards hold unscaled latents (DESIGN.md section 2). The scaling factor (and shift)
is applied in exactly one place, `scale_latents` / `unscale_latents`, by the datamodule on the
way into the model and by generation on the way out.

Real users pass a pretrained VAE directory; the offline demo trains a small KL VAE from
`demo_vae_config` (see `lightning_modules/vae.py`) and saves it in the same format.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from diffusers import AutoencoderDC, AutoencoderKL

VAE = AutoencoderKL | AutoencoderDC


@dataclass(frozen=True)
class LatentSpace:
    """What differs between the VAE classes; everything else is one code path."""

    type: str  # recorded in the manifest: "kl" | "dc"
    cls: type
    stages_key: str  # config list with one entry per encoder stage; each stage after the first halves H and W
    encode: Callable[[Any, torch.Tensor], torch.Tensor]  # [B, 3, H, W] in [-1, 1] -> unscaled [B, C, H/d, W/d]


LATENT_SPACES: dict[str, LatentSpace] = {
    "AutoencoderKL": LatentSpace(
        "kl", AutoencoderKL, "block_out_channels", lambda vae, x: vae.encode(x).latent_dist.mean
    ),
    "AutoencoderDC": LatentSpace(
        "dc", AutoencoderDC, "encoder_block_out_channels", lambda vae, x: vae.encode(x).latent
    ),
}
"""Keyed by the `_class_name` that diffusers writes into `config.json`."""


class VAEError(ValueError):
    """A VAE that cannot be loaded or input it cannot encode/decode."""


def demo_vae_config(latent_channels: int = 4, block_out_channels: tuple[int, ...] = (16, 16, 32)) -> dict[str, Any]:
    """A small `AutoencoderKL` config for 64x64 demo faces: downsampling factor 4, one resnet per level.

    Sized for a ~100 s CPU training budget on the demo's synthetic faces: narrow levels
    process ~3x more frames/s than (32, 64, 64) and reach a better loss in the same time; at most
    8 norm groups (>= 2 channels per group) is faster on CPU and reconstructs unseen faces' colours
    better than per-channel groups; no mid-block attention (costs time, buys nothing here).
    """
    channels = tuple(int(c) for c in block_out_channels)
    groups = next(g for g in (8, 4, 2, 1) if all(c % g == 0 for c in channels))
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "block_out_channels": list(channels),
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": int(latent_channels),
        "norm_num_groups": groups,
        "sample_size": 64,
        "scaling_factor": 1.0,
        "mid_block_add_attention": False,
    }


def load_vae(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> VAE:
    """Load a diffusers VAE directory (or a pipeline directory's `vae/` subfolder) offline, in eval mode without grads.

    The class, `AutoencoderKL` or `AutoencoderDC`, is the one `config.json` names in `_class_name`.
    """
    root = Path(path)
    if not root.is_dir():
        raise VAEError(f"{root}: VAE directory does not exist")
    subfolder = None
    config = root / "config.json"
    if not config.is_file():
        config = root / "vae" / "config.json"
        if not config.is_file():
            raise VAEError(
                f"{root}: no config.json (nor vae/config.json); expected a diffusers VAE directory (save_pretrained)"
            )
        subfolder = "vae"
    space = LATENT_SPACES[_class_name(config)]
    try:
        vae = space.cls.from_pretrained(
            root, subfolder=subfolder, torch_dtype=dtype, local_files_only=True, low_cpu_mem_usage=False
        )
    except Exception as err:  # diffusers/safetensors raise many unrelated types for a bad folder
        raise VAEError(f"{root}: cannot load the VAE weights/config ({type(err).__name__}: {err})") from err
    vae = vae.to(device).eval()
    vae.requires_grad_(False)
    return vae


def _class_name(config: Path) -> str:
    """The supported diffusers class a VAE `config.json` names, or `VAEError` naming the file."""
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise VAEError(f"{config}: cannot read the VAE config ({err})") from err
    name = data.get("_class_name") if isinstance(data, dict) else None
    if name not in LATENT_SPACES:
        raise VAEError(f"{config}: _class_name is {name!r}; supported VAEs are {', '.join(LATENT_SPACES)}")
    return name


def latent_space(vae: VAE) -> LatentSpace:
    """The `LatentSpace` of a loaded VAE; `VAEError` for any other model class."""
    for space in LATENT_SPACES.values():
        if isinstance(vae, space.cls):
            return space
    raise VAEError(f"unsupported VAE class {type(vae).__name__}; supported VAEs are {', '.join(LATENT_SPACES)}")


def downsample_factor(vae: VAE) -> int:
    """Spatial downsampling H / h from the config: one factor 2 between consecutive encoder stages.

    Holds for both classes' every valid config: a KL encoder downsamples after each stage but the
    last; a DC encoder does too, and when its first stage has no layers its `conv_in` downsamples
    instead. Tests check it against real encodes.
    """
    return 2 ** (len(vae.config[latent_space(vae).stages_key]) - 1)


def vae_info(vae: VAE, vae_id: str) -> dict[str, Any]:
    """What the shard manifest records about the VAE (`Manifest.vae`, which `prepare` completes with "path")."""
    space, config = latent_space(vae), vae.config
    return {
        "id": str(vae_id),
        "type": space.type,
        "scaling_factor": float(config.scaling_factor),
        "shift_factor": float(config.get("shift_factor") or 0.0),  # DC-AE configs have no shift
        "latent_channels": int(config.latent_channels),
        "downsample": downsample_factor(vae),
    }


def recommended_patch_size(info: dict[str, Any]) -> int:
    """DiT patch size for the latent space a manifest's `vae` entry describes: max(1, 16 // downsample).

    A patch p on latents downsampled by d gives (image_size / (d * p))^2 tokens per frame; p = 16 / d
    keeps that at (image_size / 16)^2, the paper's f8 SD-VAE with p = 2, so attention cost per frame
    does not depend on the VAE: f8 KL -> 2, the f4 demo VAE -> 4, f32 DC-AE -> 1 (a token cannot be
    smaller than one latent pixel, so f32 gives 4x fewer tokens).
    """
    downsample = info.get("downsample")
    if not isinstance(downsample, int) or isinstance(downsample, bool) or downsample < 1 or downsample & (downsample - 1):
        raise VAEError(f"vae downsample must be a power of two >= 1, got {downsample!r}")
    return max(1, 16 // downsample)


def check_frames(frames: np.ndarray, downsample: int) -> None:
    """Raise `VAEError` unless `frames` is uint8 [T, H, W, 3] with H and W divisible by `downsample`."""
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        got = f"{frames.dtype} {frames.shape}" if isinstance(frames, np.ndarray) else type(frames).__name__
        raise VAEError(f"frames must be uint8 [T, H, W, 3], got {got}")
    height, width = frames.shape[1:3]
    if height % downsample or width % downsample:
        raise VAEError(f"frame size {height}x{width} is not divisible by the VAE downsampling factor {downsample}")


@torch.inference_mode()
def encode_frames(vae: VAE, frames: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """uint8 frames [T, H, W, 3] -> float16 unscaled latents [T, C, H/d, W/d] (KL: posterior mean; DC: the latent)."""
    check_frames(frames, downsample_factor(vae))
    encode = latent_space(vae).encode
    out = []
    for start in range(0, len(frames), batch_size):
        chunk = torch.from_numpy(np.array(frames[start : start + batch_size])).to(vae.device)  # a writable copy
        x = chunk.permute(0, 3, 1, 2).to(vae.dtype) / 127.5 - 1.0  # [B, 3, H, W] in [-1, 1]
        z = encode(vae, x)  # [B, C, h, w]
        out.append(z.float().cpu().numpy().astype(np.float16))
    if not out:
        raise VAEError("no frames to encode")
    return np.concatenate(out)


@torch.inference_mode()
def decode_latents(vae: VAE, latents: torch.Tensor | np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Unscaled latents [T, C, h, w] -> uint8 frames [T, H, W, 3]."""
    latents = torch.as_tensor(latents)
    channels = int(vae.config.latent_channels)
    if latents.ndim != 4 or latents.shape[1] != channels:
        raise VAEError(f"latents must be [T, {channels}, h, w] for this VAE, got {tuple(latents.shape)}")
    out = []
    for start in range(0, len(latents), batch_size):
        z = latents[start : start + batch_size].to(device=vae.device, dtype=vae.dtype)
        x = vae.decode(z).sample.float().clamp(-1.0, 1.0)  # [B, 3, H, W]
        pixels = ((x + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)  # [B, H, W, 3]
        out.append(pixels.cpu().numpy())
    if not out:
        raise VAEError("no latents to decode")
    return np.concatenate(out)


def reconstruct(vae: VAE, frames: np.ndarray) -> np.ndarray:
    """uint8 frames [T, H, W, 3] through encode (float16, as shards store latents) and decode: what the VAE keeps."""
    return decode_latents(vae, encode_frames(vae, frames).astype(np.float32))


def scale_latents(z: torch.Tensor, info: dict[str, Any]) -> torch.Tensor:
    """Unscaled VAE latents -> the model's ~unit-variance space: (z - shift) * scaling_factor."""
    return (z - float(info.get("shift_factor") or 0.0)) * float(info["scaling_factor"])


def unscale_latents(z: torch.Tensor, info: dict[str, Any]) -> torch.Tensor:
    """Inverse of `scale_latents`: model space -> latents the VAE decodes."""
    return z / float(info["scaling_factor"]) + float(info.get("shift_factor") or 0.0)


def calibrate_scaling_factor(vae: VAE, frames: np.ndarray) -> float:
    """1 / std of the unscaled latents of `frames` (the SD convention), so scaled latents are ~unit variance."""
    latents = encode_frames(vae, frames).astype(np.float32)
    std = float(latents.std())
    if not np.isfinite(std) or std <= 0.0:
        raise VAEError(f"cannot calibrate the scaling factor: latent std is {std}")
    return 1.0 / std

"""`letstalk generate`: one portrait + one audio file -> a talking video (no Lightning needed).

Audio longer than one clip is covered by consecutive clips that share the portrait,
the seed stream and the guidance settings; the output's length matches the audio. A model with
long-video options chains the clips: each clip after the first is conditioned on the last
motion_frames latents generated so far and on a memory bank of earlier generated latents
(`DiTConfig.memory_indices`), both noised to cond_noise_infer (`noise_context`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline import media
from pipeline.audio_encoders import audio_windows, build_audio_encoder
from pipeline.checkpoints import CheckpointError, read_weights
from pipeline.diffusion import Diffusion, DiffusionConfig
from pipeline.models.dit import DiTConfig, LetsTalkDiT, noise_context
from pipeline.vae import decode_latents, encode_frames, load_vae, scale_latents, unscale_latents


@dataclass
class Generator:
    """A trained model with everything generation needs: network, diffusion and data description."""

    net: LetsTalkDiT
    diffusion: Diffusion
    data_info: dict
    timings: dict[str, float] = field(default_factory=dict)


def load_generator(checkpoint: str | Path, ema: bool = True, device: str = "cpu") -> Generator:
    """Build the network from a checkpoint's config and load its weights (`pipeline.checkpoints.read_weights`)."""
    config, state = read_weights(checkpoint, ema=ema)
    net = LetsTalkDiT(DiTConfig(**config["net"]))
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{checkpoint}: weights do not match the model config "
                              f"(missing {missing[:3]}..., unexpected {unexpected[:3]}...)")
    net.eval().to(device)
    return Generator(net, Diffusion(DiffusionConfig(**config["diffusion"])), config["data_info"])


def read_portrait(path: str | Path, size: int) -> np.ndarray:
    """A portrait image (or a video's first frame) as uint8 [1, size, size, 3], centre-cropped square."""
    path = Path(path)
    if path.suffix.lower() in media.VIDEO_EXTENSIONS:
        return media.read_video(path, size=size)[:1]
    return media.read_image(path, size=size)[None]


@torch.no_grad()
def sample_latents(gen: Generator, ref: torch.Tensor, windows: torch.Tensor, sampler: str | None = None,
                   steps: int = 25, audio_scale: float = 2.0, ref_scale: float = 1.5, seed: int = 0) -> torch.Tensor:
    """Scaled latents [T, C, h, w] for portrait latents ref [R, C, h, w] and audio windows [T, W, D], clip by clip.

    Clips of clip_frames follow each other (the last one is padded with the last audio window and
    cut); with motion frames / a memory bank, clip i is conditioned on the latents generated before it.
    """
    cfg, clip = gen.net.config, int(gen.data_info["clip_frames"])
    num_frames = windows.shape[0]
    clips = math.ceil(num_frames / clip)
    pad = clips * clip - num_frames
    windows = torch.cat([windows, windows[-1:].expand(pad, -1, -1)]) if pad else windows
    audio = windows.view(clips, clip, *windows.shape[1:])  # [N, F, W, D]
    shape = (1, clip, *ref.shape[1:])
    rng = torch.Generator(device="cpu").manual_seed(seed)
    latents: list[torch.Tensor] = []  # [1, F, C, h, w] each
    for i in range(clips):
        context = {}
        if i and (cfg.motion_frames or cfg.memory_frames):
            history, start = torch.cat(latents, dim=1), i * clip  # [1, i·F, C, h, w]
            motion = [max(0, start - cfg.motion_frames + k) for k in range(cfg.motion_frames)]
            for key, index in (("motion", motion), ("memory", cfg.memory_indices(start))):
                if index:
                    context[key] = noise_context(gen.diffusion, history[:, index], cfg.cond_noise_infer, rng)

        def denoiser(x, t, drop_ref, drop_audio, a=audio[i:i + 1], context=context):
            n = x.shape[0]
            batch = {key: value.expand(n, -1, -1, -1, -1) for key, value in context.items()}
            return gen.net(x, t, ref[None].expand(n, -1, -1, -1, -1), a.expand(n, -1, -1, -1), drop_ref, drop_audio,
                           **batch)

        noise = torch.randn(shape, generator=rng).to(ref.device)
        latents.append(gen.diffusion.sample(denoiser, shape, sampler, steps, audio_scale, ref_scale, noise=noise))
    return torch.cat(latents, dim=1)[0, :num_frames]


@torch.no_grad()
def generate_frames(gen: Generator, portrait: np.ndarray, waveform: np.ndarray, vae, sampler: str | None = None,
                    steps: int = 25, audio_scale: float = 2.0, ref_scale: float = 1.5, seed: int = 0,
                    device: str = "cpu") -> np.ndarray:
    """Frames uint8 [T, H, W, 3] for `waveform` (16 kHz mono), T = audio duration × fps."""
    info = gen.data_info
    fps, clip = float(info["fps"]), int(info["clip_frames"])
    num_frames = int(len(waveform) * fps // media.SAMPLE_RATE)
    if num_frames < 1:
        raise ValueError(f"audio of {len(waveform) / media.SAMPLE_RATE:.3f} s is shorter than one video frame")
    t0 = time.perf_counter()
    encoder = build_audio_encoder(info["audio_encoder"]["name"], info["audio_encoder"].get("path"), fps=fps, device=device)
    features = torch.from_numpy(encoder.encode(waveform, num_frames, fps))  # [T, K, D]
    windows = audio_windows(features, int(info["audio_radius"]))  # [T, W, D]
    ref = scale_latents(torch.from_numpy(encode_frames(vae, portrait)).float(), info["vae"]).to(device)  # [1, C, h, w]
    gen.timings["encode"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    z = sample_latents(gen, ref, windows.to(device), sampler, steps, audio_scale, ref_scale, seed)  # [T, C, h, w]
    gen.timings["denoise"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    frames = decode_latents(vae, unscale_latents(z.float().cpu(), info["vae"]))
    gen.timings["decode"] = time.perf_counter() - t0
    return frames


def generate(checkpoint: str | Path, portrait: str | Path, audio: str | Path, out: str | Path,
             vae_path: str | Path | None = None, sampler: str | None = None, steps: int = 25,
             audio_scale: float = 2.0, ref_scale: float = 1.5, seed: int = 0, ema: bool = True,
             device: str = "cpu") -> dict:
    """Write `out` (H.264 + AAC mp4) and return a summary with timings and the real-time factor."""
    gen = load_generator(checkpoint, ema=ema, device=device)
    info = gen.data_info
    vae_path = vae_path or info["vae"].get("path")
    if vae_path is None:
        raise CheckpointError(f"{checkpoint}: the training data's manifest names no VAE path; pass --vae")
    vae = load_vae(vae_path, device=device)
    image = read_portrait(portrait, int(info["size"]))
    waveform = media.read_audio(audio)
    frames = generate_frames(gen, image, waveform, vae, sampler, steps, audio_scale, ref_scale, seed, device)
    t0 = time.perf_counter()
    fps = float(info["fps"])
    samples = int(round(len(frames) * media.SAMPLE_RATE / fps))
    media.write_video(out, frames, fps, audio=waveform[:samples], sample_rate=media.SAMPLE_RATE)
    gen.timings["mux"] = time.perf_counter() - t0
    seconds = len(frames) / fps
    summary = {"out": str(out), "frames": len(frames), "seconds": seconds, **gen.timings,
               "real_time_factor": sum(gen.timings.values()) / seconds}
    print(f"wrote {out}: {len(frames)} frames, {seconds:.2f} s, real-time factor {summary['real_time_factor']:.2f}")
    return summary

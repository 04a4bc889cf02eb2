"""Production-shaped inputs at tiny sizes: what a user brings, not what `letstalk synth` draws.

- `talking_video`: a 640x480, 30 fps H.264 video of a real face (scikit-image's astronaut) that pans and zooms
  over a busy background, with 44.1 kHz stereo AAC speech-like audio;
- `sd_vae`: a random `AutoencoderKL` in the Stable Diffusion VAE's layout (four levels, f8, 4 latent channels,
  mid-block attention, scaling factor 0.18215), saved with `save_pretrained`;
- `wav2vec2`: a random `Wav2Vec2Model` (50 Hz features) with its feature extractor, saved like a hub folder.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

from pipeline import media
from pipeline.synth import speech_audio

WIDTH, HEIGHT, FPS, AUDIO_RATE = 640, 480, 30.0, 44100


def astronaut_head() -> np.ndarray:
    """The astronaut's head and shoulders, uint8 [220, 220, 3] (one real face for MTCNN)."""
    from skimage.data import astronaut

    return astronaut()[20:240, 115:335]


def background(seed: int) -> np.ndarray:
    """A busy uint8 [HEIGHT, WIDTH, 3] scene (stripes like a flag, a gradient, noise): a centre crop of it is
    nothing like the face crop, so a test can tell the two apart."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    scene = np.zeros((HEIGHT, WIDTH, 3), np.float32)
    scene[..., 0] = 120 + 100 * ((yy // 40) % 2)
    scene[..., 1] = 255 * xx / WIDTH
    scene[..., 2] = 80 + 60 * np.sin(xx / 23.0 + seed)
    return np.clip(scene + rng.normal(0, 8, scene.shape), 0, 255).astype(np.uint8)


def talking_frames(seconds: float, seed: int) -> np.ndarray:
    """uint8 [T, HEIGHT, WIDTH, 3] at FPS: the head pans left to right and zooms from 130 to 170 px."""
    head = torch.from_numpy(astronaut_head()).permute(2, 0, 1)[None].float()  # [1, 3, 220, 220]
    scene = background(seed)
    count = int(round(seconds * FPS))
    frames = np.repeat(scene[None], count, axis=0)
    for t in range(count):
        u = t / max(1, count - 1)
        side = int(round(130 + 40 * u))
        x, y = int(round(150 + 200 * u + 20 * seed)), int(round(120 + 40 * np.sin(2 * np.pi * u)))
        patch = F.interpolate(head, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        frames[t, y : y + side, x : x + side] = patch[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()
    return frames


def talking_video(path: str | Path, seconds: float = 3.0, seed: int = 0) -> Path:
    """Write a production-shaped talking video (see the module doc) to `path` and return it."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    voice, _ = speech_audio(rng, seconds, AUDIO_RATE)  # float32 [N] at 44.1 kHz
    stereo = np.stack([voice, 0.8 * voice + 0.01 * rng.standard_normal(len(voice)).astype(np.float32)], axis=1)
    with tempfile.TemporaryDirectory() as tmp:
        silent, wav = Path(tmp) / "video.mp4", Path(tmp) / "audio.wav"
        media.write_video(silent, talking_frames(seconds, seed), FPS, crf=20)
        sf.write(wav, np.clip(stereo, -1, 1), AUDIO_RATE)
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([media.ffmpeg_exe(), "-y", "-loglevel", "error", "-i", str(silent), "-i", str(wav),
                        "-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy", "-c:a", "aac", "-ar", str(AUDIO_RATE),
                        "-ac", "2", str(path)], check=True)
    return path


def sd_vae(path: str | Path, seed: int = 0) -> Path:
    """A random `AutoencoderKL` in the SD-VAE layout at tiny width, saved to `path` (diffusers format)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 8, 16, 16], layers_per_block=2, norm_num_groups=4, act_fn="silu",
        sample_size=256, scaling_factor=0.18215, mid_block_add_attention=True,
    ).save_pretrained(path)  # fmt: skip
    return Path(path)


def wav2vec2(path: str | Path, seed: int = 0) -> Path:
    """A random `Wav2Vec2Model` (conv strides 5*4*16 = 320: 50 Hz at 16 kHz) with its feature extractor."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(seed)
    config = Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16, 16), conv_kernel=(10, 3, 2), conv_stride=(5, 4, 16),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
    )  # fmt: skip
    Wav2Vec2Model(config).eval().save_pretrained(path)
    Wav2Vec2FeatureExtractor(sampling_rate=media.SAMPLE_RATE, do_normalize=True).save_pretrained(path)
    return Path(path)

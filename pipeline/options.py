"""Option groups of `prepare`, `generate` and `evaluate`: small frozen dataclasses the library functions take and the
command line builds its flags from (`pipeline/cli/options.py`); each field's docstring is its `--help` line.

Standard library only, so that `letstalk --help` does not import torch. A default left None is resolved by the
library where the real default lives (named in the docstring)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

PrepareCrop = Literal["center", "face"]
PortraitCrop = Literal["face", "center", "none"]
AudioEncoder = Literal["mel", "wav2vec2", "whisper"]
WeightsDtype = Literal["auto", "float32", "bfloat16"]


@dataclass(frozen=True)
class Encoders:
    """Encoders: the VAE and audio encoder that turn frames and sound into training inputs."""

    vae: str | None = None
    """diffusers AutoencoderKL or AutoencoderDC folder (from_pretrained); required"""
    audio_encoder: AudioEncoder = "mel"
    """audio features: a mel spectrogram, or a speech model's hidden states"""
    audio_encoder_path: str | None = None
    """wav2vec2 or Whisper folder (from_pretrained)"""
    audio_encoder_layers: tuple[int, ...] = (-1,)
    """hidden states to average, comma-separated (0 = input embedding, -1 = last layer)"""
    dtype: WeightsDtype = "auto"
    """encoder weights; auto: bfloat16 on a GPU, float32 on the CPU"""
    batch_size: int = 16
    """frames per VAE encode call"""
    device: str = "cpu"
    """where the encoders run (cpu, cuda, cuda:1)"""


@dataclass(frozen=True)
class Frames:
    """Frames: rate, size and crop of the training frames."""

    fps: float = 25.0
    """target frame rate; 16000 / fps must be an integer"""
    size: int = 64
    """square frame side in pixels; a multiple of the VAE's downsampling factor"""
    crop: PrepareCrop = "center"
    """center: the middle square; face: a box that follows the detected face (facenet-pytorch)"""
    detect_every: int = 1
    """with --crop face: detect faces on every k-th frame, interpolate between (~k times faster)"""


@dataclass(frozen=True)
class Segments:
    """Segments: how videos are cut into training samples and samples grouped into shards."""

    segment_seconds: float = 4.0
    """length of one training sample"""
    min_segment_seconds: float = 1.0
    """a video's last, shorter piece is kept if at least this long"""
    samples_per_shard: int = 64
    """samples per .tar shard"""


@dataclass(frozen=True)
class Tasks:
    """Array jobs and failures: this process's share of the inputs, and inputs an earlier run could not read."""

    task_index: int | None = None
    """this task's index (default: $SLURM_ARRAY_TASK_ID, else 0)"""
    num_tasks: int | None = None
    """tasks in the array job (default: $SLURM_ARRAY_TASK_COUNT, else 1)"""
    retry_failed: bool = False
    """retry inputs an earlier run recorded as failed"""


@dataclass(frozen=True)
class Sampling:
    """Sampling: how the denoising loop runs."""

    sampler: str | None = None
    """ddim or dpm++ (eps, v objectives), euler (flow); default: the model's objective's first"""
    steps: int | None = None
    """sampler steps (default: the sampler's own, pipeline.diffusion.DEFAULT_STEPS)"""
    audio_scale: float | None = None
    """audio guidance (default: pipeline.diffusion.AUDIO_SCALE)"""
    ref_scale: float | None = None
    """portrait guidance (default: pipeline.diffusion.REF_SCALE)"""
    seed: int = 0
    """seed of the starting noise (and, for evaluate, of the clips chosen)"""
    ema: bool = True
    """sample with the EMA weights; --no-ema: the live ones"""


@dataclass(frozen=True)
class EncoderPaths:
    """Encoders: the VAE and audio encoder folders to use instead of those a checkpoint records (a moved model)."""

    vae: str | None = None
    """VAE folder (default: the one the training data was made with)"""
    audio_encoder_path: str | None = None
    """wav2vec2 or Whisper folder (default: the one the training data was made with)"""


@dataclass(frozen=True)
class Framing:
    """Portrait: how it is framed."""

    size: int | None = None
    """frame size; must be the model's (checked); default: the model's"""
    crop: PortraitCrop | None = None
    """face: a square around the detected face; center: the middle square; none: the whole image, resized
    (default: face when facenet-pytorch is installed, else center)"""


@dataclass(frozen=True)
class Provenance:
    """Provenance: marks that say the video is generated (pipeline/provenance.py)."""

    marks: bool = field(default=True, metadata={"flag": "--provenance"})
    """an invisible watermark and AI-generated metadata in the video; --no-provenance: neither (not recommended)"""
    consent: str | None = None
    """consent reference for the portrait, kept in metadata"""
    c2pa_cert: str | None = None
    """PEM certificate chain (signing cert first) for a C2PA manifest"""
    c2pa_key: str | None = None
    """PEM private key of --c2pa-cert"""

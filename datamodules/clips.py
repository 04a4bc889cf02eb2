"""One training or validation clip cut from a segment (frames, reference frame, audio windows, the long-video
context) and a batch of them, scaled."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from pipeline.audio_encoders import audio_windows
from pipeline.models.long_video import LongVideoContext
from pipeline.shards import Segment
from pipeline.vae import scale_latents


REF_MODES = ("outside", "any")


def choose_window(rng: np.random.Generator, frames: int, clip_frames: int, ref_mode: str,
                  lead: int = 0) -> tuple[int, int]:
    """A random clip start (>= `lead`, room for motion frames) and reference frame index for a segment of `frames` frames.

    ref_mode "outside": the reference comes from outside [start, start + clip_frames) when the
    segment has such frames, else from inside it; "any": any frame of the segment.
    """
    start = int(rng.integers(lead, frames - clip_frames + 1))
    outside = [i for i in range(frames) if not start <= i < start + clip_frames]
    if ref_mode == "outside" and outside:
        return start, int(rng.choice(outside))
    return start, int(rng.integers(0, frames))


def cut_clip(
    segment: Segment, start: int, ref: int, clip_frames: int, radius: int, context: LongVideoContext | None = None,
) -> dict[str, Any]:
    """One training/validation sample: latents, reference frame and audio windows of one clip, plus the
    motion and memory frames `context` (the model's long-video settings) asks for. Latents stay unscaled here:
    `scale_batch` scales a whole batch at once (one op per tensor instead of one per clip).

    The audio windows are `audio_windows` of the whole segment sliced to the clip; computing them
    on frames [start - radius, start + clip_frames + radius) clipped to the segment gives the
    same values, since edges are replicated only at the segment's real ends.
    """
    end = start + clip_frames
    latents = torch.from_numpy(segment.latents[start:end].astype(np.float32))  # [F, C, h, w]
    reference = torch.from_numpy(segment.latents[ref : ref + 1].astype(np.float32))  # [1, C, h, w]
    lo, hi = max(0, start - radius), min(len(segment.audio), end + radius)
    audio = torch.from_numpy(segment.audio[lo:hi].astype(np.float32))  # [hi - lo, K, D]
    windows = audio_windows(audio, radius)[start - lo : end - lo]  # [F, (2r+1)*K, D]
    clip = {
        "latents": latents,
        "ref": reference,
        "audio": windows,
        "key": segment.key,
        "start": start,
    }
    for key, index in (context.indices(start) if context is not None else {}).items():
        clip[key] = torch.from_numpy(segment.latents[index].astype(np.float32))  # motion [M, C, h, w], memory [N, ...]
    return clip


LATENT_KEYS = ("latents", "ref", "motion", "memory")


def scale_batch(clips: list[dict[str, Any]], vae: dict[str, Any]) -> dict[str, Any]:
    """Collate clips from `cut_clip` and scale their latents (`pipeline.vae.scale_latents`) in place."""
    batch = default_collate(clips)
    for key in LATENT_KEYS:
        if key in batch:
            batch[key] = scale_latents(batch[key], vae)
    return batch

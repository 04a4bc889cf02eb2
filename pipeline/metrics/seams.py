"""Seams of chained generation: how much a video jumps where one generated clip meets the next.

A long video is generated clip by clip; without motion frames and a memory bank each clip starts
from its own noise and the face jumps at every boundary. The seam ratio compares the mean
absolute frame difference across clip boundaries with the mean inside clips: ~1 for smooth
chaining (a real video gives ~1 at any cut), larger when clips do not continue each other.
"""

from __future__ import annotations

import numpy as np


def seam_ratio(frames: np.ndarray, clip_frames: int) -> dict[str, float]:
    """frames [T, H, W, 3] made of clips of `clip_frames` -> {"seam", "inside", "ratio"} (pixel units 0..255).

    Frame difference d_t = mean |frame[t+1] - frame[t]|; "seam" averages d_t over the boundaries
    t = k·clip_frames - 1, "inside" over every other t.
    """
    frames = np.asarray(frames, dtype=np.float32)
    if len(frames) <= clip_frames:
        raise ValueError(f"a seam needs more than one clip: {len(frames)} frames, clip_frames={clip_frames}")
    diff = np.abs(np.diff(frames, axis=0)).mean(axis=tuple(range(1, frames.ndim)))  # [T - 1]
    boundary = np.zeros(len(diff), dtype=bool)
    boundary[clip_frames - 1 :: clip_frames] = True
    seam, inside = float(diff[boundary].mean()), float(diff[~boundary].mean())
    return {"seam": seam, "inside": inside, "ratio": seam / max(inside, 1e-8)}

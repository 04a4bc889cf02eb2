"""The lip-sync metric for the synthetic talking faces of `pipeline.synth`.

On synthetic data the truth is known: the drawn mouth opens with the loudness of the audio.
So lip sync of a (generated) video is the Pearson correlation between how open its mouth looks,
`mouth_opening`, and the loudness of the audio it should follow, `loudness_envelope`.
`pipeline.synth` derives its ground-truth mouth opening from the same `loudness_envelope`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels; x1, y1 exclusive


def frame_bounds(sample_rate: int, fps: float, num_frames: int) -> np.ndarray:
    """int64 [num_frames + 1]: frame k covers samples [bounds[k], bounds[k + 1]), bounds[k] = floor(k * sr / fps)."""
    return np.floor(np.arange(num_frames + 1) * (sample_rate / fps) + 1e-9).astype(np.int64)


def loudness_envelope(waveform: np.ndarray, sample_rate: int, fps: float, num_frames: int) -> np.ndarray:
    """Linear RMS of the samples of each video frame, float32 [num_frames].

    Linear (not log) RMS because the synthetic mouth opens in proportion to the amplitude of the
    voice. Audio shorter than the video counts as silence after its end.
    """
    waveform = np.asarray(waveform, dtype=np.float64)
    if waveform.ndim != 1:
        raise ValueError(f"waveform must be mono [N], got shape {waveform.shape}")
    bounds = frame_bounds(sample_rate, fps, num_frames)
    padded = np.zeros(int(bounds[-1]), dtype=np.float64)
    used = min(len(waveform), len(padded))
    padded[:used] = waveform[:used]
    energy = np.concatenate([[0.0], np.cumsum(padded**2)])  # [N + 1]
    counts = np.maximum(np.diff(bounds), 1)
    mean_square = np.maximum(energy[bounds[1:]] - energy[bounds[:-1]], 0.0) / counts
    return np.sqrt(mean_square).astype(np.float32)


def mouth_region(side: dict[str, Any], margin: int = 2) -> Box:
    """The union of a synthetic clip's per-frame mouth boxes (from its side JSON), grown by `margin` px.

    Clipped to the frame (`side["size"]`), so one fixed box holds the mouth in every frame.
    """
    boxes = np.asarray(side["mouth_box"], dtype=np.int64)  # [T, 4]
    if boxes.ndim != 2 or boxes.shape[1] != 4 or len(boxes) == 0:
        raise ValueError(f"mouth_box must be a non-empty list of [x0, y0, x1, y1], got shape {boxes.shape}")
    size = int(side["size"])
    x0, y0 = (boxes[:, :2].min(axis=0) - margin).clip(0, size)
    x1, y1 = (boxes[:, 2:].max(axis=0) + margin).clip(0, size)
    return int(x0), int(y0), int(x1), int(y1)


def mouth_opening(frames: np.ndarray, box: Box | list[int]) -> np.ndarray:
    """How open the mouth is in each frame, float32 [T]: the mean darkness inside the mouth region.

    The region is the ellipse inscribed in `box`: the mouth is an ellipse, and the box's corners
    are where the face outline or the eyes can creep in as the head moves. Darkness of a pixel
    is (ref - Y) / ref clipped at 0, Y its luma and ref the 95th percentile of luma in that
    frame's region (the skin). The dark mouth interior and the lips are the only dark things
    there, so the mean grows with the opening. Summing darkness instead of counting pixels under
    a threshold makes it robust to blur: a blurred dark blob keeps its total darkness, so a soft
    VAE decode measures like a sharp frame.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got shape {frames.shape}")
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= frames.shape[2] and 0 <= y0 < y1 <= frames.shape[1]):
        raise ValueError(f"box {list(box)} is empty or outside frames of size {frames.shape[2]}x{frames.shape[1]}")
    crop = frames[:, y0:y1, x0:x1].astype(np.float32)  # [T, h, w, 3]
    luma = crop @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # [T, h, w]
    u = (np.arange(x1 - x0) + 0.5) / (x1 - x0) * 2 - 1
    v = (np.arange(y1 - y0) + 0.5) / (y1 - y0) * 2 - 1
    inside = v[:, None] ** 2 + u[None, :] ** 2 <= 1.0  # [h, w]
    region = luma[:, inside]  # [T, pixels]
    ref = np.maximum(np.percentile(region, 95, axis=1, keepdims=True), 1.0)  # [T, 1]
    return np.clip((ref - region) / ref, 0.0, None).mean(axis=1).astype(np.float32)


def sync_score(mouth: np.ndarray, envelope: np.ndarray) -> float:
    """Pearson correlation at lag 0 of mouth opening and audio loudness; 0.0 if either is constant."""
    mouth = np.asarray(mouth, dtype=np.float64)
    envelope = np.asarray(envelope, dtype=np.float64)
    if mouth.shape != envelope.shape or mouth.ndim != 1 or mouth.size < 2:
        raise ValueError(f"mouth and envelope must be 1-D of equal length >= 2, got {mouth.shape} and {envelope.shape}")
    if np.ptp(mouth) == 0 or np.ptp(envelope) == 0:
        return 0.0
    return float(np.corrcoef(mouth, envelope)[0, 1])

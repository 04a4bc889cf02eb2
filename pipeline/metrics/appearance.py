"""Appearance fidelity of a generated video against the real one: PSNR and SSIM by region, and drift.

When the portrait is a video's first frame and the audio is that video's own, the real video is
ground truth for every later frame. `appearance` scores generated frames against it over three
regions, the whole frame, the mouth box, and everything outside the mouth box (where the
portrait should simply persist), beside references on the same frames:

    static   the portrait repeated (a video that never moves): what generation must beat
    still    on synthetic data only: the same face drawn with the true mouth, the head held where
             the portrait has it and no blinks (`pipeline.synth.held_still`), through the VAE. The
             head sway and blinks are random draws that neither the portrait nor the audio carries,
             so this is the best a model that sees only those two can be expected to do
    ceiling  the VAE's reconstruction of the real frames: the best a latent model can do when it
             also knows every head movement and blink

Frame 0 is left out everywhere (it is the portrait itself). The drift block scores the first and
the last chained clip separately: identity and colour that degrade over the video show as a drop.
The references are scored on the same spans, because the real frames themselves change over a
video (the head moves, the mouth is open or shut): the static portrait drops too, and a generated
video that only follows the ceiling down has not drifted.

The mouth box: on synthetic data, `pipeline.sync.mouth_region` of `synth`'s ground truth; on real
data, `face_mouth_box`, the lower-centre region of a `pipeline.faces` crop.

PSNR is over all pixels and channels of a region across the frames (one mean squared error, so
a clip's value is not an average of per-frame decibels). SSIM is torchmetrics' (Gaussian window,
σ = 1.5, 11×11, K1 = 0.01, K2 = 0.03, data range 255; the test checks it against scikit-image's):
its per-pixel map, averaged over the channels and over the region's pixels.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from pipeline.media import contact_sheet
from pipeline.sync import Box

REGIONS = ("frame", "outside_mouth", "mouth")
REFERENCES = ("generated", "static", "still", "ceiling")
# Mouth box of a face crop as fractions (x0, y0, x1, y1) of its side: `pipeline.faces` crops a square
# 1.5x the detected face (margin 0.25 a side), so the face spans 0.17..0.83; MTCNN's mouth-corner landmarks on
# such crops of a real face, which the track's smoothing moves a little from frame to frame, lie at 0.55-0.70 of
# the side (tests/test_eval_ground_truth.py), and this box holds them with room for an open mouth below.
FACE_CROP_MOUTH = (0.30, 0.50, 0.70, 0.82)


def face_mouth_box(size: int) -> Box:
    """The mouth box (x0, y0, x1, y1; x1, y1 exclusive) of a size×size face crop, from `FACE_CROP_MOUTH`."""
    x0, y0, x1, y1 = FACE_CROP_MOUTH
    return (math.floor(x0 * size), math.floor(y0 * size), math.ceil(x1 * size), math.ceil(y1 * size))


def region_masks(height: int, width: int, box: Box) -> dict[str, np.ndarray]:
    """bool [H, W] masks of `REGIONS` for a mouth box: the frame, outside the box, inside it."""
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"mouth box {list(box)} is empty or outside frames of size {width}x{height}")
    mouth = np.zeros((height, width), dtype=bool)
    mouth[y0:y1, x0:x1] = True
    return {"frame": np.ones_like(mouth), "outside_mouth": ~mouth, "mouth": mouth}


def _check(generated: np.ndarray, real: np.ndarray) -> None:
    if generated.shape != real.shape or generated.ndim != 4 or generated.shape[-1] != 3 or len(real) == 0:
        raise ValueError(f"frames must be uint8 [T, H, W, 3] of equal shape, got {generated.shape} and {real.shape}")


def psnr(generated: np.ndarray, real: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB of uint8 frames [T, H, W, 3] (or one image [H, W, 3]) over the pixels of `mask` [H, W]; inf
    when they are equal there."""
    if generated.shape != real.shape:
        raise ValueError(f"psnr needs arrays of the same shape, got {generated.shape} and {real.shape}")
    error = np.square(generated.astype(np.float64) - real.astype(np.float64))  # [..., H, W, 3]
    if mask is not None:
        error = error[..., mask, :]  # [..., pixels, 3]
    mse = float(error.mean())
    return float("inf") if mse == 0.0 else 10.0 * math.log10(255.0**2 / mse)


def ssim_map(generated: np.ndarray, real: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Per-pixel SSIM float32 [T, H, W] of uint8 frames [T, H, W, 3], averaged over channels (torchmetrics)."""
    _check(generated, real)
    maps = []
    for i in range(0, len(real), batch_size):
        pair = [torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size])).permute(0, 3, 1, 2).double()
                for x in (generated, real)]  # [B, 3, H, W]
        _, full = structural_similarity_index_measure(*pair, data_range=255.0, return_full_image=True)
        maps.append(full.mean(dim=1).float().numpy())  # [B, H, W]
    return np.concatenate(maps)


def appearance(generated: np.ndarray, real: np.ndarray, box: Box) -> dict[str, dict[str, float]]:
    """{region: {"psnr": dB, "ssim": mean}} of uint8 frames [T, H, W, 3] against real ones, per `REGIONS`."""
    _check(generated, real)
    masks = region_masks(real.shape[1], real.shape[2], box)
    ssim = ssim_map(generated, real)  # [T, H, W]
    return {name: {"psnr": psnr(generated, real, mask), "ssim": float(ssim[:, mask].mean())}
            for name, mask in masks.items()}


def clip_spans(num_frames: int, clip_frames: int) -> dict[str, slice]:
    """Frames of the first and the last chained clip, without frame 0 (the portrait): {"first": .., "last": ..}."""
    if clip_frames < 1 or num_frames < 2:
        raise ValueError(f"need clip_frames >= 1 and at least 2 frames, got {clip_frames} and {num_frames}")
    last = (num_frames - 1) // clip_frames * clip_frames  # start of the clip holding the final frame
    return {"first": slice(1, min(clip_frames, num_frames)) if clip_frames > 1 else slice(1, 2),
            "last": slice(max(last, 1), num_frames)}


def fidelity(generated: np.ndarray, real: np.ndarray, box: Box, clip_frames: int,
             reconstruction: np.ndarray | None = None, still: np.ndarray | None = None) -> dict[str, Any]:
    """Appearance of `generated` and of the references against `real` (uint8 [T, H, W, 3], frame 0 the portrait).

    Returns {reference: {region: {"psnr", "ssim"}}} for "generated", "static" (frame 0 repeated), given the
    still-head video `still`, "still", and given the VAE `reconstruction` of `real`, "ceiling"; plus "drift":
    {"first" | "last": {reference: {region: ...}}}, the same over the first / last chained clip of `clip_frames`.
    Frames 1..T-1 only.
    """
    _check(generated, real)
    if len(real) < 2:
        raise ValueError(f"appearance needs at least 2 frames (frame 0 is the portrait), got {len(real)}")
    videos = {"generated": generated, "static": np.broadcast_to(real[:1], real.shape)}
    for name, video in (("still", still), ("ceiling", reconstruction)):
        if video is not None:
            _check(video, real)
            videos[name] = video
    result: dict[str, Any] = {name: appearance(video[1:], real[1:], box) for name, video in videos.items()}
    result["drift"] = {span_name: {name: appearance(video[span], real[span], box) for name, video in videos.items()}
                       for span_name, span in clip_spans(len(real), clip_frames).items()}
    return result


def flatten(scores: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """`fidelity` as flat metric names: "<reference>/<region>/<psnr|ssim>", drift as
    "drift_<first|last>/<reference>/<region>/<psnr|ssim>"."""
    flat: dict[str, float] = {}
    for key, value in scores.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + ("_" if key == "drift" else "/")))
        else:
            flat[name] = float(value)
    return flat


def mean_fidelity(scores: list[dict[str, Any]]) -> dict[str, Any]:
    """The leaf-wise mean of several `fidelity` results (keys present in all of them)."""
    first = scores[0]
    if not isinstance(first, dict):
        return float(np.mean(scores))
    return {key: mean_fidelity([s[key] for s in scores]) for key in first if all(key in s for s in scores)}


_LABELS = {"frame": "whole frame", "outside_mouth": "outside mouth", "mouth": "mouth box",
           "generated": "generated", "static": "static portrait", "still": "still head",
           "ceiling": "VAE ceiling"}


def format_fidelity(columns: dict[str, dict[str, Any]]) -> str:
    """A text table of `fidelity` results, one column each (e.g. per clip): "PSNR dB / SSIM" for every region
    and reference, then the drift block (whole frame, first and last chained clip, each reference)."""
    rows = [("appearance vs real, frames 1.. (PSNR dB / SSIM)", *columns)]
    for region in REGIONS:
        for ref in REFERENCES:
            if all(ref in c for c in columns.values()):
                cells = [f"{c[ref][region]['psnr']:5.2f} / {c[ref][region]['ssim']:.3f}" for c in columns.values()]
                rows.append((f"{_LABELS[region]}: {_LABELS[ref]}", *cells))
    for span in ("first", "last"):
        for ref in REFERENCES:
            if all(ref in c["drift"][span] for c in columns.values()):
                cells = [f"{c['drift'][span][ref]['frame']['psnr']:5.2f} / {c['drift'][span][ref]['frame']['ssim']:.3f}"
                         for c in columns.values()]
                rows.append((f"drift: {span} chained clip, whole frame: {_LABELS[ref]}", *cells))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def comparison_sheet(real: np.ndarray, generated: np.ndarray, every: int = 10) -> np.ndarray:
    """uint8 [H', W', 3]: rows portrait (real frame 0) | real | generated, every `every`-th frame of [T, H, W, 3]."""
    _check(generated, real)
    return contact_sheet([np.broadcast_to(real[:1], real.shape), real, generated], every=every)

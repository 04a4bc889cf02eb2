"""Procedurally drawn talking faces with speech-like audio (`letstalk synth`): data with known lip sync.

Each clip is a cartoon face (its own background, skin, hair, eyes, position and slight head
motion) whose mouth opens with the loudness of a synthetic voice: voiced harmonics under a
formant envelope, chopped into syllables and phrases with pauses. The ground-truth opening per
frame is `pipeline.sync.loudness_envelope` of the clip's audio, scaled to [0, 1], so the data
and the lip-sync metric share one definition. Everything is drawn with numpy at the output
size with analytically anti-aliased edges.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.media import FPS, SAMPLE_RATE, write_video
from pipeline.sync import loudness_envelope

Color = tuple[float, float, float]
Scalar = float | np.ndarray  # a number, or per-frame values shaped [t, 1, 1]

_SKIN = [(246, 214, 190), (226, 184, 152), (200, 150, 112), (168, 116, 82), (128, 88, 62)]
_HAIR = [(28, 24, 24), (72, 46, 30), (122, 82, 50), (204, 172, 104), (152, 64, 32), (150, 150, 150)]
_IRIS = [(88, 56, 30), (60, 100, 170), (70, 122, 70), (110, 116, 122)]
_HAIR_STYLES = ("cap", "bob", "bun", "side")
_MOUTH_INSIDE = (40.0, 8.0, 16.0)
_EYE_WHITE = (240.0, 240.0, 236.0)
_PUPIL = (15.0, 15.0, 20.0)
_CHUNK = 32  # frames drawn at once
_BLINK_S = 0.12


@dataclass
class Face:
    """Everything that makes one synthetic face; lengths in output pixels, colours RGB 0..255."""

    size: int
    background: Color
    shirt: Color
    skin: Color
    lips: Color
    hair: Color
    iris: Color
    hair_style: str
    hairline: float  # hair covers the face above cy - hairline * half_height
    center: tuple[float, float]
    half_width: float
    half_height: float
    eye_dx: float
    eye_dy: float
    eye_rx: float
    eye_ry: float
    mouth_dy: float
    mouth_half_width: float
    mouth_max_half_height: float
    lip: float
    motion_amp: tuple[float, float]
    motion_freq: tuple[float, float]
    motion_phase: tuple[float, float]
    blinks: list[float] = field(default_factory=list)  # blink start times, seconds


@dataclass
class SynthClip:
    frames: np.ndarray  # uint8 [T, S, S, 3]
    audio: np.ndarray  # float32 [N], N = T / fps * sample_rate
    mouth_open: np.ndarray  # float32 [T] in [0, 1]
    mouth_box: np.ndarray  # int64 [T, 4] x0, y0, x1, y1 (exclusive) holding the mouth at any opening
    meta: dict[str, Any]


def _pick(rng: np.random.Generator, palette: list[tuple[int, int, int]], jitter: float) -> Color:
    base = np.asarray(palette[rng.integers(len(palette))], dtype=np.float64)
    return tuple(float(v) for v in np.clip(base + rng.uniform(-jitter, jitter, 3), 0, 255))


def _skin(rng: np.random.Generator) -> Color:
    """A skin tone interpolated along the palette, light to dark."""
    position = rng.uniform(0, len(_SKIN) - 1)
    low, frac = int(position), position - int(position)
    high = min(low + 1, len(_SKIN) - 1)
    tone = (1 - frac) * np.asarray(_SKIN[low], float) + frac * np.asarray(_SKIN[high], float)
    return tuple(float(v) for v in np.clip(tone + rng.uniform(-6, 6, 3), 0, 255))


def _hsv(rng: np.random.Generator, saturation: tuple[float, float], value: tuple[float, float]) -> Color:
    rgb = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(*saturation), rng.uniform(*value))
    return tuple(float(255 * c) for c in rgb)


def random_face(rng: np.random.Generator, size: int, seconds: float) -> Face:
    """Draw the parameters of one face; sizes scale with `size` (tuned so the mouth is clear at 64 px)."""
    half_width = rng.uniform(0.25, 0.31) * size
    half_height = half_width * rng.uniform(1.15, 1.3)
    skin = _skin(rng)
    scale = size / 64
    blinks = sorted(float(t) for t in rng.uniform(0, seconds, rng.poisson(seconds / 3)))
    return Face(
        size=size,
        background=_hsv(rng, (0.15, 0.6), (0.3, 0.95)),
        shirt=_hsv(rng, (0.2, 0.8), (0.2, 0.9)),
        skin=skin,
        lips=(skin[0] * 0.8, skin[1] * 0.5, skin[2] * 0.55),  # darker and redder than the skin
        hair=_pick(rng, _HAIR, 12),
        iris=_pick(rng, _IRIS, 15),
        hair_style=str(rng.choice(_HAIR_STYLES)),
        hairline=rng.uniform(0.4, 0.62),
        center=(size * (0.5 + rng.uniform(-0.05, 0.05)), size * (0.5 + rng.uniform(-0.03, 0.03))),
        half_width=half_width,
        half_height=half_height,
        eye_dx=half_width * rng.uniform(0.34, 0.44),
        eye_dy=half_height * rng.uniform(0.2, 0.3),
        eye_rx=half_width * rng.uniform(0.15, 0.21),
        eye_ry=half_width * rng.uniform(0.1, 0.14),
        mouth_dy=half_height * rng.uniform(0.42, 0.48),
        mouth_half_width=half_width * rng.uniform(0.35, 0.42),
        mouth_max_half_height=half_height * rng.uniform(0.18, 0.22),
        lip=max(1.0, 0.05 * half_height),
        motion_amp=(rng.uniform(0.5, 1.2) * scale, rng.uniform(0.5, 1.2) * scale),
        motion_freq=(rng.uniform(0.15, 0.5), rng.uniform(0.15, 0.5)),
        motion_phase=(rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi)),
        blinks=blinks,
    )


def held_still(face: Face) -> Face:
    """The same face with its head held where frame 0 has it and no blink after frame 0.

    The head sway and the blinks are random draws that neither the first frame nor the audio
    carries, so no model that sees only those can know them: this face, with the true mouth, is
    the best such a model can be expected to draw (the demo's "still head" reference).
    """
    x, y = head_centre(face, np.zeros(1))
    blinks = [b for b in face.blinks if b <= 0 < b + _BLINK_S]
    return replace(face, center=(float(x[0]), float(y[0])), motion_amp=(0.0, 0.0), blinks=blinks)


def head_centre(face: Face, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The head's centre (x, y), each [T], at times `t` [T] in seconds: a slow sway on each axis."""
    x = face.center[0] + face.motion_amp[0] * np.sin(2 * np.pi * face.motion_freq[0] * t + face.motion_phase[0])
    y = face.center[1] + face.motion_amp[1] * np.sin(2 * np.pi * face.motion_freq[1] * t + face.motion_phase[1])
    return x, y


def _ellipse(xx: np.ndarray, yy: np.ndarray, cx: Scalar, cy: Scalar, rx: Scalar, ry: Scalar) -> np.ndarray:
    """Anti-aliased coverage (0..1) of an ellipse at pixel centres; arguments broadcast to [T, S, S]."""
    u = (xx - cx) / rx
    v = (yy - cy) / ry
    gradient = 2 * np.sqrt((u / rx) ** 2 + (v / ry) ** 2) + 1e-6
    signed_distance = (u * u + v * v - 1) / gradient  # first-order distance to the edge, pixels
    return np.clip(0.5 - signed_distance, 0.0, 1.0)


def _below(yy: np.ndarray, y: Scalar) -> np.ndarray:
    """Anti-aliased coverage of the half-plane above the line y (smaller y is higher in the image)."""
    return np.clip(0.5 + (y - yy), 0.0, 1.0)


def _paint(image: np.ndarray, coverage: np.ndarray, color: Color) -> None:
    """Alpha-blend a flat colour into float [T, S, S, 3] in place."""
    alpha = coverage[..., None]
    image *= 1 - alpha
    image += alpha * np.asarray(color, dtype=np.float32)


def mouth_half_height(face: Face, mouth_open: np.ndarray) -> np.ndarray:
    """Half-height of the dark mouth interior: 0.5 px closed (a 1 px line) up to the face's maximum."""
    return 0.5 + np.clip(mouth_open, 0, 1) * (face.mouth_max_half_height - 0.5)


def render_face(face: Face, mouth_open: np.ndarray, fps: float = FPS) -> tuple[np.ndarray, np.ndarray]:
    """Draw the face for each frame with the given mouth opening.

    Returns frames uint8 [T, S, S, 3] and per-frame mouth boxes int64 [T, 4] (x0, y0, x1, y1,
    exclusive) that contain the mouth at full opening at that frame's head position. Frames are
    drawn in chunks so long clips need little memory beyond the output.
    """
    mouth_open = np.asarray(mouth_open, dtype=np.float32)
    count, size = len(mouth_open), face.size
    t = np.arange(count) / fps
    cx, cy = head_centre(face, t)
    eye_open = np.ones(count)
    for start in face.blinks:
        eye_open[(t >= start) & (t < start + _BLINK_S)] = 0.15
    inside = mouth_half_height(face, mouth_open)
    frames = np.empty((count, size, size, 3), dtype=np.uint8)
    for begin in range(0, count, _CHUNK):
        part = slice(begin, begin + _CHUNK)
        frames[part] = _draw(face, cx[part], cy[part], eye_open[part], inside[part])

    mx, my = cx, cy + face.mouth_dy
    reach_x = face.mouth_half_width + 1
    reach_y = face.mouth_max_half_height + face.lip + 1
    boxes = np.stack([np.floor(mx - reach_x), np.floor(my - reach_y), np.ceil(mx + reach_x), np.ceil(my + reach_y)], 1)
    return frames, np.clip(boxes, 0, size).astype(np.int64)


def _draw(face: Face, cx: np.ndarray, cy: np.ndarray, eye_open: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """uint8 [t, S, S, 3] for per-frame head centre, eye openness and mouth interior half-height (each [t])."""
    size = face.size
    cx, cy, eye_open, inside = (np.asarray(v, np.float32).reshape(-1, 1, 1) for v in (cx, cy, eye_open, inside))
    xx = (np.arange(size, dtype=np.float32) + 0.5)[None, None, :]
    yy = (np.arange(size, dtype=np.float32) + 0.5)[None, :, None]
    a, b = face.half_width, face.half_height
    shade = np.asarray(face.background, np.float32) * (1 - 0.25 * yy / size)[..., None]  # gentle light from above
    image = np.ascontiguousarray(np.broadcast_to(shade, (len(cx), size, size, 3)))
    _paint(image, _ellipse(xx, yy, cx, 1.22 * size, 0.55 * size, 0.36 * size), face.shirt)
    if face.hair_style == "bob":
        _paint(image, _ellipse(xx, yy, cx, cy - 0.1 * b, 1.15 * a, 1.05 * b) * _below(yy, cy + 0.4 * b), face.hair)
    _paint(image, _ellipse(xx, yy, cx, cy + 0.95 * b, 0.42 * a, 0.5 * b), _scaled(face.skin, 0.85))
    _paint(image, _ellipse(xx, yy, cx, cy, a, b), face.skin)
    hairline = cy - face.hairline * b + (0.25 * (xx - cx) if face.hair_style == "side" else 0.0)
    _paint(image, _ellipse(xx, yy, cx, cy - 0.08 * b, 1.06 * a, 0.98 * b) * _below(yy, hairline), face.hair)
    if face.hair_style == "bun":
        _paint(image, _ellipse(xx, yy, cx, cy - 1.02 * b, 0.36 * a, 0.3 * b), face.hair)
    for side in (-1, 1):
        ex, ey = cx + side * face.eye_dx, cy - face.eye_dy
        white = _ellipse(xx, yy, ex, ey, face.eye_rx, face.eye_ry * eye_open)
        _paint(image, white, _EYE_WHITE)
        _paint(image, white * _ellipse(xx, yy, ex, ey, 0.62 * face.eye_ry, 0.62 * face.eye_ry), face.iris)
        _paint(image, white * _ellipse(xx, yy, ex, ey, 0.3 * face.eye_ry, 0.3 * face.eye_ry), _PUPIL)
        brow = _ellipse(xx, yy, ex, ey - 1.7 * face.eye_ry - 0.5, 1.15 * face.eye_rx, 0.3 * face.eye_ry + 0.35)
        _paint(image, brow, _scaled(face.hair, 0.7))
    _paint(image, _ellipse(xx, yy, cx, cy - 0.02 * b, 0.1 * a, 0.07 * b), _scaled(face.skin, 0.9))
    my = cy + face.mouth_dy
    _paint(image, _ellipse(xx, yy, cx, my, face.mouth_half_width, inside + face.lip), face.lips)
    _paint(image, _ellipse(xx, yy, cx, my, face.mouth_half_width - 0.8 * face.lip, inside), _MOUTH_INSIDE)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _scaled(color: Color, factor: float) -> Color:
    return tuple(factor * c for c in color)


def speech_audio(rng: np.random.Generator, seconds: float, sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, dict[str, Any]]:
    """A speech-like voice, float32 [round(seconds * sample_rate)] peaking at 0.8, and its parameters.

    Voiced source: harmonics of a fundamental (90-250 Hz, vibrato and slow intonation) weighted by
    three formant resonances and a 1/k tilt. It is shaped by syllables (3-6 per second, random
    lengths and loudness) grouped into phrases separated by 0.2-0.6 s pauses, plus faint noise.
    """
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    f0 = rng.uniform(90, 250)
    vibrato_rate, vibrato_depth = rng.uniform(4.5, 6.5), rng.uniform(0.005, 0.02)
    intonation_rate, intonation_depth = rng.uniform(0.2, 0.7), rng.uniform(0.04, 0.1)
    pitch = f0 * (
        1
        + vibrato_depth * np.sin(2 * np.pi * vibrato_rate * t)
        + intonation_depth * np.sin(2 * np.pi * intonation_rate * t + rng.uniform(0, 2 * np.pi))
    )
    phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
    formants = sorted(float(f) for f in (rng.uniform(450, 800), rng.uniform(1100, 2000), rng.uniform(2300, 3000)))
    bandwidths = (90.0, 130.0, 180.0)
    voiced = np.zeros(n)
    for k in range(1, int(min(4000.0, 0.45 * sample_rate) // (1.15 * f0)) + 1):
        gain = 0.05 + sum(math.exp(-0.5 * ((k * f0 - f) / bw) ** 2) for f, bw in zip(formants, bandwidths))
        voiced += gain / k * np.sin(k * phase)
    voiced /= np.abs(voiced).max() + 1e-9

    syllable_rate = rng.uniform(3, 6)
    envelope = np.zeros(n)
    cursor, syllables, pauses = rng.uniform(0.0, 0.3), 0, 0
    while cursor < seconds:
        for _ in range(int(rng.integers(3, 9))):
            length = rng.uniform(0.6, 1.4) / syllable_rate
            begin, end = int(cursor * sample_rate), min(int((cursor + length) * sample_rate), n)
            if begin >= n:
                break
            shape = np.sin(np.pi * np.clip((t[begin:end] - cursor) / length, 0, 1)) ** 1.5
            envelope[begin:end] = rng.uniform(0.35, 1.0) * shape
            cursor += length
            syllables += 1
        cursor += rng.uniform(0.2, 0.6)
        pauses += 1
    wave = voiced * envelope + rng.normal(0, 0.004, n) + 0.03 * envelope * rng.normal(0, 1, n)
    wave *= 0.8 / (np.abs(wave).max() + 1e-9)
    info = {
        "f0_hz": round(f0, 2),
        "vibrato_hz": round(vibrato_rate, 3),
        "formants_hz": [round(f, 1) for f in formants],
        "syllables_per_s": round(syllable_rate, 3),
        "syllables": syllables,
        "pauses": pauses,
    }
    return wave.astype(np.float32), info


def mouth_track(audio: np.ndarray, sample_rate: int, fps: float, num_frames: int) -> np.ndarray:
    """Ground-truth mouth opening float32 [num_frames] in [0, 1]: the loudness envelope, min-max scaled."""
    envelope = loudness_envelope(audio, sample_rate, fps, num_frames)
    span = float(envelope.max() - envelope.min())
    return ((envelope - envelope.min()) / span if span > 0 else np.zeros_like(envelope)).astype(np.float32)


def draw_clip(seed: int, seconds: float = 4.0, size: int = 64, fps: float = FPS, sample_rate: int = SAMPLE_RATE,
              still: bool = False) -> SynthClip:
    """One synthetic clip, fully determined by `seed`: T = floor(seconds * fps) frames and T / fps s of audio.

    `still` draws the same clip with the face `held_still`: the same audio and mouth, no head motion or blinks.
    """
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    count = int(math.floor(seconds * fps + 1e-6))
    if count < 2:
        raise ValueError(f"clip of {seconds} s at {fps} fps has fewer than 2 frames")
    rng = np.random.default_rng(seed)
    face = random_face(rng, size, seconds)
    audio, voice = speech_audio(rng, count / fps, sample_rate)
    if still:
        face = held_still(face)
    mouth_open = mouth_track(audio, sample_rate, fps, count)
    frames, boxes = render_face(face, mouth_open, fps)
    meta = {
        "seed": int(seed),
        "fps": float(fps),
        "sample_rate": int(sample_rate),
        "size": int(size),
        "frames": count,
        "mouth_open": [round(float(v), 5) for v in mouth_open],
        "mouth_box": boxes.tolist(),
        "face": _rounded(asdict(face)),
        "voice": voice,
    }
    return SynthClip(frames=frames, audio=audio, mouth_open=mouth_open, mouth_box=boxes, meta=meta)


def _rounded(value: Any) -> Any:
    """JSON-friendly copy with floats rounded to 3 decimals and tuples as lists."""
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    if isinstance(value, float):
        return round(value, 3)
    return value


def synthesize(
    out_dir: str | os.PathLike,
    clips: int = 16,
    seconds: float = 4.0,
    size: int = 64,
    fps: float = FPS,
    seed: int = 0,
    sample_rate: int = SAMPLE_RATE,
    progress: bool = False,
) -> list[Path]:
    """Write `clips` talking-face mp4s (H.264 + AAC) to out_dir as clip_0000.mp4, ... and return their paths.

    Beside each mp4, clip_XXXX.json holds the ground truth (per-frame `mouth_open` and
    `mouth_box`, face and voice parameters, seed). Clip i uses seed + i. `synth.json` records
    the call's arguments and the clip files.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in tqdm(range(clips), desc="synth", disable=not progress):
        clip = draw_clip(seed + index, seconds, size, fps, sample_rate)
        path = out / f"clip_{index:04d}.mp4"
        write_video(path, clip.frames, fps, clip.audio, sample_rate)
        path.with_suffix(".json").write_text(json.dumps(clip.meta))
        paths.append(path)
    summary = {
        "clips": clips,
        "seconds": seconds,
        "size": size,
        "fps": fps,
        "seed": seed,
        "sample_rate": sample_rate,
        "files": [p.name for p in paths],
    }
    (out / "synth.json").write_text(json.dumps(summary, indent=2))
    return paths

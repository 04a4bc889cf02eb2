"""Face detection, face tracks and face crops for `prepare` (training clips) and `generate` (portraits).

The detector is MTCNN from facenet-pytorch, whose weights ship inside its wheel, so nothing is
downloaded (install: `pip install '.[faces]'`, then `pip install --no-deps facenet-pytorch==2.6.0`,
because facenet-pytorch pins an old torch).

Crop rule, the same for training clips and portraits: a square of side
`(1 + 2 * margin) * max(face width, face height)` centred on the face. Where that square would
leave the frame it is shifted back inside, and where it is larger than the frame's shorter side
it shrinks to that side; it is never padded, so crops hold only real pixels (near an edge the
face sits off centre rather than next to a border the model would learn to draw).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.media import square_resize

NO_FACE = "no face"
SEVERAL_FACES = "several faces"
SHORT_TRACK = "face track too short"
_FACE = "face"
_SAME_FACE_IOU = 0.3  # consecutive boxes overlapping less than this belong to different tracks
_INSTALL_HINT = "pip install '.[faces]' && pip install --no-deps facenet-pytorch==2.6.0"


class NoFaceError(ValueError):
    """An image in which no face was found."""


@dataclass
class FaceTrack:
    """One dominant face over frames [start, end); boxes int [end - start, 4] square (x0, y0, x1, y1)."""

    start: int
    end: int
    boxes: np.ndarray


def _check_frames(frames: np.ndarray, what: str = "frames") -> None:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        got = f"{frames.dtype} {list(frames.shape)}" if isinstance(frames, np.ndarray) else type(frames).__name__
        raise ValueError(f"{what} must be a uint8 array [T, H, W, 3] (RGB), got {got}")


class FaceDetector:
    """MTCNN (facenet-pytorch, bundled weights) on batches of frames.

    Frames are downscaled so their shorter side is at most `detect_side` before detection (MTCNN's
    cost grows with the pixel count); `min_face_size` is in those downscaled pixels, so by default a
    face narrower than 24/256 of the shorter side is not found. Boxes come back in source pixels.
    """

    def __init__(
        self,
        device: str = "cpu",
        min_prob: float = 0.9,
        detect_side: int = 256,
        min_face_size: int = 24,
        batch_size: int = 32,
    ) -> None:
        try:
            from facenet_pytorch import MTCNN
            from facenet_pytorch.models.utils.detect_face import detect_face
        except ImportError as err:
            raise ImportError(f"face detection needs facenet-pytorch and torchvision: {_INSTALL_HINT} ({err})") from err
        if not 0.0 <= min_prob <= 1.0:
            raise ValueError(f"min_prob must lie in [0, 1], got {min_prob}")
        self._mtcnn = MTCNN(device=device, min_face_size=min_face_size).eval()
        self._detect_face = detect_face
        self.device = torch.device(device)
        self.min_prob = min_prob
        self.detect_side = detect_side
        self.batch_size = batch_size

    def detect(self, frames: np.ndarray, stride: int = 1) -> list[np.ndarray | None]:
        """Faces in uint8 [T, H, W, 3] frames: per frame a float [K, 5] array (x0, y0, x1, y1, prob)
        with prob >= min_prob, largest first.

        With `stride` k > 1 only every k-th frame (and the last) is looked at and the others are
        None, which `face_tracks` fills in from their neighbours.
        """
        _check_frames(frames)
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        count, height, width, _ = frames.shape
        picked = sorted(set(range(0, count, stride)) | ({count - 1} if count else set()))
        scale = min(1.0, self.detect_side / min(height, width))
        out: list[np.ndarray | None] = [None] * count
        m = self._mtcnn
        for begin in range(0, len(picked), self.batch_size):
            index = picked[begin : begin + self.batch_size]
            x = torch.from_numpy(frames[index]).to(self.device).permute(0, 3, 1, 2).float()  # [b, 3, H, W]
            if scale < 1.0:
                x = F.interpolate(x, scale_factor=scale, mode="bilinear", antialias=True, align_corners=False)
            x = x.contiguous()  # MTCNN's many small resizes run ~3x slower on channels-last strides
            with torch.inference_mode():
                boxes, _ = self._detect_face(
                    x.permute(0, 2, 3, 1), m.min_face_size, m.pnet, m.rnet, m.onet, m.thresholds, m.factor, self.device
                )  # per frame [K, 5] in detection pixels
            for t, found in zip(index, boxes):
                found = np.asarray(found, dtype=np.float64).reshape(-1, 5)
                found = found[found[:, 4] >= self.min_prob]
                found[:, :4] /= scale
                area = (found[:, 2] - found[:, 0]) * (found[:, 3] - found[:, 1])
                out[t] = found[np.argsort(-area, kind="stable")]
        return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0.0) * max(h, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _dominant(found: np.ndarray, dominance: float) -> tuple[str, np.ndarray | None]:
    """Label of one frame's detections and the dominant face box, if any."""
    if len(found) == 0:
        return NO_FACE, None
    area = (found[:, 2] - found[:, 0]) * (found[:, 3] - found[:, 1])
    order = np.argsort(-area, kind="stable")
    if len(found) > 1 and area[order[0]] < dominance * area[order[1]]:
        return SEVERAL_FACES, None
    return _FACE, found[order[0], :4].astype(np.float64)


def _fill_skipped(labels: list[str | None], raw: np.ndarray) -> None:
    """Give frames not looked at (None) a label and box in place: interpolated between two
    neighbouring frames with the same face, else copied from the nearest frame looked at."""
    known = [t for t, label in enumerate(labels) if label is not None]
    for prev, nxt in zip([None] + known, known + [None]):
        lo = 0 if prev is None else prev + 1
        hi = len(labels) if nxt is None else nxt
        for t in range(lo, hi):
            between = prev is not None and nxt is not None and labels[prev] == labels[nxt] == _FACE
            if between and _iou(raw[prev], raw[nxt]) >= _SAME_FACE_IOU:
                w = (t - prev) / (nxt - prev)
                labels[t], raw[t] = _FACE, (1 - w) * raw[prev] + w * raw[nxt]
            else:
                src = prev if nxt is None or (prev is not None and t - prev <= nxt - t) else nxt
                labels[t], raw[t] = labels[src], raw[src]


def _bridge_gaps(labels: list[str | None], raw: np.ndarray, max_gap: int) -> None:
    """Turn runs of at most `max_gap` "no face" frames between two boxes of the same face into face
    frames with interpolated boxes (a missed detection on a blink or motion blur)."""
    t = 0
    while t < len(labels):
        if labels[t] != NO_FACE:
            t += 1
            continue
        end = t
        while end < len(labels) and labels[end] == NO_FACE:
            end += 1
        prev, nxt = t - 1, end
        if (
            end - t <= max_gap and prev >= 0 and nxt < len(labels)
            and labels[prev] == labels[nxt] == _FACE and _iou(raw[prev], raw[nxt]) >= _SAME_FACE_IOU
        ):
            for k in range(t, end):
                w = (k - prev) / (nxt - prev)
                labels[k], raw[k] = _FACE, (1 - w) * raw[prev] + w * raw[nxt]
        t = end


def _smooth(x: np.ndarray, radius: int) -> np.ndarray:
    """[n, c] smoothed along n by a local straight-line fit over frames t - radius .. t + radius:
    in the middle that is the centred moving average; at the ends the window is cut short and the
    line still follows a face moving at constant speed, and still averages out detector jitter."""
    n = len(x)
    t = np.arange(n, dtype=np.float64)
    lo, hi = np.maximum(t - radius, 0).astype(int), np.minimum(t + radius + 1, n).astype(int)

    def window_sum(v: np.ndarray) -> np.ndarray:
        c = np.concatenate([np.zeros((1,) + v.shape[1:]), np.cumsum(v, axis=0)])  # [n + 1, ...]
        return c[hi] - c[lo]

    count = (hi - lo).astype(np.float64)[:, None]  # [n, 1]
    mean_t = window_sum(t)[:, None] / count
    mean_x = window_sum(x) / count  # [n, c]
    var_t = window_sum(t * t)[:, None] / count - mean_t**2
    cov = window_sum(t[:, None] * x) / count - mean_t * mean_x
    slope = np.divide(cov, var_t, out=np.zeros_like(cov), where=var_t > 1e-9)
    return mean_x + slope * (t[:, None] - mean_t)


def square_boxes(boxes: np.ndarray, width: int, height: int, margin: float) -> np.ndarray:
    """Face boxes float [n, 4] -> int [n, 4] square crop boxes inside a width x height frame (module docstring)."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2  # [n, 2] (cx, cy)
    side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) * (1 + 2 * margin)
    side = np.clip(np.round(side), 1, min(width, height)).astype(np.int64)  # [n]
    x0 = np.clip(np.round(centre[:, 0] - side / 2), 0, width - side).astype(np.int64)
    y0 = np.clip(np.round(centre[:, 1] - side / 2), 0, height - side).astype(np.int64)
    return np.stack([x0, y0, x0 + side, y0 + side], axis=1)


def _runs(labels: list[str]) -> list[tuple[int, int, str]]:
    """Maximal runs [start, end) of equal labels."""
    runs, start = [], 0
    for t in range(1, len(labels) + 1):
        if t == len(labels) or labels[t] != labels[start]:
            runs.append((start, t, labels[start]))
            start = t
    return runs


def face_tracks(
    detections: list[np.ndarray | None],
    width: int,
    height: int,
    fps: float,
    margin: float = 0.25,
    min_seconds: float = 1.0,
    dominance: float = 2.0,
    smooth_seconds: float = 0.4,
    max_gap_seconds: float = 0.2,
) -> tuple[list[FaceTrack], list[tuple[int, int, str]]]:
    """Tracks of one dominant face, and the frame ranges (start, end, reason) left out.

    `detections` is `FaceDetector.detect`'s output for a width x height video at `fps`. A frame
    keeps its largest face only if that face has at least `dominance` times the area of the next
    one (else "several faces"); frames without a face are "no face", except gaps of at most
    `max_gap_seconds` inside one track, which are bridged. A track ends where the face jumps
    (boxes of consecutive frames overlap by IoU < 0.3); tracks shorter than `min_seconds` are
    left out as "face track too short". Box centre and size are smoothed by a local straight-line
    fit over `smooth_seconds`, then squared with `margin` per side and kept inside the frame.
    """
    if width < 1 or height < 1 or fps <= 0:
        raise ValueError(f"need a positive frame size and fps, got {width}x{height} at {fps} fps")
    if dominance < 1 or margin < 0:
        raise ValueError(f"need dominance >= 1 and margin >= 0, got dominance {dominance}, margin {margin}")
    count = len(detections)
    if count == 0:
        return [], []
    if all(d is None for d in detections):
        raise ValueError("detections hold no frame that was looked at (all None)")
    labels: list[str | None] = [None] * count
    raw = np.zeros((count, 4))  # [T, 4] dominant face box per frame, float source pixels
    for t, found in enumerate(detections):
        if found is not None:
            labels[t], box = _dominant(np.asarray(found, dtype=np.float64).reshape(-1, 5), dominance)
            if box is not None:
                raw[t] = box
    _fill_skipped(labels, raw)
    _bridge_gaps(labels, raw, int(max_gap_seconds * fps + 1e-9))
    names, track_id = list(labels), 0
    for t in range(count):  # a jump to another face starts a new track: number the face runs
        if labels[t] == _FACE:
            track_id += t > 0 and labels[t - 1] == _FACE and _iou(raw[t - 1], raw[t]) < _SAME_FACE_IOU
            names[t] = f"{_FACE}{track_id}"
    min_frames = min_seconds * fps - 1e-9
    radius = int(smooth_seconds * fps / 2)
    tracks, cut = [], []
    for start, end, label in _runs(names):
        if not label.startswith(_FACE):
            cut.append((start, end, label))
        elif end - start < min_frames:
            cut.append((start, end, SHORT_TRACK))
        else:
            box = raw[start:end]
            centre_size = np.column_stack([(box[:, 0] + box[:, 2]) / 2, (box[:, 1] + box[:, 3]) / 2,
                                           box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]])  # [n, 4] cx, cy, w, h
            cx, cy, w, h = _smooth(centre_size, radius).T
            smooth = np.column_stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
            tracks.append(FaceTrack(start, end, square_boxes(smooth, width, height, margin)))
    merged: list[tuple[int, int, str]] = []
    for start, end, reason in cut:  # neighbouring short tracks read as one range
        if merged and merged[-1][1] == start and merged[-1][2] == reason:
            merged[-1] = (merged[-1][0], end, reason)
        else:
            merged.append((start, end, reason))
    return tracks, merged


def _crop(image: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] cut to a square box and resized to [size, size, 3] as `media.read_video` resizes."""
    x0, y0, x1, y1 = (int(v) for v in box)
    return square_resize(image[None, y0:y1, x0:x1], size)[0]


def crop_track(frames: np.ndarray, track: FaceTrack, size: int) -> np.ndarray:
    """The face crops of one track: frames uint8 [T, H, W, 3] (the whole video the detections came
    from; the track indexes into it) -> uint8 [end - start, size, size, 3]."""
    _check_frames(frames)
    if not 0 <= track.start < track.end <= len(frames) or len(track.boxes) != track.end - track.start:
        raise ValueError(
            f"track [{track.start}, {track.end}) with {len(track.boxes)} boxes does not fit {len(frames)} frames"
        )
    return np.stack([_crop(frames[track.start + i], box, size) for i, box in enumerate(track.boxes)])


def crop_portrait(
    image: np.ndarray,
    size: int,
    detector: FaceDetector | None = None,
    margin: float = 0.25,
    name: str = "portrait",
) -> tuple[np.ndarray, list[str]]:
    """One uint8 [H, W, 3] image -> its face crop uint8 [size, size, 3] (the training crop rule,
    without smoothing) and warnings; NoFaceError when no face is found. `name` (e.g. the file
    path) starts every message."""
    if not isinstance(image, np.ndarray) or image.ndim != 3:
        got = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"{name}: image must be a uint8 array [H, W, 3], got {got}")
    _check_frames(image[None], f"{name}: image")
    detector = detector or FaceDetector()
    found = detector.detect(image[None])[0]
    if len(found) == 0:
        raise NoFaceError(f"{name}: no face found (detector probability >= {detector.min_prob})")
    warnings = []
    if len(found) > 1:
        warnings.append(f"{name}: {len(found)} faces found, using the largest")
    height, width, _ = image.shape
    box = square_boxes(found[:1, :4], width, height, margin)[0]
    side = int(box[2] - box[0])
    if side < size:
        warnings.append(f"{name}: face crop is {side}x{side} pixels, upscaled to {size}x{size}")
    return _crop(image, box, size), warnings

"""Face detection, tracking and cropping (pipeline.faces).

Detector tests run the real MTCNN (facenet-pytorch's bundled weights) on a real photograph:
scikit-image's `astronaut` (one real face), composited onto a flat background and moved, so the
expected box of every frame is known. The tracking logic is also tested on hand-made detections.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from pipeline import faces
from pipeline.faces import FaceTrack, NoFaceError, crop_portrait, crop_track, face_tracks, square_boxes
from pipeline.options import Encoders, Frames, Segments

H, W, PATCH, FPS = 128, 176, 80, 25.0
BACKGROUND = 90


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """MTCNN runs many tiny ops; on a shared 2-core machine one thread is ~5x faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(min(a[2], b[2]) - max(a[0], b[0]), 0)
    h = max(min(a[3], b[3]) - max(a[1], b[1]), 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union


def det(*boxes: tuple[float, float, float, float]) -> np.ndarray:
    """Hand-made detections of one frame: [K, 5] with prob 0.99."""
    return np.array([[*b, 0.99] for b in boxes], dtype=np.float64).reshape(-1, 5)


# ---------------------------------------------------------------- tracking logic, no detector


def test_steady_face_gives_one_square_track_inside_the_frame() -> None:
    detections = [det((60, 40, 100, 90)) for _ in range(30)]
    tracks, cut = face_tracks(detections, W, H, FPS, margin=0.25)
    assert cut == [] and len(tracks) == 1
    track = tracks[0]
    assert (track.start, track.end) == (0, 30) and track.boxes.dtype == np.int64
    side = track.boxes[:, 2] - track.boxes[:, 0]
    assert np.all(side == track.boxes[:, 3] - track.boxes[:, 1])
    assert np.all(side == 75)  # max(40, 50) * 1.5
    assert np.allclose((track.boxes[:, 0] + track.boxes[:, 2]) / 2, 80, atol=1)
    assert np.allclose((track.boxes[:, 1] + track.boxes[:, 3]) / 2, 65, atol=1)


def test_boxes_near_an_edge_are_shifted_inside_and_never_exceed_the_frame() -> None:
    corner = square_boxes(np.array([[0.0, 0.0, 40.0, 40.0]]), W, H, margin=0.5)[0]
    assert corner.tolist() == [0, 0, 80, 80]  # shifted, not padded: centre moves off the face
    huge = square_boxes(np.array([[10.0, 5.0, 170.0, 125.0]]), W, H, margin=0.25)[0]
    assert huge[2] - huge[0] == H and huge[1] == 0 and huge[3] == H and 0 <= huge[0] and huge[2] <= W


def test_dominance_decides_between_one_face_and_several() -> None:
    big, third = (20, 20, 80, 80), (120, 20, 140, 40)  # area ratio 9
    twin = (100, 20, 160, 80)  # same area as `big`
    tracks, cut = face_tracks([det(big, third)] * 25, W, H, FPS)
    assert cut == [] and len(tracks) == 1
    tracks, cut = face_tracks([det(big, twin)] * 25, W, H, FPS)
    assert tracks == [] and cut == [(0, 25, faces.SEVERAL_FACES)]
    tracks, cut = face_tracks([det(big, twin)] * 25, W, H, FPS, dominance=1.0)
    assert cut == [] and len(tracks) == 1


def test_cut_ranges_for_no_face_short_tracks_and_bridged_gaps() -> None:
    face = det((60, 40, 100, 90))
    none = det()
    detections = [face] * 30 + [none] * 3 + [face] * 30 + [none] * 20 + [face] * 10
    tracks, cut = face_tracks(detections, W, H, FPS, max_gap_seconds=0.2)
    assert [(t.start, t.end) for t in tracks] == [(0, 63)]  # the 3-frame gap (<= 5) is bridged
    assert cut == [(63, 83, faces.NO_FACE), (83, 93, faces.SHORT_TRACK)]
    tracks, cut = face_tracks(detections, W, H, FPS, max_gap_seconds=0.0)
    assert [(t.start, t.end) for t in tracks] == [(0, 30), (33, 63)]
    assert cut[0] == (30, 33, faces.NO_FACE)


def test_a_jump_to_another_place_splits_the_track() -> None:
    detections = [det((10, 40, 50, 90))] * 30 + [det((120, 40, 160, 90))] * 30
    tracks, cut = face_tracks(detections, W, H, FPS)
    assert cut == [] and [(t.start, t.end) for t in tracks] == [(0, 30), (30, 60)]
    assert tracks[0].boxes[-1, 0] < 30 < 100 < tracks[1].boxes[0, 0]  # no smoothing across the jump


def test_skipped_frames_are_interpolated_or_take_the_nearest_label() -> None:
    moving = [det((40 + 3 * t, 40, 70 + 3 * t, 70)) if t % 4 == 0 else None for t in range(29)]
    tracks, _ = face_tracks(moving, W, H, FPS, smooth_seconds=0.0)
    centre = (tracks[0].boxes[:, 0] + tracks[0].boxes[:, 2]) / 2
    assert np.allclose(centre, 55 + 3 * np.arange(29), atol=1)
    mixed = [det((60, 40, 100, 90)), None, None, None, det(), None, None, None, det()] + [det()] * 20
    tracks, cut = face_tracks(mixed, W, H, FPS, min_seconds=0.0, max_gap_seconds=0.0)
    assert [(t.start, t.end) for t in tracks] == [(0, 3)]  # frame 2 is nearer 0 than 4 (tie goes back)
    assert cut == [(3, 29, faces.NO_FACE)]


def test_smoothing_removes_detector_jitter_but_follows_motion() -> None:
    rng = np.random.default_rng(0)
    truth = np.stack([20 + np.arange(100) * 0.5, np.full(100, 40.0)], axis=1)  # [T, 2] top-left
    noisy = truth + rng.normal(0, 2.0, truth.shape)
    detections = [det((x, y, x + 40, y + 50)) for x, y in noisy]
    boxes = face_tracks(detections, W, H, FPS, margin=0.0, smooth_seconds=0.4)[0][0].boxes
    raw_error = np.abs(noisy[:, 0] - truth[:, 0]).mean()
    smooth_error = np.abs(boxes[:, 0] + 5 - truth[:, 0]).mean()  # side 50: x0 sits 5 left of the face
    assert smooth_error < 0.6 * raw_error
    assert np.abs(np.diff(boxes[:, 0])).max() <= 3


def test_bad_arguments_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="all None"):
        face_tracks([None, None], W, H, FPS)
    with pytest.raises(ValueError, match="positive frame size"):
        face_tracks([det()], 0, H, FPS)
    assert face_tracks([], W, H, FPS) == ([], [])
    frames = np.zeros((4, H, W, 3), np.uint8)
    with pytest.raises(ValueError, match="does not fit 4 frames"):
        crop_track(frames, FaceTrack(2, 6, np.zeros((4, 4), np.int64)), 32)
    with pytest.raises(ValueError, match=r"uint8 array \[T, H, W, 3\]"):
        crop_track(frames.astype(np.float32), FaceTrack(0, 1, np.zeros((1, 4), np.int64)), 32)


def test_crop_track_cuts_exactly_the_track_boxes() -> None:
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (6, H, W, 3), dtype=np.uint8)
    boxes = np.array([[10 + t, 20, 74 + t, 84] for t in range(4)], np.int64)
    crops = crop_track(frames, FaceTrack(2, 6, boxes), 64)  # side 64 == size: no resampling
    assert crops.shape == (4, 64, 64, 3) and crops.dtype == np.uint8
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        assert np.array_equal(crops[i], frames[2 + i, y0:y1, x0:x1])
    assert crop_track(frames, FaceTrack(2, 6, boxes), 32).shape == (4, 32, 32, 3)


# ---------------------------------------------------------------- real detection on a real face


@pytest.fixture(scope="module")
def detector() -> faces.FaceDetector:
    pytest.importorskip("facenet_pytorch")
    return faces.FaceDetector()


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return pytest.importorskip("skimage.data").astronaut()  # [512, 512, 3] uint8, one real face


@pytest.fixture(scope="module")
def patch(astronaut: np.ndarray) -> np.ndarray:
    """The astronaut's head and shoulders, PATCH x PATCH."""
    from pipeline.media import square_resize

    return square_resize(astronaut[20:240, 115:335][None], PATCH)[0]


@pytest.fixture(scope="module")
def patch_face(detector: faces.FaceDetector, patch: np.ndarray) -> np.ndarray:
    """The face box inside the patch, (x0, y0, x1, y1), as found on the patch alone."""
    found = detector.detect(patch[None])[0]
    assert len(found) == 1 and found[0, 4] > 0.99
    return found[0, :4]


def scene(patch: np.ndarray, positions: list[list[tuple[int, int]]]) -> np.ndarray:
    """Frames [T, H, W, 3]: the patch pasted at each frame's (x, y) positions on a flat background."""
    frames = np.full((len(positions), H, W, 3), BACKGROUND, np.uint8)
    for t, places in enumerate(positions):
        for x, y in places:
            frames[t, y : y + PATCH, x : x + PATCH] = patch
    return frames


def expected_box(face: np.ndarray, x: int, y: int, margin: float = 0.25) -> np.ndarray:
    """The square crop box of the patch's face pasted at (x, y), computed independently of pipeline.faces."""
    cx, cy = (face[0] + face[2]) / 2 + x, (face[1] + face[3]) / 2 + y
    half = max(face[2] - face[0], face[3] - face[1]) * (1 + 2 * margin) / 2
    return np.array([cx - half, cy - half, cx + half, cy + half])


def test_detector_finds_the_real_face_at_full_and_reduced_resolution(
    detector: faces.FaceDetector, astronaut: np.ndarray
) -> None:
    full = detector.detect(astronaut[None])[0]  # detected at 256 x 256, boxes in source pixels
    assert full.shape == (1, 5) and full[0, 4] > 0.99
    assert iou(full[0], np.array([181, 62, 268, 172])) > 0.8  # the face, measured once by eye and MTCNN
    small = faces.FaceDetector(detect_side=128, min_face_size=20).detect(astronaut[None])[0]
    assert iou(small[0], full[0]) > 0.8
    noise = np.random.default_rng(0).integers(0, 256, (3, H, W, 3), dtype=np.uint8)
    assert [d.shape for d in detector.detect(noise)] == [(0, 5)] * 3


def test_track_follows_a_moving_real_face(
    detector: faces.FaceDetector, patch: np.ndarray, patch_face: np.ndarray
) -> None:
    xs = [4 + t * 9 // 5 for t in range(50)]  # 1.8 px per frame to the right
    frames = scene(patch, [[(x, 20)] for x in xs])
    tracks, cut = face_tracks(detector.detect(frames), W, H, FPS)
    assert cut == [] and len(tracks) == 1 and (tracks[0].start, tracks[0].end) == (0, 50)
    boxes = tracks[0].boxes
    assert min(iou(b, expected_box(patch_face, x, 20)) for b, x in zip(boxes, xs)) >= 0.7
    step = np.diff(boxes, axis=0)  # [49, 4]
    assert np.abs(step[:, [0, 2]] - np.diff(xs)[:, None]).max() <= 2  # follows the motion without jitter
    assert np.abs(step[:, [1, 3]]).max() <= 1
    crops = crop_track(frames, tracks[0], 64)
    centres = [detector.detect(c[None])[0] for c in crops[::10]]
    for found in centres:  # the face sits in the middle of every crop
        assert len(found) == 1
        assert np.allclose((found[0, :2] + found[0, 2:4]) / 2, 32, atol=64 * 0.08)
    strided = detector.detect(frames, stride=3)
    assert sum(d is not None for d in strided) == 18  # frames 0, 3, ..., 48 and the last, 49
    tracks3, cut3 = face_tracks(strided, W, H, FPS)
    assert cut3 == [] and min(iou(b, expected_box(patch_face, x, 20)) for b, x in zip(tracks3[0].boxes, xs)) >= 0.7


def test_frames_without_the_face_are_cut_out(detector: faces.FaceDetector, patch: np.ndarray) -> None:
    here = [(40, 24)]
    positions = [here] * 30 + [[]] * 25 + [here] * 20
    positions[12] = []  # one dropped frame inside the track is bridged
    tracks, cut = face_tracks(detector.detect(scene(patch, positions)), W, H, FPS)
    assert [(t.start, t.end) for t in tracks] == [(0, 30)]
    assert cut == [(30, 55, faces.NO_FACE), (55, 75, faces.SHORT_TRACK)]  # 20 frames < 1 s


def test_two_faces_of_the_same_size_are_cut_out(detector: faces.FaceDetector, patch: np.ndarray) -> None:
    frames = scene(patch, [[(4, 24), (92, 24)]] * 25)
    detections = detector.detect(frames)
    assert all(len(d) == 2 for d in detections)
    assert face_tracks(detections, W, H, FPS) == ([], [(0, 25, faces.SEVERAL_FACES)])


def test_crop_portrait_centres_the_face_and_refuses_noise(
    detector: faces.FaceDetector, astronaut: np.ndarray, patch: np.ndarray
) -> None:
    crop, warnings = crop_portrait(astronaut, 128, detector)
    assert crop.shape == (128, 128, 3) and crop.dtype == np.uint8 and warnings == []
    found = detector.detect(crop[None])[0]
    assert len(found) == 1 and np.allclose((found[0, :2] + found[0, 2:4]) / 2, 64, atol=128 * 0.08)
    side = max(found[0, 2] - found[0, 0], found[0, 3] - found[0, 1])
    assert 128 / 1.5 * 0.85 < side < 128 / 1.5 * 1.15  # margin 0.25 per side: face is 2/3 of the crop
    _, warnings = crop_portrait(astronaut, 512, detector, name="me.png")
    assert len(warnings) == 1
    assert re.fullmatch(r"me\.png: face crop is (\d+)x\1 pixels, upscaled to 512x512", warnings[0])
    _, warnings = crop_portrait(scene(patch, [[(4, 24), (92, 24)]])[0], 48, detector, name="two.png")
    assert warnings == ["two.png: 2 faces found, using the largest"]
    noise = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    with pytest.raises(NoFaceError, match="noise.png: no face found"):
        crop_portrait(noise, 64, detector, name="noise.png")
    with pytest.raises(ValueError, match=r"gray.png: image must be a uint8 array \[H, W, 3\]"):
        crop_portrait(noise[..., 0], 64, detector, name="gray.png")


def test_prepare_with_real_face_detection_crops_the_moving_face_and_cuts_where_it_is_gone(
    detector: faces.FaceDetector, patch: np.ndarray, patch_face: np.ndarray, tmp_path
) -> None:
    """`letstalk prepare --crop face --detect-every 2` end to end with real MTCNN: a face gliding across
    the frame for 2 s, then 1 s without it. One segment follows the face; the faceless second is cut."""
    from diffusers import AutoencoderKL

    from pipeline import media
    from pipeline.prepare import prepare
    from pipeline.shards import Manifest, iter_tar
    from pipeline.vae import demo_vae_config

    positions = [[(10 + t, 20)] for t in range(50)] + [[] for _ in range(25)]
    video = tmp_path / "speaker.mp4"
    t = np.arange(75 * 640) / 16000
    media.write_video(video, scene(patch, positions), FPS, audio=0.3 * np.sin(2 * np.pi * 220 * t), crf=10)
    torch.manual_seed(0)
    AutoencoderKL(**demo_vae_config(block_out_channels=(8, 16, 16))).save_pretrained(tmp_path / "vae")
    manifest = prepare(video, tmp_path / "out", encoders=Encoders(vae=str(tmp_path / "vae")),
                       frames=Frames(size=64, crop="face", detect_every=2),
                       segments=Segments(segment_seconds=4.0, min_segment_seconds=1.0), progress=False)
    assert manifest.failed == [] and len(manifest.inputs) == 1
    (start, end, reason), = manifest.inputs[0]["cut"]
    assert reason == "no face" and 48 <= start <= 51 and end == 75
    (segment,) = list(iter_tar(Manifest.load(tmp_path / "out").shard_paths(tmp_path / "out")[0]))
    assert segment.meta["crop"] == "face" and segment.meta["start_frame"] == 0 and segment.meta["frames"] == start
    assert len(segment.waveform_flac) and segment.latents.shape[0] == start
    boxes = np.asarray(segment.meta["face_boxes"], float)
    for k in (0, 20, 40):
        assert iou(boxes[k], expected_box(patch_face, *positions[k][0])) > 0.7

"""pipeline.sync: loudness envelope, mouth measurement and the lip-sync score, on real synthetic clips."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline import media, sync, synth

SR, FPS = 16000, 25


def test_loudness_envelope_known_values():
    t = np.arange(SR) / SR
    sine = 0.6 * np.sin(2 * np.pi * 100 * t)  # 4 whole periods per 640-sample frame
    np.testing.assert_allclose(sync.loudness_envelope(sine, SR, FPS, 25), 0.6 / np.sqrt(2), rtol=1e-5)
    np.testing.assert_allclose(sync.loudness_envelope(np.full(SR, -0.25), SR, FPS, 25), 0.25, rtol=1e-6)
    step = np.concatenate([np.zeros(SR // 2), np.full(SR // 2, 0.5)])
    np.testing.assert_allclose(sync.loudness_envelope(step, SR, FPS, 25), [0.0] * 12 + [np.sqrt(0.5 * 0.25)] + [0.5] * 12)


def test_loudness_envelope_pads_short_audio_and_covers_every_sample_once():
    envelope = sync.loudness_envelope(np.full(SR // 2, 0.5), SR, FPS, 25)  # 0.5 s of audio for 1 s of video
    np.testing.assert_allclose(envelope, [0.5] * 12 + [np.sqrt(0.5 * 0.25)] + [0.0] * 12)
    rng = np.random.default_rng(0)
    wave = rng.normal(0, 0.3, SR)
    bounds = sync.frame_bounds(SR, 30, 30)  # 533.33 samples per frame
    assert bounds[0] == 0 and bounds[-1] == SR and set(np.diff(bounds)) == {533, 534}
    envelope = sync.loudness_envelope(wave, SR, 30, 30).astype(np.float64)
    assert np.sum(envelope**2 * np.diff(bounds)) == pytest.approx(np.sum(wave**2), rel=1e-5)


def test_mouth_region_unions_boxes_and_clips():
    side = {"size": 64, "mouth_box": [[20, 40, 40, 50], [22, 38, 42, 49], [18, 41, 39, 63]]}
    assert sync.mouth_region(side, margin=0) == (18, 38, 42, 63)
    assert sync.mouth_region(side, margin=2) == (16, 36, 44, 64)
    with pytest.raises(ValueError, match="mouth_box"):
        sync.mouth_region({"size": 64, "mouth_box": []})


def still_face(seed: int = 3) -> synth.Face:
    face = synth.random_face(np.random.default_rng(seed), 64, 4.0)
    return dataclasses.replace(face, motion_amp=(0.0, 0.0), blinks=[])


def blur(frames: np.ndarray) -> np.ndarray:
    """A 5x5 binomial blur, standing in for a soft VAE decode."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    kernel = (k[:, None] * k[None] / 256).expand(3, 1, 5, 5)
    x = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), kernel, groups=3)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("seed", [0, 3, 7])
def test_mouth_opening_increases_with_drawn_opening(seed):
    face = still_face(seed)
    opening = np.linspace(0, 1, 11)
    frames, boxes = synth.render_face(face, opening)
    box = sync.mouth_region({"size": 64, "mouth_box": boxes.tolist()}, margin=2)
    measured = sync.mouth_opening(frames, box)
    assert np.all(np.diff(measured) > 0)
    blurred = sync.mouth_opening(blur(frames), box)
    assert np.all(np.diff(blurred) > 0)
    np.testing.assert_allclose(blurred, measured, atol=0.15 * measured.max())  # blur keeps total darkness
    assert np.corrcoef(measured, opening)[0, 1] > 0.99


def test_mouth_opening_of_flat_frames_is_zero_and_box_is_checked():
    frames = np.full((4, 32, 32, 3), 180, np.uint8)
    np.testing.assert_array_equal(sync.mouth_opening(frames, (4, 4, 20, 20)), 0.0)
    with pytest.raises(ValueError, match="outside"):
        sync.mouth_opening(frames, (10, 10, 40, 20))
    with pytest.raises(ValueError, match="empty"):
        sync.mouth_opening(frames, (10, 10, 10, 20))


def test_sync_score():
    rng = np.random.default_rng(1)
    a = rng.random(50)
    assert sync.sync_score(a, a) == pytest.approx(1.0)
    assert sync.sync_score(a, 3 * a + 2) == pytest.approx(1.0)
    assert sync.sync_score(a, -a) == pytest.approx(-1.0)
    assert sync.sync_score(a, np.full(50, 0.3)) == 0.0
    assert sync.sync_score(np.zeros(50), a) == 0.0
    shifted = np.roll(np.sin(np.linspace(0, 6 * np.pi, 50)), 4)  # lag 0 only: a late mouth scores lower
    assert sync.sync_score(shifted, np.sin(np.linspace(0, 6 * np.pi, 50))) < 0.7
    with pytest.raises(ValueError, match="equal length"):
        sync.sync_score(a, a[:-1])


@pytest.fixture(scope="module")
def decoded_clips(tmp_path_factory) -> list[tuple[np.ndarray, np.ndarray]]:
    """(mouth opening measured in the decoded mp4, loudness of the decoded audio) per synthetic clip."""
    paths = synth.synthesize(tmp_path_factory.mktemp("synth"), clips=4, seconds=4.0, seed=11)
    result = []
    for path in paths:
        side = json.loads(path.with_suffix(".json").read_text())
        frames = media.read_video(path)
        audio = media.read_audio(path)
        mouth = sync.mouth_opening(frames, sync.mouth_region(side, margin=2))
        result.append((mouth, sync.loudness_envelope(audio, SR, FPS, len(frames))))
    return result


def test_sync_high_with_own_audio(decoded_clips):
    for mouth, envelope in decoded_clips:
        assert sync.sync_score(mouth, envelope) > 0.9


def test_sync_near_zero_with_other_audio(decoded_clips):
    count = len(decoded_clips)
    scores = [
        sync.sync_score(decoded_clips[i][0], decoded_clips[j][1]) for i in range(count) for j in range(count) if i != j
    ]
    assert max(abs(s) for s in scores) < 0.3
    assert abs(np.mean(scores)) < 0.15

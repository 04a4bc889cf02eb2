"""pipeline.synth: synthetic talking-face clips written as real mp4s with ground truth."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline import media, sync, synth

SR, FPS = 16000, 25


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return out, synth.synthesize(out, clips=3, seconds=2.0, size=64, seed=5)


def test_files_and_streams(written):
    out, paths = written
    assert [p.name for p in paths] == ["clip_0000.mp4", "clip_0001.mp4", "clip_0002.mp4"]
    summary = json.loads((out / "synth.json").read_text())
    assert summary["clips"] == 3 and summary["seed"] == 5 and summary["files"] == [p.name for p in paths]
    for index, path in enumerate(paths):
        streams = media.media_streams(path)
        assert (streams["video_codec"], streams["audio_codec"]) == ("h264", "aac")
        assert (streams["num_frames"], streams["width"], streams["height"]) == (50, 64, 64)
        assert streams["audio_duration_s"] == pytest.approx(2.0, abs=1 / FPS)
        side = json.loads(path.with_suffix(".json").read_text())
        assert side["seed"] == 5 + index and side["frames"] == 50
        assert len(side["mouth_open"]) == 50 and len(side["mouth_box"]) == 50
        assert min(side["mouth_open"]) == 0.0 and max(side["mouth_open"]) == 1.0


def test_side_json_matches_the_clip(written):
    _, paths = written
    side = json.loads(paths[1].with_suffix(".json").read_text())
    clip = synth.draw_clip(side["seed"], seconds=2.0)
    np.testing.assert_allclose(side["mouth_open"], clip.mouth_open, atol=1e-5)
    assert side["mouth_box"] == clip.mouth_box.tolist()
    assert side["face"]["hair_style"] in ("cap", "bob", "bun", "side")


def test_ground_truth_follows_audio_loudness(written):
    _, paths = written
    side = json.loads(paths[0].with_suffix(".json").read_text())
    envelope = sync.loudness_envelope(media.read_audio(paths[0]), SR, FPS, side["frames"])
    assert sync.sync_score(np.asarray(side["mouth_open"]), envelope) > 0.98  # AAC barely changes the loudness


def test_deterministic_for_a_seed(tmp_path, written):
    _, paths = written
    again = synth.synthesize(tmp_path, clips=1, seconds=2.0, size=64, seed=5)[0]
    assert again.with_suffix(".json").read_text() == paths[0].with_suffix(".json").read_text()
    np.testing.assert_array_equal(media.read_video(again), media.read_video(paths[0]))
    np.testing.assert_array_equal(media.read_audio(again), media.read_audio(paths[0]))
    first, second = synth.draw_clip(9, seconds=1.0), synth.draw_clip(9, seconds=1.0)
    assert first.frames.tobytes() == second.frames.tobytes() and first.audio.tobytes() == second.audio.tobytes()


def test_clips_differ():
    clips = [synth.draw_clip(seed, seconds=1.0) for seed in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(clips[i].frames.astype(float) - clips[j].frames).mean() > 10
            assert clips[i].meta["face"]["background"] != clips[j].meta["face"]["background"]
            assert not np.allclose(clips[i].audio, clips[j].audio)


def test_voice_is_speech_like():
    clip = synth.draw_clip(2, seconds=4.0)
    audio, voice = clip.audio, clip.meta["voice"]
    assert audio.dtype == np.float32 and len(audio) == 4 * SR
    assert np.abs(audio).max() == pytest.approx(0.8, abs=1e-3)
    assert 90 <= voice["f0_hz"] <= 250 and 3 <= voice["syllables_per_s"] <= 6
    # pauses: runs of >= 0.2 s (5 frames) that are nearly silent
    quiet = clip.mouth_open < 0.05
    runs, length = [], 0
    for value in quiet:
        length = length + 1 if value else 0
        runs.append(length)
    assert max(runs) >= 5
    # pitch: the autocorrelation of the loudest 100 ms peaks near 1 / f0 (within the vibrato and intonation range)
    centre = int(np.argmax(clip.mouth_open)) * SR // FPS + SR // (2 * FPS)
    segment = audio[max(0, centre - 800) : centre + 800].astype(np.float64)
    segment -= segment.mean()
    corr = np.correlate(segment, segment, "full")[len(segment) - 1 :]
    lag = int(np.argmax(corr[SR // 300 : SR // 70])) + SR // 300
    assert SR / lag == pytest.approx(voice["f0_hz"], rel=0.15)


def test_mouth_box_contains_the_open_mouth():
    clip = synth.draw_clip(4, seconds=2.0)
    frame_index = int(np.argmax(clip.mouth_open))
    frame = clip.frames[frame_index].astype(int)
    dark = (frame.sum(-1) < 120) & (frame[..., 0] > frame[..., 1])  # mouth interior: dark red
    ys, xs = np.nonzero(dark)
    assert len(ys) > 40  # a large, measurable mouth at 64 px
    x0, y0, x1, y1 = clip.mouth_box[frame_index]
    assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
    mouth_width = xs.max() - xs.min() + 1
    face_width = 2 * clip.meta["face"]["half_width"]
    assert 0.25 <= mouth_width / face_width <= 0.5


def test_a_still_clip_has_the_true_mouth_on_a_head_that_never_moves_or_blinks():
    seed = next(s for s in range(50) if len(synth.draw_clip(s, seconds=4.0).meta["face"]["blinks"]) >= 2)
    real, still = synth.draw_clip(seed, seconds=4.0), synth.draw_clip(seed, seconds=4.0, still=True)
    np.testing.assert_array_equal(still.audio, real.audio)
    np.testing.assert_array_equal(still.mouth_open, real.mouth_open)
    np.testing.assert_array_equal(still.frames[0], real.frames[0])  # the portrait is the same
    mouth = np.zeros(real.frames.shape[1:3], dtype=bool)  # every pixel any frame's mouth box covers, in either clip
    for x0, y0, x1, y1 in np.concatenate([real.mouth_box, still.mouth_box]):
        mouth[y0:y1, x0:x1] = True
    outside = ~mouth
    assert (still.frames[:, outside] == still.frames[:1, outside]).all()  # nothing moves but the mouth
    assert (real.frames[:, outside] != real.frames[:1, outside]).any(axis=(1, 2)).mean() > 0.5  # the real head does
    assert len(set(map(tuple, still.mouth_box))) == 1  # the mouth stays where the portrait has it
    opening = still.frames[:, mouth].astype(int).sum(axis=(1, 2))  # the mouth's pixels follow the opening
    assert np.corrcoef(opening, still.mouth_open)[0, 1] < -0.9  # (an open mouth is dark)
    assert still.meta["face"]["motion_amp"] == [0.0, 0.0] and still.meta["face"]["blinks"] == []


def test_rejects_unusable_sizes():
    with pytest.raises(ValueError, match="size"):
        synth.draw_clip(0, size=8)
    with pytest.raises(ValueError, match="fewer than 2 frames"):
        synth.draw_clip(0, seconds=0.04)

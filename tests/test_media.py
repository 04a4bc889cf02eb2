"""pipeline.media on real files: write_video/read_video/read_audio round trips, fps conversion, errors."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from pipeline import media
from pipeline.media import MediaError

SR = media.SAMPLE_RATE


def ffmpeg(*args: str) -> None:
    subprocess.run([media.ffmpeg_exe(), "-y", "-loglevel", "error", *args], check=True)


def smooth_frames(count: int, height: int, width: int) -> np.ndarray:
    """uint8 [T, H, W, 3]: slowly moving gradients, easy for H.264."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    t = np.arange(count, dtype=np.float32)[:, None, None]
    red = 128 + 90 * np.sin(2 * np.pi * (x / width + t / 40))
    green = 40 + 160 * y / height + 0 * t
    blue = 200 - 2 * t + 0 * x
    return np.clip(np.stack([red, green, blue], -1), 0, 255).astype(np.uint8)


def tone(seconds: float, freq: float = 440.0, rate: int = SR, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amp * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t)) / 1.5).astype(np.float32)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    path = tmp_path_factory.mktemp("media") / "clip.mp4"
    frames, audio = smooth_frames(50, 48, 64), tone(2.0)
    media.write_video(path, frames, 25, audio)
    return path, frames, audio


def test_round_trip_frames(clip):
    path, frames, _ = clip
    decoded = media.read_video(path)
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    error = np.abs(decoded.astype(np.int16) - frames.astype(np.int16))
    assert error.mean() < 3.0
    assert np.abs(decoded.astype(float).mean(axis=(1, 2, 3)) - frames.astype(float).mean(axis=(1, 2, 3))).max() < 2.0


def test_round_trip_audio_and_streams(clip):
    path, frames, audio = clip
    streams = media.media_streams(path)
    assert (streams["video_streams"], streams["audio_streams"]) == (1, 1)
    assert (streams["video_codec"], streams["audio_codec"]) == ("h264", "aac")
    assert streams["num_frames"] == 50 and streams["fps"] == pytest.approx(25.0)
    assert abs(streams["audio_duration_s"] - len(frames) / 25) <= 1 / 25
    decoded = media.read_audio(path)
    assert decoded.dtype == np.float32 and decoded.ndim == 1
    assert abs(len(decoded) - len(audio)) <= SR // 25
    n = min(len(decoded), len(audio))
    assert np.corrcoef(decoded[:n], audio[:n])[0, 1] > 0.99  # aligned in time: no codec delay left in
    assert np.abs(decoded).max() <= 1.0


def test_probe_video(clip):
    info = media.probe_video(clip[0])
    assert (info.num_frames, info.width, info.height, info.has_audio) == (50, 64, 48, True)
    assert info.fps == pytest.approx(25.0) and info.duration_s == pytest.approx(2.0, abs=1e-3)


def test_audio_trimmed_or_padded_to_video_length(tmp_path):
    frames = smooth_frames(20, 32, 32)  # 0.8 s at 25 fps
    for name, audio in (("long.mp4", tone(1.7)), ("short.mp4", tone(0.3))):
        media.write_video(tmp_path / name, frames, 25, audio)
        decoded = media.read_audio(tmp_path / name)
        assert len(decoded) == pytest.approx(0.8 * SR, abs=SR // 25)
        if name == "short.mp4":
            assert np.abs(decoded[int(0.4 * SR) :]).max() < 0.01  # zero padding after the 0.3 s of tone


def test_fps_conversion_picks_nearest_frames(tmp_path):
    source = np.stack([np.full((32, 32, 3), 4 * i, np.uint8) for i in range(60)])  # brightness = 4 * frame index
    path = tmp_path / "thirty.mp4"
    media.write_video(path, source, 30)
    decoded = media.read_video(path, fps=25)
    assert decoded.shape[0] == 50
    picked = np.round(decoded.astype(float).mean(axis=(1, 2, 3)) / 4).astype(int)
    expected = np.floor(np.arange(50) * 30 / 25 + 0.5).astype(int)  # nearest source frame to k / 25 s
    np.testing.assert_array_equal(picked, expected)


def test_ffmpeg_made_30fps_video_gives_50_frames_and_resizes(tmp_path):
    path = tmp_path / "testsrc.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=96x64:rate=30", "-t", "2", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path))
    assert media.read_video(path).shape == (50, 64, 96, 3)
    assert media.read_video(path, size=32).shape == (50, 32, 32, 3)


def test_resize_centre_crops(tmp_path):
    frames = np.zeros((10, 48, 80, 3), np.uint8)
    frames[..., 1] = 200  # green centre square
    frames[:, :, :16, 0] = frames[:, :, -16:, 0] = 255  # red side bands outside the centre 48x48
    frames[:, :, :16, 1] = frames[:, :, -16:, 1] = 0
    path = tmp_path / "wide.mp4"
    media.write_video(path, frames, 25)
    small = media.read_video(path, size=24).astype(float)
    assert small.shape == (10, 24, 24, 3)
    assert small[..., 0].mean() < 12 and small[..., 1].mean() > 185


def test_odd_size_is_padded_to_even(tmp_path):
    frames = smooth_frames(10, 47, 63)
    path = tmp_path / "odd.mp4"
    media.write_video(path, frames, 25)
    decoded = media.read_video(path)
    assert decoded.shape == (10, 48, 64, 3)
    assert np.abs(decoded[:, :47, :63].astype(float) - frames).mean() < 3.0


def test_write_failure_leaves_no_file_and_keeps_the_old_one(tmp_path):
    with pytest.raises(MediaError, match="ffmpeg failed"):
        media.write_video(tmp_path / "clip.notaformat", smooth_frames(5, 16, 16), 25, tone(0.2))
    assert list(tmp_path.iterdir()) == []
    old = tmp_path / "clip.mp4"
    old.write_bytes(b"previous result")
    with pytest.raises(MediaError, match="ffmpeg failed") as info:
        media.write_video(old, smooth_frames(5, 16, 16), 25, tone(0.2), crf=-5)  # x264 rejects the crf
    assert str(old) in str(info.value)
    with pytest.raises(MediaError, match="uint8"):
        media.write_video(old, np.zeros((5, 16, 16, 3), np.float32), 25)
    assert list(tmp_path.iterdir()) == [old] and old.read_bytes() == b"previous result"


def test_read_audio_file_downmixes_and_resamples(tmp_path):
    rate = 44100
    left = tone(1.0, 300.0, rate)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, 0.5 * left], 1), rate)
    audio = media.read_audio(path)
    assert audio.dtype == np.float32 and len(audio) == SR
    expected = tone(1.0, 300.0, SR) * 0.75
    assert np.abs(audio[200:-200] - expected[200:-200]).max() < 0.01
    spectrum = np.abs(np.fft.rfft(audio))
    assert np.argmax(spectrum) * SR / len(audio) == pytest.approx(300.0, abs=2)


def stereo(seconds: float, rate: int) -> np.ndarray:
    """float32 [N, 2]: a different tone in each channel, so a swap or a mix shows."""
    return np.stack([tone(seconds, 300.0, rate), tone(seconds, 520.0, rate, amp=0.3)], axis=1)


def correlations(decoded: np.ndarray, source: np.ndarray) -> list[float]:
    """Per-channel correlation of two [N, C] signals over their common length."""
    n = min(len(decoded), len(source))
    return [float(np.corrcoef(decoded[:n, c], source[:n, c])[0, 1]) for c in range(source.shape[1])]


def test_soundtrack_keeps_its_rate_and_channels(tmp_path):
    """44.1 kHz stereo stays 44.1 kHz stereo through write_video (AAC), trimmed or padded to the video."""
    frames = smooth_frames(20, 32, 32)  # 0.8 s at 25 fps
    for name, seconds in (("long.mp4", 1.3), ("short.mp4", 0.5)):
        source = stereo(seconds, 44100)
        media.write_video(tmp_path / name, frames, 25, source, sample_rate=44100)
        streams = media.media_streams(tmp_path / name)
        assert (streams["audio_sample_rate"], streams["audio_channels"]) == (44100, 2)
        assert streams["audio_duration_s"] == pytest.approx(0.8, abs=0.5 / 25)
        decoded, rate = media.read_audio_native(tmp_path / name)
        assert rate == 44100 and decoded.shape[1] == 2 and decoded.dtype == np.float32
        assert min(correlations(decoded, source[: int(0.8 * 44100)])) > 0.99
        if name == "short.mp4":
            assert np.abs(decoded[int(0.6 * 44100) :]).max() < 0.01  # silence after the 0.5 s of audio


def test_mono_stays_mono_and_more_channels_become_stereo(tmp_path):
    frames = smooth_frames(10, 32, 32)
    media.write_video(tmp_path / "mono.mp4", frames, 25, tone(0.4, rate=22050), sample_rate=22050)
    assert (media.media_streams(tmp_path / "mono.mp4")["audio_channels"]) == 1
    six = np.concatenate([stereo(0.4, 48000)] * 3, axis=1)  # [N, 6]: 5.1 to ffmpeg
    media.write_video(tmp_path / "six.mp4", frames, 25, six, sample_rate=48000)
    streams = media.media_streams(tmp_path / "six.mp4")
    assert (streams["audio_sample_rate"], streams["audio_channels"]) == (48000, 2)
    with pytest.raises(MediaError, match=r"bad.mp4: audio must be float \[N\] or \[N, channels\]"):
        media.write_video(tmp_path / "bad.mp4", frames, 25, np.zeros((2, 10, 2), np.float32))
    assert not (tmp_path / "bad.mp4").exists()


def test_read_audio_native_reads_files_and_video_tracks(tmp_path):
    source = stereo(0.6, 44100)
    sf.write(tmp_path / "s.flac", source, 44100)
    data, rate = media.read_audio_native(tmp_path / "s.flac")
    assert rate == 44100 and data.shape == source.shape and np.abs(data - source).max() < 1e-3
    ffmpeg("-i", str(tmp_path / "s.flac"), "-c:a", "aac", str(tmp_path / "s.m4a"))
    data, rate = media.read_audio_native(tmp_path / "s.m4a")
    assert rate == 44100 and data.shape[1] == 2 and min(correlations(data, source)) > 0.99
    assert abs(len(data) - len(source)) <= 44100 // 100  # the codec's priming removed
    media.write_video(tmp_path / "silent.mp4", smooth_frames(5, 16, 16), 25)
    with pytest.raises(MediaError, match="silent.mp4: no audio stream"):
        media.read_audio_native(tmp_path / "silent.mp4")


def test_flac_round_trip():
    audio = tone(0.5)
    data = media.flac_bytes(audio, SR)
    assert data[:4] == b"fLaC"
    decoded, rate = media.decode_flac(data)
    assert rate == SR and decoded.dtype == np.float32 and len(decoded) == len(audio)
    assert np.abs(decoded - audio).max() < 1e-4
    with pytest.raises(MediaError, match="key/0001"):
        media.decode_flac(b"not flac at all", source="key/0001")


@pytest.fixture(scope="module")
def broken(tmp_path_factory, clip) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("broken")
    (root / "empty.mp4").write_bytes(b"")
    (root / "text.mp4").write_text("this is not a video\n")
    (root / "tiny.mp4").write_text("abc")  # decord "opens" it, then fails on the first frame
    data = clip[0].read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])
    return {
        "missing": root / "missing.mp4",
        "empty": root / "empty.mp4",
        "text": root / "text.mp4",
        "tiny": root / "tiny.mp4",
        "truncated": root / "truncated.mp4",
    }


@pytest.mark.parametrize(
    "case, reader",
    [(case, reader) for case in ("missing", "empty", "text", "truncated") for reader in (media.read_video, media.read_audio)]
    + [(case, media.probe_video) for case in ("missing", "empty", "text", "tiny")]  # a truncated mp4's index is intact
    + [("tiny", media.read_video)],
)
def test_bad_files_raise_media_error_naming_the_file(broken, case, reader):
    path = broken[case]
    with pytest.raises(MediaError) as info:
        reader(path)
    assert str(path) in str(info.value)
    expected = {"missing": "not found", "empty": "empty file", "text": "corrupt", "tiny": "corrupt",
                "truncated": "corrupt"}[case]
    assert expected in str(info.value)


def test_video_without_audio(tmp_path):
    path = tmp_path / "silent.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=25", "-t", "1", "-an", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path))
    with pytest.raises(MediaError, match="no audio stream") as info:
        media.read_audio(path)
    assert str(path) in str(info.value)
    assert media.read_video(path).shape == (25, 48, 64, 3)
    assert media.probe_video(path).has_audio is False
    streams = media.media_streams(path)
    assert streams["audio_streams"] == 0 and streams["audio_duration_s"] is None and streams["num_frames"] == 25


def test_media_streams_rejects_non_media(broken):
    with pytest.raises(MediaError, match="no video or audio stream"):
        media.media_streams(broken["text"])


def test_read_image(tmp_path):
    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[:, 10:50] = (30, 200, 90)  # the centre 40x40 square
    Image.fromarray(pixels).save(tmp_path / "portrait.png")
    np.testing.assert_array_equal(media.read_image(tmp_path / "portrait.png"), pixels)
    small = media.read_image(tmp_path / "portrait.png", size=20)
    assert small.shape == (20, 20, 3) and np.abs(small.astype(int) - (30, 200, 90)).max() <= 1
    Image.fromarray(pixels).convert("L").save(tmp_path / "grey.jpg")
    assert media.read_image(tmp_path / "grey.jpg").shape == (40, 60, 3)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(MediaError, match="corrupt image") as info:
        media.read_image(tmp_path / "bad.png")
    assert str(tmp_path / "bad.png") in str(info.value)
    assert ".mp4" in media.VIDEO_EXTENSIONS


def test_variable_frame_rate_uses_real_timestamps(tmp_path):
    """60 frames at 30 fps, then every 3rd kept after 1 s: output frame k is the kept frame nearest k / 25."""
    source = np.stack([np.full((32, 32, 3), 4 * i, np.uint8) for i in range(60)])  # brightness = 4 * index
    path = tmp_path / "vfr.mp4"
    command = [media.ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "32x32",
               "-r", "30", "-i", "pipe:0", "-vf", "select='lt(n\\,30)+not(mod(n\\,3))'", "-fps_mode", "vfr",
               "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "10", str(path)]  # fmt: skip
    subprocess.run(command, input=source.tobytes(), check=True)
    kept = np.array([i for i in range(60) if i < 30 or i % 3 == 0])
    decoded = media.read_video(path, fps=25)
    assert len(decoded) == int(media.probe_video(path).duration_s * 25)
    times = np.arange(len(decoded)) / 25
    expected = kept[np.abs(kept[None, :] / 30 - times[:, None]).argmin(axis=1)]
    picked = np.round(decoded.astype(float).mean(axis=(1, 2, 3)) / 4).astype(int)
    np.testing.assert_array_equal(picked, expected)
    assert not np.array_equal(expected, kept[np.minimum(np.round(times * 20).astype(int), len(kept) - 1)])  # avg fps 20


def test_rotated_video_is_read_upright(tmp_path):
    plain = tmp_path / "plain.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=25", "-t", "1", "-c:v", "libx264", "-pix_fmt", "yuv420p",
           str(plain))
    for degrees in (90, 180, 270):
        path = tmp_path / f"rot{degrees}.mp4"
        ffmpeg("-display_rotation", str(degrees), "-i", str(plain), "-c", "copy", str(path))
        info = media.probe_video(path)
        assert (info.rotation, info.num_frames) == (degrees, 25)
        upright = subprocess.run([media.ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt",
                                  "rgb24", "pipe:1"], capture_output=True, check=True).stdout  # ffmpeg autorotates
        decoded = media.read_video(path)
        shape = (25, 64, 48, 3) if degrees in (90, 270) else (25, 48, 64, 3)
        assert decoded.shape == shape and (info.width, info.height) == (shape[2], shape[1])
        np.testing.assert_array_equal(decoded, np.frombuffer(upright, np.uint8).reshape(shape))
        assert media.read_video(path, size=32).shape == (25, 32, 32, 3)
    assert media.probe_video(plain).rotation == 0
    moved = tmp_path / "rot90_faststart.mp4"  # index first: decord or the ffmpeg path finds the damage
    ffmpeg("-display_rotation", "90", "-i", str(plain), "-c", "copy", "-movflags", "+faststart", str(moved))
    (tmp_path / "cut.mp4").write_bytes(moved.read_bytes()[: moved.stat().st_size // 2])
    with pytest.raises(MediaError, match=r"cut.mp4: unreadable or corrupt video"):
        media.read_video(tmp_path / "cut.mp4")


def test_audio_only_file_has_no_video_stream(tmp_path):
    path = tmp_path / "speech.mp4"
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=300:duration=1", "-c:a", "aac", str(path))
    with pytest.raises(MediaError, match="no video stream") as info:
        media.probe_video(path)
    assert str(path) in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file anyway")
def test_unreadable_file(clip, tmp_path):
    path = tmp_path / "locked.mp4"
    path.write_bytes(clip[0].read_bytes())
    path.chmod(0)
    for reader in (media.read_video, media.read_audio, media.probe_video):
        with pytest.raises(MediaError, match="permission denied"):
            reader(path)

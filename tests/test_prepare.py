"""`prepare` on real files: synthesized talking faces, a tiny saved VAE, and broken inputs."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from diffusers import AutoencoderKL
from transformers import Wav2Vec2Config, Wav2Vec2Model

from pipeline import media
from pipeline.audio_encoders import MelEncoder, Wav2Vec2Encoder
from pipeline.prepare import crop_box, prepare, segment_bounds, unique_ids
from pipeline.shards import Manifest, iter_tar
from pipeline.synth import make_clip, synthesize
from pipeline.vae import VAEError, demo_vae_config, encode_frames, load_vae, vae_info

FPS, SR, SIZE = 25, 16000, 32
SPF = SR // FPS


def ffmpeg_lavfi(path: Path, video_seconds: float, audio_seconds: float | None) -> Path:
    """A 64x64 test-pattern mp4 with a sine tone of `audio_seconds` (None: no audio stream)."""
    command = [media.ffmpeg_exe(), "-y", "-loglevel", "error"]
    command += ["-f", "lavfi", "-i", f"testsrc=size=64x64:rate=25:duration={video_seconds}"]
    if audio_seconds is not None:
        command += ["-f", "lavfi", "-i", f"sine=frequency=440:duration={audio_seconds}", "-c:a", "aac"]
    command += ["-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)]
    subprocess.run(command, check=True)
    return path


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny-vae"
    AutoencoderKL(**demo_vae_config(block_out_channels=(8, 16, 16))).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    """Good clips (one non-square, two sharing a stem, one with slightly short audio) and bad inputs."""
    root = tmp_path_factory.mktemp("videos")
    (root / "a").mkdir()
    (root / "b").mkdir()
    (root / "c").mkdir()
    wide = make_clip(seed=0, seconds=4.0, size=64)
    frames = np.pad(wide.frames, ((0, 0), (0, 0), (8, 8), (0, 0)), mode="edge")  # [100, 64, 80, 3]
    media.write_video(root / "a" / "talk.mp4", frames, FPS, wide.audio)
    synth = synthesize(tmp_path_factory.mktemp("synth"), clips=1, seconds=2.0, size=64, seed=1)[0]
    (root / "b" / "talk.mp4").write_bytes(synth.read_bytes())
    short = make_clip(seed=2, seconds=0.8, size=64)
    media.write_video(root / "b" / "short.mp4", short.frames, FPS, short.audio)
    ffmpeg_lavfi(root / "c" / "padded.mp4", 1.2, 0.9)
    ffmpeg_lavfi(root / "halfaudio.mp4", 2.0, 0.5)
    media.write_video(root / "silent.mkv", short.frames, FPS)
    (root / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    (root / "empty.mov").write_bytes(b"")
    (root / "notes.mp4").write_text("meeting notes, not a video\n")
    (root / "readme.txt").write_text("ignored: not a video extension\n")
    return {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, videos, vae_dir) -> tuple[Path, Manifest]:
    out = tmp_path_factory.mktemp("shards")
    manifest = prepare(
        videos["a/talk.mp4"].parents[1], out, vae_dir, fps=FPS, size=SIZE, segment_seconds=1.5,
        min_segment_seconds=1.0, samples_per_shard=2, batch_size=8, progress=False,
    )
    return out, manifest


def samples(out: Path, manifest: Manifest) -> list:
    return [seg for path in manifest.shard_paths(out) for seg in iter_tar(path)]


def test_segment_bounds_unique_ids_and_crop_box():
    assert segment_bounds(100, 25, 1.5, 1.0) == [(0, 37), (37, 74), (74, 100)]
    assert segment_bounds(50, 25, 1.5, 1.0) == [(0, 37)]  # the 13-frame rest is dropped
    assert segment_bounds(100, 25, 4.0, 1.0) == [(0, 100)]
    assert segment_bounds(20, 25, 4.0, 1.0) == []
    with pytest.raises(ValueError, match="shorter than one frame"):
        segment_bounds(10, 25, 0.01, 0.0)
    assert unique_ids([Path("a/talk.mp4"), Path("b/talk.mp4"), Path("c/talk.mov"), Path("x.y.mp4")]) == [
        "talk", "talk_2", "talk_3", "x_y",
    ]
    assert crop_box(64, 48) == [8, 0, 56, 48] and crop_box(48, 80) == [0, 16, 48, 64]


def test_each_bad_input_is_recorded_with_its_reason(dataset, videos):
    _, manifest = dataset
    reasons = {Path(f["path"]).name: f["reason"] for f in manifest.failed}
    assert set(reasons) == {"short.mp4", "halfaudio.mp4", "silent.mkv", "corrupt.mp4", "empty.mov", "notes.mp4"}
    assert reasons["short.mp4"].startswith("shorter than min_segment_seconds (0.80 s)")
    assert reasons["halfaudio.mp4"] == "audio much shorter than video (0.50 s vs 2.00 s)"
    assert reasons["silent.mkv"] == "no audio stream"
    assert reasons["corrupt.mp4"].startswith("unreadable or corrupt video")
    assert reasons["notes.mp4"].startswith("unreadable or corrupt video")
    assert reasons["empty.mov"].startswith("empty file")
    assert all(not r.startswith("/") for r in reasons.values())  # the path is its own field


def test_keys_frames_and_metadata(dataset, videos, vae_dir):
    out, manifest = dataset
    segs = samples(out, manifest)
    assert [(s.key, s.meta["frames"], s.meta["start_frame"]) for s in segs] == [
        ("talk/0000", 37, 0), ("talk/0001", 37, 37), ("talk/0002", 26, 74),
        ("talk_2/0000", 37, 0), ("padded/0000", 30, 0),
    ]  # fmt: skip
    wide, other = segs[0].meta, segs[3].meta
    assert wide["source"] == str(videos["a/talk.mp4"]) and other["source"] == str(videos["b/talk.mp4"])
    assert wide["face_box"] == [8, 0, 72, 64] and other["face_box"] == [0, 0, 64, 64]
    assert {(s.meta["fps"], s.meta["sample_rate"], s.meta["vae"], s.meta["audio_encoder"]) for s in segs} == {
        (FPS, SR, "tiny-vae", "mel-80")
    }
    for s in segs:
        assert s.latents.shape == (s.meta["frames"], 4, SIZE // 4, SIZE // 4)
        assert s.audio.shape == (s.meta["frames"], 4, 80)
        wave, rate = media.decode_flac(s.waveform_flac)
        assert rate == SR and len(wave) == s.meta["frames"] * SPF


def test_manifest_matches_shards_and_nothing_is_left_half_written(dataset, vae_dir):
    out, manifest = dataset
    assert Manifest.load(out) == manifest
    assert [s["path"] for s in manifest.shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    for entry, path in zip(manifest.shards, manifest.shard_paths(out)):
        segs = list(iter_tar(path))
        assert entry["samples"] == len(segs) and entry["frames"] == sum(len(s.latents) for s in segs)
        assert entry["bytes"] == Path(path).stat().st_size
    assert (manifest.num_samples, manifest.num_frames) == (5, 37 + 37 + 26 + 37 + 30)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"] + [s["path"] for s in manifest.shards]
    assert manifest.vae == {**vae_info(load_vae(vae_dir), "tiny-vae"), "path": str(vae_dir.resolve())}
    assert manifest.audio_encoder == {"id": "mel-80", "name": "mel", "path": None, "K": 4, "D": 80, "sample_rate": SR}
    assert (manifest.fps, manifest.sample_rate, manifest.size) == (FPS, SR, SIZE)
    saved = json.loads((out / "manifest.json").read_text())
    assert saved["num_samples"] == 5 and len(saved["failed"]) == 6


def test_shard_contents_equal_direct_encoding(dataset, videos, vae_dir):
    out, manifest = dataset
    segs = {s.key: s for s in samples(out, manifest)}
    vae, mel = load_vae(vae_dir), MelEncoder()
    frames = media.read_video(videos["a/talk.mp4"], FPS, SIZE)  # [100, 32, 32, 3]
    audio = media.read_audio(videos["a/talk.mp4"])
    seg = segs["talk/0001"]
    np.testing.assert_array_equal(seg.latents, encode_frames(vae, frames[37:74]))
    wave = media.decode_flac(seg.waveform_flac)[0]
    np.testing.assert_allclose(wave, audio[37 * SPF : 74 * SPF], atol=1 / 32768 + 1e-7)  # 16-bit FLAC
    np.testing.assert_array_equal(seg.audio, mel.encode(wave, 37, FPS).astype(np.float16))
    np.testing.assert_allclose(seg.audio, mel.encode(audio[37 * SPF : 74 * SPF], 37, FPS), atol=0.02)

    # 0.9 s of audio under a 1.2 s video: the segment's waveform is zero-padded to 30 frames.
    padded = media.decode_flac(segs["padded/0000"].waveform_flac)[0]
    heard = len(media.read_audio(videos["c/padded.mp4"]))
    assert 0.85 * SR < heard < 0.95 * SR and len(padded) == 30 * SPF
    assert not padded[heard:].any() and np.abs(padded[: heard - 100]).max() > 0.1


def test_webdataset_reads_the_same_samples_as_tarfile(dataset):
    out, manifest = dataset
    loader = wds.WebDataset(manifest.shard_paths(out), shardshuffle=False)  # raw bytes, no decoding
    raw = list(loader)
    ref = samples(out, manifest)
    assert [r["__key__"] for r in raw] == [s.key for s in ref]
    for r, s in zip(raw, ref):
        latents = np.load(io.BytesIO(r["latents.npy"]), allow_pickle=False)
        audio = np.load(io.BytesIO(r["audio.npy"]), allow_pickle=False)
        assert latents.dtype == audio.dtype == np.float16
        np.testing.assert_array_equal(latents, s.latents)
        np.testing.assert_array_equal(audio, s.audio)
        assert r["audio.flac"] == s.waveform_flac and json.loads(r["json"]) == s.meta


def test_list_file_with_wav2vec2(tmp_path, videos, vae_dir, capsys):
    torch.manual_seed(0)
    w2v = tmp_path / "tiny-w2v2"
    Wav2Vec2Model(
        Wav2Vec2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            conv_dim=(16, 16, 16), conv_kernel=(10, 3, 2), conv_stride=(5, 4, 16),
            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        )
    ).save_pretrained(w2v)
    (tmp_path / "notes.txt").write_text("hello\n")
    good = videos["b/talk.mp4"]
    listing = tmp_path / "inputs.txt"
    listing.write_text(f"# training clips\n{good}\n\nnotes.txt\nmissing/clip.mp4\n{good}\n")
    out = tmp_path / "out"
    manifest = prepare(listing, out, vae_dir, audio_encoder="wav2vec2", audio_encoder_path=str(w2v),
                       size=SIZE, segment_seconds=1.0, progress=True)  # fmt: skip
    printed = capsys.readouterr()
    size = sum(s["bytes"] for s in manifest.shards)
    assert printed.out == f"prepare: 1 ok, 2 failed, 2 segments, 50 frames, 1 shards, {size} bytes\n"
    assert "skipped" in printed.err and "notes.txt: not a video file" in printed.err
    assert [(Path(f["path"]).name, f["reason"]) for f in manifest.failed] == [
        ("notes.txt", "not a video file (extension .txt)"), ("clip.mp4", "file not found"),
    ]  # fmt: skip
    assert manifest.audio_encoder == {"id": "tiny-w2v2", "name": "wav2vec2", "path": str(w2v), "K": 2, "D": 32,
                                      "sample_rate": SR}  # fmt: skip
    segs = list(iter_tar(manifest.shard_paths(out)[0]))
    assert [s.key for s in segs] == ["talk/0000", "talk/0001"]
    encoder = Wav2Vec2Encoder(w2v)
    for s in segs:
        wave = media.decode_flac(s.waveform_flac)[0]
        np.testing.assert_array_equal(s.audio, encoder.encode(wave, 25, FPS).astype(np.float16))


def test_bad_arguments_fail_before_writing(tmp_path, videos, vae_dir):
    out = tmp_path / "out"
    folder = videos["a/talk.mp4"].parent
    with pytest.raises(FileNotFoundError, match="no such folder or list file"):
        prepare(tmp_path / "nowhere", out, vae_dir, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no video files"):
        prepare(tmp_path / "empty", out, vae_dir, progress=False)
    with pytest.raises(VAEError, match="does not exist"):
        prepare(folder, out, tmp_path / "no-vae", progress=False)
    with pytest.raises(ValueError, match="not divisible by the VAE downsampling factor 4"):
        prepare(folder, out, vae_dir, size=30, progress=False)
    with pytest.raises(ValueError, match="choose one of mel, wav2vec2"):
        prepare(folder, out, vae_dir, audio_encoder="hubert", progress=False)
    with pytest.raises(ValueError, match="needs a path"):
        prepare(folder, out, vae_dir, audio_encoder="wav2vec2", progress=False)
    assert not out.exists()

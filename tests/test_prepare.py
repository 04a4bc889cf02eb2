"""`prepare` on real files: synthesized talking faces, a tiny saved VAE, and broken inputs."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from diffusers import AutoencoderKL
from transformers import Wav2Vec2Config, Wav2Vec2Model

from pipeline import media
from pipeline.locate import fingerprint
from pipeline.audio_encoders import MelEncoder, Wav2Vec2Encoder
import pipeline
from pipeline.cli import main
from pipeline.options import Encoders, Frames, Segments, Tasks
from pipeline.prepare import (
    InputItem, StageTimes, crop_box, list_inputs, merge, prepare, samples_per_frame, segment_bounds,
    slurm_task, summary, task_of, unique_ids,
)
from pipeline.progress import ProgressLines
from pipeline.shards import Manifest, index_dataset, index_shards, iter_tar, speaker_split
from pipeline.synth import draw_clip, synthesize
from pipeline.vae import VAEError, demo_vae_config, encode_frames, load_vae, vae_info
from production import wav2vec2

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
    wide = draw_clip(seed=0, seconds=4.0, size=64)
    frames = np.pad(wide.frames, ((0, 0), (0, 0), (8, 8), (0, 0)), mode="edge")  # [100, 64, 80, 3]
    media.write_video(root / "a" / "talk.mp4", frames, FPS, wide.audio)
    synth = synthesize(tmp_path_factory.mktemp("synth"), clips=1, seconds=2.0, size=64, seed=1)[0]
    (root / "b" / "talk.mp4").write_bytes(synth.read_bytes())
    short = draw_clip(seed=2, seconds=0.8, size=64)
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
    manifest = prepare(videos["a/talk.mp4"].parents[1], out, encoders=Encoders(vae=str(vae_dir), batch_size=8),
                       frames=Frames(fps=FPS, size=SIZE),
                       segments=Segments(segment_seconds=1.5, min_segment_seconds=1.0, samples_per_shard=2),
                       progress=False)
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
    assert sorted(p.name for p in out.iterdir()) == ["index.jsonl", "index.npz", "manifest.json"] + [
        s["path"] for s in manifest.shards]
    assert all(entry["sha256"] == hashlib.sha256(Path(path).read_bytes()).hexdigest()
               for entry, path in zip(manifest.shards, manifest.shard_paths(out)))
    assert index_dataset(out, manifest) == index_shards(manifest.shard_paths(out))  # the index, as walking finds
    with np.load(out / "index.npz", allow_pickle=False) as index:
        speakers, split = index["speakers"][index["speaker"]].tolist(), index["split"].tolist()
    by_id = {r["id"]: r for r in manifest.inputs}
    keys = [s.key for s in index_shards(manifest.shard_paths(out))]
    assert speakers == [by_id[k.split("/")[0]]["speaker"] for k in keys]
    assert split == [("train", "val").index(by_id[k.split("/")[0]]["split"]) for k in keys]
    assert manifest.vae == {**vae_info(load_vae(vae_dir), "tiny-vae"), "path": str(vae_dir.resolve()),
                            "sha1": fingerprint(vae_dir)}
    assert manifest.audio_encoder == {"id": "mel-80", "name": "mel", "path": None, "sha1": None, "layers": [-1],
                                      "K": 4, "D": 80, "sample_rate": SR}
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
    capsys.readouterr()  # what saving the model printed
    manifest = prepare(listing, out,
                       encoders=Encoders(vae=str(vae_dir), audio_encoder="wav2vec2", audio_encoder_path=str(w2v)),
                       frames=Frames(size=SIZE), segments=Segments(segment_seconds=1.0), progress=True)  # fmt: skip
    printed = capsys.readouterr()
    size = sum(s["bytes"] for s in manifest.shards)
    lines = printed.out.splitlines()
    assert lines[:3] == [
        "prepare: 1 ok, 2 failed (1 file not found, 1 not a video file)",
        f"prepare: 2 segments, 50 frames (0.0006 h), 1 shards, {size} bytes",
        "prepare: warning: the validation split is empty (1 speaker, all in train at --val-percent 10); give some "
        "speakers split=val in the list, or raise --val-percent",
    ]
    # the time per stage, summed over the inputs (--crop center: no detect or crop stage), then the whole run's
    assert [line.split()[1] for line in lines[3:-1]] == ["decode", "vae", "audio", "write"]
    for line in lines[3:-1]:
        assert re.fullmatch(r"prepare: \w+ +\d+\.\d s +50 frames +\d+\.\d frames/s", line), line
    assert re.fullmatch(r"prepare: \d+\.\d s in all \(loading the encoders included\)", lines[-1])
    assert "skipped" in printed.err and "notes.txt: not a video file" in printed.err
    # no terminal (a batch job's log): plain progress lines, no carriage-return bar
    progress = [line for line in printed.err.splitlines() if line.startswith("prepare: inputs ")]
    assert "\r" not in printed.err and len(progress) == 2
    assert re.fullmatch(r"prepare: inputs 1/3, 2 segments, \d+s elapsed, ETA \d+s", progress[0])
    assert re.fullmatch(r"prepare: inputs 3/3, 2 segments, \d+s elapsed, ETA 0s", progress[1])
    assert [(Path(f["path"]).name, f["reason"]) for f in manifest.failed] == [
        ("notes.txt", "not a video file (extension .txt)"), ("clip.mp4", "file not found"),
    ]  # fmt: skip
    assert manifest.audio_encoder == {"id": "tiny-w2v2", "name": "wav2vec2", "path": str(w2v), "sha1": fingerprint(w2v),
                                      "layers": [-1], "K": 2, "D": 32, "sample_rate": SR}  # fmt: skip
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
        prepare(tmp_path / "nowhere", out, encoders=Encoders(vae=str(vae_dir)), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no video files"):
        prepare(tmp_path / "empty", out, encoders=Encoders(vae=str(vae_dir)), progress=False)
    with pytest.raises(VAEError, match="does not exist"):
        prepare(folder, out, encoders=Encoders(vae=str(tmp_path / "no-vae")), progress=False)
    with pytest.raises(ValueError, match="not divisible by the VAE downsampling factor 4"):
        prepare(folder, out, encoders=Encoders(vae=str(vae_dir)), frames=Frames(size=30), progress=False)
    with pytest.raises(ValueError, match="choose one of mel, wav2vec2"):
        prepare(folder, out, encoders=Encoders(vae=str(vae_dir), audio_encoder="hubert"), progress=False)
    with pytest.raises(ValueError, match="needs a path"):
        prepare(folder, out, encoders=Encoders(vae=str(vae_dir), audio_encoder="wav2vec2"), progress=False)
    assert not out.exists()


# ---- corpus of real ffmpeg-encoded videos: mixed fps, audio rates, VFR, rotation, and every bad kind ----

REPO = Path(__file__).resolve().parents[1]


def encode(path: Path, video: str | None, audio: str | None, *extra: str) -> Path:
    """ffmpeg lavfi sources -> file: `video` a testsrc spec, `audio` a sine spec (None: no such stream)."""
    command = [media.ffmpeg_exe(), "-y", "-loglevel", "error"]
    if video:
        command += ["-f", "lavfi", "-i", f"testsrc=size=64x48:{video}"]
    if audio:
        command += ["-f", "lavfi", "-i", f"sine=frequency=300:{audio}"]
    if video:
        command += ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", "10"]
    if audio:
        command += ["-c:a", "aac"]
    subprocess.run(command + list(extra) + [str(path)], check=True)
    return path


# name -> expected constant-25-fps frame count (good inputs) with segment 1.0 s / min 0.5 s
GOOD = {"fps24.mp4": 50, "fps30.mkv": 50, "fps25.mov": 40, "vfr.mp4": 48, "rotated.mp4": 50}  # vfr: last frame 1.9 s + 1/30 s
BAD = {
    "silent.mp4": "no audio stream",
    "halfaudio.mp4": "audio much shorter than video (0.50 s vs 2.00 s)",
    "audio_only.mp4": "no video stream (audio only)",
    "truncated.mp4": "unreadable or corrupt video",
    "empty.mp4": "empty file (0 bytes)",
    "notes.mp4": "unreadable or corrupt video",
    "slides.pdf": "not a video file (extension .pdf)",
    "missing.mp4": "file not found",
}
SPEAKERS = {"fps24.mp4": "alice", "fps30.mkv": "alice", "fps25.mov": "bob", "vfr.mp4": "carol", "rotated.mp4": "dave"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A CSV list (relative paths, speakers, one forced split) over good and bad files."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "clips").mkdir()
    c = root / "clips"
    encode(c / "fps24.mp4", "rate=24:duration=2", "sample_rate=8000:duration=2")
    encode(c / "fps30.mkv", "rate=30:duration=2", "sample_rate=44100:duration=2", "-ac", "2")
    encode(c / "fps25.mov", "rate=25:duration=1.6", "sample_rate=48000:duration=1.6", "-ac", "2")
    encode(c / "vfr.mp4", "rate=30:duration=2", "sample_rate=16000:duration=2",
           "-vf", "select='lt(t\\,1)+not(mod(n\\,3))'", "-fps_mode", "vfr")  # 30 fps, then 10 fps
    encode(c / "plain.mp4", "rate=25:duration=2", "sample_rate=16000:duration=2")
    subprocess.run([media.ffmpeg_exe(), "-y", "-loglevel", "error", "-display_rotation", "90", "-i",
                    str(c / "plain.mp4"), "-c", "copy", str(c / "rotated.mp4")], check=True)
    (c / "plain.mp4").unlink()
    encode(c / "silent.mp4", "rate=25:duration=2", None)
    encode(c / "halfaudio.mp4", "rate=25:duration=2", "sample_rate=16000:duration=0.5")
    encode(c / "audio_only.mp4", None, "sample_rate=16000:duration=2")
    whole = encode(root / "whole.mp4", "rate=25:duration=2", "sample_rate=16000:duration=2", "-movflags", "+faststart")
    (c / "truncated.mp4").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    (c / "empty.mp4").write_bytes(b"")
    (c / "notes.mp4").write_text("meeting notes, not a video\n")
    (c / "slides.pdf").write_bytes(b"%PDF-1.4 not a video")
    rows = ["path,speaker,split"] + [f"clips/{n},{SPEAKERS.get(n, '')},{'val' if n == 'fps25.mov' else ''}"
                                      for n in list(GOOD) + list(BAD)]
    (root / "list.csv").write_text("\n".join(rows) + "\n")
    return root / "list.csv"


def corpus_args(vae: Path | str, samples_per_shard: int = 64, crop: str = "center", **encoders) -> dict:
    """`prepare`'s settings for the corpus: 1 s segments of SIZE px at FPS, half the speakers to val."""
    return dict(encoders=Encoders(vae=str(vae), batch_size=25, **encoders),
                frames=Frames(fps=FPS, size=SIZE, crop=crop),
                segments=Segments(segment_seconds=1.0, min_segment_seconds=0.5, samples_per_shard=samples_per_shard),
                val_percent=50.0)


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory, corpus, vae_dir) -> tuple[Path, Manifest]:
    out = tmp_path_factory.mktemp("corpus_out")
    return out, prepare(corpus, out, progress=False, **corpus_args(vae_dir, samples_per_shard=3))


def all_samples(out: Path, manifest: Manifest) -> dict[str, object]:
    return {seg.key: seg for path in manifest.shard_paths(out) for seg in iter_tar(path)}


def test_corpus_frame_and_audio_counts_per_segment(corpus_run):
    out, manifest = corpus_run
    segs = all_samples(out, manifest)
    expected = {}
    for name, frames in GOOD.items():
        for index, (start, end) in enumerate(segment_bounds(frames, FPS, 1.0, 0.5)):
            expected[f"{Path(name).stem}/{index:04d}"] = (start, end - start)
    assert {k: (s.meta["start_frame"], s.meta["frames"]) for k, s in segs.items()} == expected
    assert expected["fps25/0001"] == (25, 15)  # 1.6 s: a 0.6 s rest is kept (min 0.5 s)
    for key, seg in segs.items():
        wave, rate = media.decode_flac(seg.waveform_flac)
        assert rate == SR and len(wave) == seg.meta["frames"] * SPF == seg.meta["frames"] * 640
        assert seg.latents.shape[0] == seg.audio.shape[0] == seg.meta["frames"]
        assert np.abs(wave).max() > 0.1  # the sine is there, whatever the source rate or channel count
    assert segs["rotated/0000"].meta["face_box"] == crop_box(48, 64) == [0, 8, 48, 56]  # upright: 48 wide, 64 high


def test_corpus_bad_inputs_recorded_with_reasons(corpus_run):
    _, manifest = corpus_run
    reasons = {Path(f["path"]).name: f["reason"] for f in manifest.failed}
    assert set(reasons) == set(BAD)
    for name, reason in BAD.items():
        assert reasons[name].startswith(reason), (name, reasons[name])
    assert [Path(r["path"]).name for r in manifest.inputs] == list(GOOD)
    text = summary(manifest)
    assert text.startswith("prepare: 5 ok, 8 failed (1 audio much shorter than video, 1 empty file, 1 file not found, "
                           "1 no audio stream, 1 no video stream, 1 not a video file, 2 unreadable or corrupt video)\n")
    assert f"{sum(GOOD.values())} frames ({sum(GOOD.values()) / FPS / 3600:.4f} h)" in text


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file anyway")
def test_unreadable_file_is_recorded(tmp_path, corpus, vae_dir):
    locked = tmp_path / "locked.mp4"
    locked.write_bytes((corpus.parent / "clips" / "fps24.mp4").read_bytes())
    locked.chmod(0)
    manifest = prepare(tmp_path, tmp_path / "out", progress=False, **corpus_args(vae_dir))
    assert manifest.failed == [{"path": str(locked), "reason": "permission denied (file not readable)"}]


def test_corpus_speakers_and_splits(corpus_run, corpus):
    out, manifest = corpus_run
    segs = all_samples(out, manifest)
    for seg in segs.values():
        name = Path(seg.meta["source"]).name
        assert seg.meta["speaker"] == SPEAKERS[name]
        assert seg.meta["split"] == ("val" if name == "fps25.mov" else speaker_split(SPEAKERS[name], 50.0))
    splits = json.loads((out / "manifest.json").read_text())["splits"]
    assert splits == manifest.splits()
    assert "bob" in splits["val"]["speakers"]
    train, val = set(splits.get("train", {}).get("speakers", [])), set(splits["val"]["speakers"])
    assert not train & val and train | val == set(SPEAKERS.values())
    assert sum(s["samples"] for s in splits.values()) == manifest.num_samples


def test_second_run_writes_nothing(corpus_run, corpus, vae_dir):
    out, manifest = corpus_run
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = prepare(corpus, out, progress=False, **corpus_args(vae_dir, samples_per_shard=3))
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert again == manifest and again.complete


def test_changed_settings_redo_a_single_run_and_stop_a_task(tmp_path, corpus, vae_dir, capsys):
    listing = tmp_path / "one.txt"
    listing.write_text(str(corpus.parent / "clips" / "fps24.mp4") + "\n")
    out, retrained = tmp_path / "out", tmp_path / "tiny-vae"
    shutil.copytree(vae_dir, retrained)
    first = prepare(listing, out, progress=False, **corpus_args(retrained, samples_per_shard=1))
    torch.manual_seed(1)
    AutoencoderKL(**demo_vae_config(block_out_channels=(8, 16, 16))).save_pretrained(retrained)  # same path, new weights
    second = prepare(listing, out, progress=True, **corpus_args(retrained, samples_per_shard=2))
    assert "settings changed (vae.sha1: " in capsys.readouterr().err
    assert [s["path"] for s in first.shards] == ["shard-000000.tar", "shard-000001.tar"]
    assert [s["path"] for s in second.shards] == ["shard-000000.tar"]
    assert sorted(p.name for p in out.iterdir()) == ["index.jsonl", "index.npz", "manifest.json",
                                                     "shard-000000.tar"]  # the stale shard is gone
    segs = all_samples(out, second)
    frames = media.read_video(corpus.parent / "clips" / "fps24.mp4", FPS, SIZE)
    np.testing.assert_array_equal(segs["fps24/0000"].latents, encode_frames(load_vae(retrained), frames[:25], batch_size=25))
    Manifest(**{**vars(second), "settings": {**second.settings, "num_tasks": 2}, "task": 0}).save(out, "task-0000.json")
    with pytest.raises(ValueError, match=r"task-0000.json: an earlier run here used different settings \(vae.path: "
                                         r".*; vae.sha1: \w+ vs \w+\)"):
        prepare(listing, out, tasks=Tasks(num_tasks=2, task_index=0), progress=False, **corpus_args(vae_dir))


def test_tasks_partition_inputs_and_merge_equals_single_run(tmp_path, corpus_run, corpus, vae_dir):
    paths = [Path(f"/data/vox/id{i // 20:05d}/{i % 20:05d}.mp4") for i in range(1600)]  # numbered, like real corpora
    for num_tasks in (1, 2, 3, 7, 16):
        counts = np.bincount([task_of(p, num_tasks) for p in paths], minlength=num_tasks)
        assert len(counts) == num_tasks and counts.sum() == len(paths)  # each input in exactly one task
        assert counts.min() > 0.75 * len(paths) / num_tasks  # and the tasks are about even
    single_out, single = corpus_run
    out = tmp_path / "tasks"
    tasks = [prepare(corpus, out, tasks=Tasks(task_index=i, num_tasks=2), progress=False,
                     **corpus_args(vae_dir, samples_per_shard=2)) for i in range(2)]  # fmt: skip
    assert sorted(p.name for p in out.glob("*.json")) == ["task-0000.json", "task-0001.json"]
    handled = [r["path"] for t in tasks for r in t.inputs] + [f["path"] for t in tasks for f in t.failed]
    assert sorted(handled) == sorted(str(i.path) for i in list_inputs(corpus))  # each input in exactly one task
    assert all(s["path"].startswith(f"task-000{t.task}-shard-") for t in tasks for s in t.shards)
    merged = merge(out)
    assert Manifest.load(out) == merged and merged.complete and merged.task is None
    ours, reference = all_samples(out, merged), all_samples(single_out, single)
    assert sorted(ours) == sorted(reference)
    for key, seg in reference.items():
        np.testing.assert_array_equal(ours[key].latents, seg.latents)
        np.testing.assert_array_equal(ours[key].audio, seg.audio)
        assert ours[key].meta == seg.meta
    assert sorted(map(str, merged.failed)) == sorted(map(str, single.failed))
    assert merged.splits() == single.splits()
    merged_index = [(Path(s.shard).name.split("-shard-")[0], s.key, s.frames) for s in index_dataset(out, merged)]
    assert [(k, f) for _, k, f in merged_index] == [(s.key, s.frames) for s in index_shards(merged.shard_paths(out))]
    assert sorted(k for _, k, _ in merged_index) == sorted(reference)  # both tasks' logs, compiled by merge


def test_merge_refuses_missing_unfinished_or_mismatched_tasks(tmp_path):
    def task(index: int, **changes) -> None:
        base = dict(vae={"latent_channels": 4, "downsample": 4, "scaling_factor": 1.0}, audio_encoder={"K": 4, "D": 80},
                    size=32, settings={"num_tasks": 3}, task=index)  # fmt: skip
        Manifest(**{**base, **changes}).save(tmp_path, f"task-{index:04d}.json")

    with pytest.raises(FileNotFoundError, match="no task manifests"):
        merge(tmp_path)
    task(0), task(2)
    with pytest.raises(ValueError, match=r"missing for task\(s\) \[1\] of 3"):
        merge(tmp_path)
    task(1, complete=False)
    with pytest.raises(ValueError, match="still running or killed.*task-0001.json"):
        merge(tmp_path)
    task(1, size=64)
    with pytest.raises(ValueError, match="task-0001.json: settings differ.*size: 64 vs 32"):
        merge(tmp_path)
    task(1)
    assert merge(tmp_path).complete and (tmp_path / "manifest.json").exists()


def test_interrupted_run_resumes_without_losing_or_repeating_segments(tmp_path, monkeypatch, corpus_run, corpus, vae_dir):
    """In process: the run dies while encoding its 5th segment (input 3 is half in a finished shard)."""
    import pipeline.prepare as prep

    encode_segment, calls = prep._segment, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return encode_segment(*args, **kwargs)

    monkeypatch.setattr(prep, "_segment", dying)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus, out, progress=False, **corpus_args(vae_dir, samples_per_shard=3))
    interrupted = Manifest.load(out)
    assert not interrupted.complete and [s["samples"] for s in interrupted.shards] == [3]
    assert [Path(r["path"]).name for r in interrupted.inputs] == ["fps24.mp4"]
    assert list(interrupted.partial.values()) == [[0]]  # fps30's first segment is in the finished shard
    assert sorted(p.name for p in out.iterdir()) == ["index.jsonl", "manifest.json", "manifest.log.jsonl",
                                                     "shard-000000.tar"]  # no .tmp left
    monkeypatch.setattr(prep, "_segment", encode_segment)
    resumed = prepare(corpus, out, progress=False, **corpus_args(vae_dir, samples_per_shard=3))
    assert resumed.complete and not resumed.partial and resumed.shards[0] == interrupted.shards[0]
    ours, reference = all_samples(out, resumed), all_samples(*corpus_run)
    assert sorted(ours) == sorted(reference)
    assert len(ours) == resumed.num_samples
    for key, seg in reference.items():
        np.testing.assert_array_equal(ours[key].latents, seg.latents)
    assert sorted(r["path"] for r in resumed.inputs) == sorted(r["path"] for r in corpus_run[1].inputs)


@pytest.mark.slow
def test_killed_task_resumes_to_the_uninterrupted_result(tmp_path, corpus_run, corpus, vae_dir):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "pipeline.cli", "prepare", str(corpus), "--out", str(out), "--vae", str(vae_dir),
               "--size", str(SIZE), "--segment-seconds", "1.0", "--min-segment-seconds", "0.5", "--batch-size", "25",
               "--val-percent", "50", "--samples-per-shard", "1"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "shard-000001.tar").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    interrupted = Manifest.load(out)
    assert not interrupted.complete and 1 <= len(interrupted.shards) < 9
    finished = {s["path"] for s in interrupted.shards}
    assert {p.name for p in out.glob("*.tar")} >= finished
    (out / "shard-000777.tar.tmp").write_bytes(b"half a shard")  # what a kill mid-shard leaves
    resumed = prepare(corpus, out, progress=False, **corpus_args(vae_dir, samples_per_shard=1))
    assert resumed.complete and not list(out.glob("*.tmp"))
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(s["path"] for s in resumed.shards)
    assert resumed.shards[: len(interrupted.shards)] == interrupted.shards  # numbering continues after them
    ours, reference = all_samples(out, resumed), all_samples(*corpus_run)
    assert sorted(ours) == sorted(reference) and len(ours) == resumed.num_samples  # no segment lost or repeated
    for key, seg in reference.items():
        np.testing.assert_array_equal(ours[key].latents, seg.latents)
        np.testing.assert_array_equal(ours[key].audio, seg.audio)


def test_cli_exit_codes_and_merge(tmp_path, corpus, vae_dir, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("clips/empty.mp4\n")
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "empty.mp4").write_bytes(b"")
    common = ["--vae", str(vae_dir), "--size", str(SIZE)]
    assert main(["prepare", str(bad), "--out", str(tmp_path / "o1"), *common]) == 1  # nothing could be prepared
    assert main(["prepare", str(bad), "--out", str(tmp_path / "o2"), *common, "--num-tasks", "4", "--task-index", "9"]) == 1
    assert "task index 9 is outside 0..3" in capsys.readouterr().err
    assert main(["prepare", "--out", str(tmp_path / "o3")]) == 1
    assert "needs INPUTS, --out and --vae (or --merge DIR)" in capsys.readouterr().err
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"path": str(corpus.parent / "clips" / "fps24.mp4"), "speaker": 7}) + "\n"
                    + json.dumps({"path": "clips/empty.mp4"}) + "\n")
    args = ["prepare", str(good), "--out", str(tmp_path / "o4"), *common, "--num-tasks", "1"]
    assert main(args) == 0 and main(args + ["--strict"]) == 1
    assert main(["prepare", "--merge", str(tmp_path / "o4")]) == 1
    assert "no task manifests" in capsys.readouterr().err
    assert Manifest.load(tmp_path / "o4").inputs[0]["speaker"] == "7"


def test_fps_must_divide_the_sample_rate(tmp_path, vae_dir, corpus):
    assert samples_per_frame(16000, 25) == 640 and samples_per_frame(16000, 20.0) == 800
    with pytest.raises(ValueError, match="fps 30 does not divide the audio sample rate 16000"):
        samples_per_frame(16000, 30)
    with pytest.raises(ValueError, match="fps 24.0 does not divide"):
        prepare(corpus, tmp_path / "out", encoders=Encoders(vae=str(vae_dir)), frames=Frames(fps=24.0), progress=False)
    assert not (tmp_path / "out").exists()


def test_slurm_task_from_environment():
    assert slurm_task({}) == (0, 1)
    assert slurm_task({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "16"}) == (3, 16)
    assert slurm_task({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "2"}) == (3, 4)


def test_list_files_csv_jsonl_and_their_errors(tmp_path):
    (tmp_path / "sub").mkdir()
    csv_list = tmp_path / "sub" / "list.csv"
    csv_list.write_text("path,speaker,split\nclips/a.mp4,s1,val\n/abs/b.mp4,,\n\nclips/a.mp4,s9,train\n")
    assert list_inputs(csv_list) == [
        InputItem(tmp_path / "sub" / "clips" / "a.mp4", "s1", "val"), InputItem(Path("/abs/b.mp4"), None, None),
    ]  # fmt: skip
    jsonl = tmp_path / "list.jsonl"
    jsonl.write_text('{"path": "x.mp4", "speaker": "p1"}\n\n{"path": "y.mp4", "split": "train"}\n'
                     '{"path": "z.mp4", "speaker": "p1", "split": "val"}\n')
    assert list_inputs(jsonl) == [  # p1's split given on line 4 holds for x.mp4 too: no speaker in two splits
        InputItem(tmp_path / "x.mp4", "p1", "val"), InputItem(tmp_path / "y.mp4", None, "train"),
        InputItem(tmp_path / "z.mp4", "p1", "val"),
    ]  # fmt: skip
    cases = {
        "nopath.csv": ("file,speaker\na.mp4,s\n", r"nopath.csv:1: CSV header needs a 'path' column"),
        "split.csv": ("path,split\na.mp4,train\nb.mp4,test\n", r"split.csv:3: split must be train or val, got 'test'"),
        "extra.csv": ("path,speaker\na.mp4,s,oops\n", r"extra.csv:2: more fields than the header's 2"),
        "empty.csv": ("path,speaker\n,s1\n", r"empty.csv:2: empty path"),
        "both.csv": ("path,speaker,split\na.mp4,s1,train\nb.mp4,s2,val\nc.mp4,s1,val\n",
                     r"both.csv:4: speaker 's1' put in val, but in train at line 2"),
        "bad.jsonl": ('{"path": "a.mp4"}\n{"path": \n', r"bad.jsonl:2: not valid JSON"),
        "nopath.jsonl": ('{"path": "a.mp4"}\n\n["b.mp4"]\n', r'nopath.jsonl:3: each line must be an object with a "path"'),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            list_inputs(tmp_path / name)


def test_face_crop_cuts_faceless_frames_and_keeps_alignment(tmp_path, monkeypatch, corpus, vae_dir, capsys):
    """`--crop face` through a local fake of pipeline.faces: one face except frames 10..19."""

    class FaceDetector:
        def __init__(self, device: str = "cpu", min_prob: float = 0.9):
            self.seen = 0

        def detect(self, frames: np.ndarray, stride: int = 1) -> list[np.ndarray]:
            assert stride == 1
            out = []
            for _ in frames:
                face = not 10 <= self.seen < 20
                out.append(np.array([[8, 4, 40, 36, 0.99]]) if face else np.zeros((0, 5)))
                self.seen += 1
            return out

    def face_tracks(detections, width, height, fps, margin=0.25, min_seconds=1.0, dominance=2.0):
        has = [len(d) == 1 for d in detections] + [False]
        tracks, cuts, start = [], [], None
        for i, ok in enumerate(has):
            if ok and start is None:
                start = i
            elif not ok and start is not None:
                tracks.append(types.SimpleNamespace(start=start, end=i, boxes=np.tile([8, 4, 40, 36], (i - start, 1))))
                start = None
        cuts = [(10, 20, "no face")]
        return tracks, cuts

    def crop_track(frames, track, size):
        return frames[track.start : track.end, 4:36, 8:40][:, :: 32 // size, :: 32 // size]

    class NoFaceError(ValueError):
        pass

    from pipeline.faces import FaceTrack

    fake = types.SimpleNamespace(FaceDetector=FaceDetector, face_tracks=face_tracks, crop_track=crop_track,
                                 NoFaceError=NoFaceError, FaceTrack=FaceTrack)  # fmt: skip
    monkeypatch.setitem(sys.modules, "pipeline.faces", fake)
    monkeypatch.setattr(pipeline, "faces", fake, raising=False)
    monkeypatch.setattr(sys.modules["pipeline.prepare"], "_DETECT_BATCH", 16)  # tracks cross decode chunks
    listing = tmp_path / "one.txt"
    listing.write_text(str(corpus.parent / "clips" / "fps24.mp4") + "\n")
    out = tmp_path / "out"
    manifest = prepare(listing, out, progress=True, **corpus_args(vae_dir, crop="face"))
    stages = {line.split()[1]: line.split() for line in capsys.readouterr().out.splitlines() if " frames/s" in line}
    assert list(stages) == ["decode", "detect", "crop", "vae", "audio", "write"]
    assert [stages[s][4] for s in stages] == ["100", "50", "50", "25", "25", "25"]  # decode: both passes of 50
    segs = all_samples(out, manifest)
    # frames 0..9 (0.4 s, under min 0.5 s) dropped; track 20..49 -> segments of 25 + 5 (5 dropped)
    assert [(k, s.meta["start_frame"], s.meta["frames"]) for k, s in segs.items()] == [("fps24/0000", 20, 25)]
    assert manifest.inputs[0]["cut"] == [[10, 20, "no face"]]
    seg = segs["fps24/0000"]
    assert seg.meta["crop"] == "face" and seg.meta["face_boxes"] == [[8, 4, 40, 36]] * 25
    audio = media.read_audio(corpus.parent / "clips" / "fps24.mp4")
    wave = media.decode_flac(seg.waveform_flac)[0]
    np.testing.assert_allclose(wave, audio[20 * SPF : 45 * SPF], atol=1 / 32768 + 1e-7)
    frames = media.read_video(corpus.parent / "clips" / "fps24.mp4", FPS)[20:45, 4:36, 8:40]
    np.testing.assert_array_equal(seg.latents, encode_frames(load_vae(vae_dir), frames, batch_size=25))


# ---- paths that survive a change of folder, datasets of earlier versions, array tasks that agree ----

def small_corpus(root: Path, corpus: Path, vae_dir: Path) -> Path:
    """`root` laid out as a user's corpus folder: videos/, a CSV of relative paths (one missing file), the VAE
    and a wav2vec2 folder; returns the list."""
    (root / "videos").mkdir(parents=True)
    for name in ("fps24.mp4", "fps25.mov"):
        shutil.copy(corpus.parent / "clips" / name, root / "videos" / name)
    shutil.copytree(vae_dir, root / "sd-vae")
    wav2vec2(root / "wav2vec2")
    (root / "corpus.csv").write_text("path,speaker\nvideos/fps24.mp4,alice\nvideos/fps25.mov,bob\nvideos/gone.mp4,eve\n")
    return root / "corpus.csv"


RELATIVE = ["--vae", "sd-vae", "--audio-encoder", "wav2vec2", "--audio-encoder-path", "wav2vec2", "--size", str(SIZE),
            "--segment-seconds", "1.0", "--min-segment-seconds", "0.5", "--batch-size", "25"]


def test_paths_are_recorded_absolute_and_the_dataset_reads_from_any_folder(tmp_path, monkeypatch, corpus, vae_dir):
    """`prepare corpus.csv --vae sd-vae --audio-encoder-path wav2vec2` run in the corpus folder: every recorded
    path is absolute, so the sources and encoders are found from another folder; the encoders are recorded by
    name, path and content hash; a rerun from elsewhere with the list's absolute path does nothing."""
    root = tmp_path / "corpus"
    small_corpus(root, corpus, vae_dir)
    monkeypatch.chdir(root)
    assert main(["prepare", "corpus.csv", "--out", "shards", *RELATIVE]) == 0
    elsewhere = tmp_path / "project"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    manifest = Manifest.load(root / "shards")
    videos = root / "videos"
    assert [r["path"] for r in manifest.inputs] == [str(videos / "fps24.mp4"), str(videos / "fps25.mov")]
    assert manifest.failed == [{"path": str(videos / "gone.mp4"), "reason": "file not found"}]
    segments = all_samples(root / "shards", manifest)
    assert {s.meta["source"] for s in segments.values()} == {str(videos / "fps24.mp4"), str(videos / "fps25.mov")}
    assert all(Path(s.meta["source"]).is_file() for s in segments.values())
    assert manifest.vae["id"] == "sd-vae" and manifest.vae["path"] == str(root / "sd-vae")
    assert manifest.vae["sha1"] == fingerprint(root / "sd-vae") and "vae_sha1" not in manifest.settings
    assert {k: manifest.audio_encoder[k] for k in ("name", "id", "path", "sha1")} == {
        "name": "wav2vec2", "id": "wav2vec2", "path": str(root / "wav2vec2"), "sha1": fingerprint(root / "wav2vec2")}
    Wav2Vec2Encoder(manifest.audio_encoder["path"])  # loads from here: the recorded path is not relative to the corpus
    before = {p.name: p.stat().st_mtime_ns for p in (root / "shards").iterdir()}
    again = prepare(root / "corpus.csv", root / "shards", progress=False,
                    **corpus_args(root / "sd-vae", audio_encoder="wav2vec2", audio_encoder_path=str(root / "wav2vec2"))
                    | {"val_percent": 10.0})
    assert again == manifest and {p.name: p.stat().st_mtime_ns for p in (root / "shards").iterdir()} == before


def as_earlier_version(out: Path, name: str = "manifest.json") -> None:
    """Rewrite a manifest as versions before absolute paths wrote it: input paths relative to the working folder
    (as given), the audio encoder's path as given, the VAE's hash in `settings.vae_sha1`, no audio hash, no
    `settings.task_key`."""
    manifest = Manifest.load(out / name)
    relative = lambda path: os.path.relpath(path) if path else path  # noqa: E731
    manifest.inputs = [{**r, "path": relative(r["path"])} for r in manifest.inputs]
    manifest.failed = [{**f, "path": relative(f["path"])} for f in manifest.failed]
    manifest.audio_encoder = {k: v for k, v in manifest.audio_encoder.items() if k != "sha1"}
    manifest.audio_encoder["path"] = relative(manifest.audio_encoder["path"])
    manifest.settings = {k: v for k, v in manifest.settings.items() if k != "task_key"}
    manifest.settings["vae_sha1"] = manifest.vae.pop("sha1")
    manifest.save(out, name)


def test_a_dataset_of_an_earlier_version_is_continued_not_redone(tmp_path, monkeypatch, corpus, vae_dir):
    """A dataset an earlier version made in the corpus folder (relative paths, its encoder records) is resumed with
    more inputs: what it holds is neither redone nor repeated, and its records become absolute."""
    root = tmp_path / "corpus"
    listing = small_corpus(root, corpus, vae_dir)
    monkeypatch.chdir(root)
    (root / "first.csv").write_text("path,speaker\nvideos/fps24.mp4,alice\nvideos/gone.mp4,eve\n")
    assert main(["prepare", "first.csv", "--out", "shards", *RELATIVE]) == 0
    as_earlier_version(root / "shards")
    earlier = Manifest.load(root / "shards")
    assert earlier.inputs[0]["path"] == "videos/fps24.mp4" and earlier.audio_encoder["path"] == "wav2vec2"
    shard = root / "shards" / "shard-000000.tar"
    stamp = (shard.stat().st_mtime_ns, shard.read_bytes())
    # the list named by its absolute path now: its entries are matched to the records by their relative tails
    assert main(["prepare", str(listing), "--out", "shards", *RELATIVE]) == 0
    resumed = Manifest.load(root / "shards")
    assert (shard.stat().st_mtime_ns, shard.read_bytes()) == stamp
    assert [s["path"] for s in resumed.shards] == ["shard-000000.tar", "shard-000001.tar"]
    assert [s.key for s in iter_tar(root / "shards" / "shard-000001.tar")] == ["fps25/0000", "fps25/0001"]
    keys = [s.key for s in index_dataset(root / "shards", resumed)]
    assert keys == ["fps24/0000", "fps24/0001", "fps25/0000", "fps25/0001"]  # nothing twice
    assert [r["path"] for r in resumed.inputs] == [str(root / "videos" / n) for n in ("fps24.mp4", "fps25.mov")]
    assert resumed.failed == [{"path": str(root / "videos" / "gone.mp4"), "reason": "file not found"}]
    assert resumed.vae["sha1"] == fingerprint(root / "sd-vae") and "vae_sha1" not in resumed.settings
    assert resumed.audio_encoder["path"] == str(root / "wav2vec2")
    assert resumed.audio_encoder["sha1"] == fingerprint(root / "wav2vec2")
    assert "task_key" not in resumed.settings  # its tasks (had it any) stay split as the earlier version split them


def handled(manifest: Manifest) -> set[str]:
    return {r["path"] for r in manifest.inputs} | {f["path"] for f in manifest.failed}


def test_array_tasks_agree_on_owners_whatever_folder_they_run_in(tmp_path, monkeypatch, corpus_run, corpus, vae_dir):
    """Task 0 run in the corpus folder with `list.csv`, task 1 elsewhere with the list's absolute path: each input
    is owned by exactly one task (sha1 of its absolute path), and the merge equals a single run."""
    items = list_inputs(corpus)
    listed_as = {str(i.path): str(Path(i.path).relative_to(corpus.parent)) for i in items}  # "clips/<name>"
    assert any(task_of(listed_as[str(i.path)], 2) != task_of(i.path, 2) for i in items)  # the spellings split apart
    out = tmp_path / "out"
    monkeypatch.chdir(corpus.parent)
    first = prepare("list.csv", out, tasks=Tasks(task_index=0, num_tasks=2), progress=False,
                    **corpus_args(vae_dir, samples_per_shard=2))
    monkeypatch.chdir(tmp_path)
    second = prepare(corpus, out, tasks=Tasks(task_index=1, num_tasks=2), progress=False,
                     **corpus_args(vae_dir, samples_per_shard=2))
    for task, manifest in enumerate((first, second)):
        assert handled(manifest) == {str(i.path) for i in items if task_of(str(i.path), 2) == task}
        assert manifest.settings["task_key"] == "absolute path"
    merged = merge(out)
    assert sorted(all_samples(out, merged)) == sorted(all_samples(*corpus_run))


def test_an_array_job_begun_by_an_earlier_version_keeps_its_split(tmp_path, monkeypatch, corpus_run, corpus, vae_dir):
    """Task 0's manifest was written by an earlier version (which hashed the path as listed); task 1, run now for the
    first time, and task 0, resumed, split the inputs as it did, so the merge holds each input once."""
    out = tmp_path / "out"
    out.mkdir()
    Manifest(  # what an earlier version wrote at the start of task 0 of `prepare list.csv` in the corpus folder
        vae={**vae_info(load_vae(vae_dir), "tiny-vae"), "path": str(vae_dir.resolve())},
        audio_encoder={"id": "mel-80", "name": "mel", "path": None, "layers": [-1], "K": 4, "D": 80, "sample_rate": SR},
        fps=FPS, sample_rate=SR, size=SIZE, task=0, complete=False,
        settings={"segment_seconds": 1.0, "min_segment_seconds": 0.5, "crop": "center", "val_percent": 50.0,
                  "num_tasks": 2, "vae_sha1": fingerprint(vae_dir)},
    ).save(out, "task-0000.json")  # fmt: skip
    monkeypatch.chdir(corpus.parent)
    items = list_inputs("list.csv")
    assert {i.listed for i in items} == {f"clips/{i.path.name}" for i in items}
    assert any(task_of(i.listed, 2) != task_of(i.path, 2) for i in items)  # the two keys split apart
    tasks = {t: prepare("list.csv", out, tasks=Tasks(task_index=t, num_tasks=2), progress=False,
                        **corpus_args(vae_dir, samples_per_shard=2)) for t in (1, 0)}  # fmt: skip
    for task, manifest in tasks.items():
        assert handled(manifest) == {str(i.path) for i in items if task_of(i.listed, 2) == task}
        assert "task_key" not in manifest.settings and manifest.vae["sha1"] == fingerprint(vae_dir)
    merged = merge(out)
    assert sorted(all_samples(out, merged)) == sorted(all_samples(*corpus_run))
    assert sorted(handled(merged)) == sorted(str(i.path) for i in items)


# ---- what a batch job's log shows ----

def test_progress_lines_come_at_a_bounded_rate():
    """An input every 1.5 s for 1000 inputs: a line after the first, then one per 60 s at most, and one at the end
    (prepare's `ProgressLines`)."""
    now, stream = [100.0], io.StringIO()
    lines = ProgressLines(1000, "prepare: inputs", stream=stream, clock=lambda: now[0], interval=60.0)
    printed = []
    for done in range(1, 1001):
        now[0] += 1.5
        printed.append((done, now[0], lines.update(1, f", {2 * done} segments")))
    shown = [(done, at, line) for done, at, line in printed if line]
    assert [line for _, _, line in shown] == stream.getvalue().splitlines()
    assert [done for done, _, _ in shown] == [*range(1, 1000, 40), 1000]
    assert all(b - a >= 60 for (_, a, _), (_, b, _) in zip(shown, shown[1:-1]))
    assert shown[0][2] == "prepare: inputs 1/1000, 2 segments, 2s elapsed, ETA 24m58s"
    assert shown[1][2] == "prepare: inputs 41/1000, 82 segments, 1m02s elapsed, ETA 23m58s"
    assert shown[-1][2] == "prepare: inputs 1000/1000, 2000 segments, 25m00s elapsed, ETA 0s"


def test_stage_times_count_each_stage_on_its_own_clock():
    ticks = iter(range(100))
    times = StageTimes(clock=lambda: float(next(ticks)))  # every reading one second after the last
    for chunk in times.chunks("decode", [np.zeros((4, 2)), np.zeros((6, 2))]):  # decode: 2 chunks and the end, 3 s
        start = times.clock()
        times.add("detect", start, len(chunk))  # the time spent on a chunk is not decode's
    start = times.clock()
    times.add("write", start, 0)  # no frames: not listed
    assert times.lines() == [
        "prepare: decode        3.0 s         10 frames        3.3 frames/s",
        "prepare: detect        2.0 s         10 frames        5.0 frames/s",
    ]


def test_an_earlier_versions_relative_records_are_found_from_another_folder(tmp_path, monkeypatch, corpus, vae_dir):
    """Resumed from another folder, an earlier version's relative records (relative to the folder it ran in) are
    matched to the inputs whose paths end with them: nothing is redone."""
    root = tmp_path / "corpus"
    listing = small_corpus(root, corpus, vae_dir)
    monkeypatch.chdir(root)
    first = prepare("corpus.csv", "shards", progress=False, **corpus_args("sd-vae"))
    as_earlier_version(root / "shards")
    monkeypatch.chdir(tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in (root / "shards").glob("*.tar")}
    resumed = prepare(listing, root / "shards", progress=False, **corpus_args(root / "sd-vae"))
    assert {p.name: p.stat().st_mtime_ns for p in (root / "shards").glob("*.tar")} == before
    assert resumed.inputs == first.inputs and resumed.failed == first.failed and resumed.shards == first.shards


def test_the_summary_warns_when_every_speaker_went_to_one_split():
    def record(speaker: str, split: str) -> dict:
        return {"path": f"/v/{speaker}.mp4", "id": speaker, "speaker": speaker, "split": split, "segments": 1,
                "frames": 25}

    all_val = Manifest(inputs=[record("a", "val"), record("b", "val")], settings={"val_percent": 90.0})
    assert ("prepare: warning: the training split is empty (2 speakers, all in val at --val-percent 90); give some "
            "speakers split=train in the list, or lower --val-percent") in summary(all_val).splitlines()
    assert "warning" not in summary(Manifest(**{**vars(all_val), "task": 0}))  # one task: `merge` judges the whole
    assert "warning" not in summary(Manifest(inputs=[record("a", "val"), record("b", "train")]))
    assert "warning" not in summary(Manifest())  # nothing prepared: nothing to split


@pytest.mark.slow  # ~45 s on 2 CPU cores: three job starts, each importing torch and diffusers
def test_the_sbatch_array_job_logs_readably_and_merges(slurm, tmp_path, corpus_run, corpus, vae_dir):
    """slurm/prepare.sbatch as a 2-task array on a real (single-node, CPU) SLURM, then the merge job: each task's log
    has plain progress lines and the summary with the stage times (no carriage-return bar), the merge job's log the
    whole dataset's summary, and the dataset equals a single run's."""
    out, listing = tmp_path / "shards", tmp_path / "list.txt"
    names = ["fps24.mp4", "fps25.mov", "vfr.mp4", "slides.pdf"]
    listing.write_text("".join(f"{corpus.parent / 'clips' / name}\n" for name in names))
    env = {"PATH": f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO),
           "INPUTS": str(listing), "OUT": str(out), "VAE": str(vae_dir), "DEVICE": "cpu"}
    export = "--export=ALL," + ",".join(f"{k}={v}" for k, v in env.items())
    args = ["--size", str(SIZE), "--segment-seconds", "1.0", "--min-segment-seconds", "0.5", "--batch-size", "25",
            "--val-percent", "50", "--samples-per-shard", "2"]
    array = slurm.sbatch([export, "--array=0-1", "--gpus-per-task=0", "--cpus-per-task=1",
                          f"--output={tmp_path}/task-%a.out", str(REPO / "slurm" / "prepare.sbatch"), *args],
                         cwd=tmp_path)
    merge_job = slurm.sbatch([export, f"--dependency=afterany:{array}", f"--output={tmp_path}/merge.out",
                              "--wrap", f"letstalk prepare --merge {out}"], cwd=tmp_path)
    try:
        info = slurm.wait(merge_job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 300)
    finally:
        slurm.cancel_all()
    logs = {name: (tmp_path / f"{name}.out").read_text() for name in ("task-0", "task-1", "merge")}
    assert info["JobState"] == "COMPLETED", f"{info}\n{logs}\n{slurm.log_tail()}"
    for name in ("task-0", "task-1"):
        log = logs[name]
        assert "\r" not in log, log
        assert re.search(r"^prepare: \d+ ok, \d+ failed", log, re.M), log
        if "prepare: 0 ok" not in log:  # a task that had good inputs
            assert re.search(r"^prepare: 1/\d+ inputs, \d+ segments, \d+s elapsed, ETA ", log, re.M), log
            assert re.search(r"^prepare: decode +\d+\.\d s +\d+ frames +\d+\.\d frames/s$", log, re.M), log
            assert re.search(r"^prepare: \d+\.\d s in all", log, re.M), log
    assert logs["merge"].startswith("prepare: 3 ok, 1 failed (1 not a video file)\n"), logs["merge"]
    merged = Manifest.load(out)
    reference = {key for key, s in all_samples(*corpus_run).items() if Path(s.meta["source"]).name in names}
    assert set(all_samples(out, merged)) == reference and len(reference) == merged.num_samples == 6

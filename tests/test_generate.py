"""Generation and the demo: the fast demo run end to end, then `letstalk generate` on its checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from pipeline import media
from pipeline.cli import main
from pipeline.cli.demo import run_demo
from pipeline.generate import CheckpointError, generate, load_generator


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`letstalk demo --fast`: every stage runs for real, briefly."""
    return run_demo(tmp_path_factory.mktemp("demo"), fast=True)


def test_demo_runs_every_stage_and_reports(demo: dict):
    out = Path(demo["checkpoint"]).parents[2]
    assert list(demo["stage_seconds"]) == ["synth", "fit-vae", "prepare", "fit", "generate+sync"]
    assert json.loads((out / "demo.json").read_text())["videos"] == demo["videos"]
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["num_samples"] == 4 and manifest["failed"] == []
    assert np.isfinite(demo["final_loss"]) and -1 <= demo["sync_true_audio"] <= 1
    assert list((Path(demo["logs"]) / "logs").glob("version_*/metrics.csv"))
    assert list((Path(demo["logs"]) / "wandb").glob("offline-run-*"))
    for video in demo["videos"]:
        streams = media.media_streams(video)
        assert (streams["video_codec"], streams["audio_codec"]) == ("h264", "aac")
        assert streams["num_frames"] == 50 and streams["audio_duration_s"] == pytest.approx(2.0, abs=0.05)


def _wav(path: Path, seconds: float, rate: int = 22050, channels: int = 2) -> Path:
    """Speech-like stereo audio at a rate the model was not trained on (it must be resampled)."""
    t = np.arange(int(seconds * rate)) / rate
    tone = np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))
    sf.write(path, np.stack([tone] * channels, axis=1).astype(np.float32), rate)
    return path


@pytest.mark.parametrize("seconds", [0.2, 1.3])  # shorter than one 8-frame clip; several chained clips
def test_generated_video_matches_the_audio(demo: dict, tmp_path: Path, seconds: float):
    portrait = Path(demo["videos"][0])
    out = tmp_path / "out.mp4"
    summary = generate(demo["checkpoint"], portrait, _wav(tmp_path / "a.wav", seconds), out, steps=3)
    streams = media.media_streams(out)
    frames = int(seconds * 25)
    assert summary["frames"] == streams["num_frames"] == frames
    assert streams["video_streams"] == 1 and streams["audio_streams"] == 1
    assert streams["audio_duration_s"] == pytest.approx(frames / 25, abs=0.03)
    assert (streams["width"], streams["height"]) == (64, 64)
    assert summary["real_time_factor"] > 0


def test_same_seed_same_video_other_seed_differs(demo: dict, tmp_path: Path):
    audio = _wav(tmp_path / "a.wav", 0.4)
    paths = [tmp_path / f"{name}.mp4" for name in ("a", "b", "c")]
    for path, seed in zip(paths, (3, 3, 4)):
        generate(demo["checkpoint"], demo["videos"][0], audio, path, steps=2, seed=seed)
    a, b, c = (media.read_video(p).astype(int) for p in paths)
    assert np.array_equal(a, b)
    assert np.abs(a - c).mean() > 0.5


def test_ema_and_live_weights_both_load_and_differ(demo: dict):
    ema, live = load_generator(demo["checkpoint"], ema=True), load_generator(demo["checkpoint"], ema=False)
    diffs = [float((p - q).abs().max()) for p, q in zip(ema.net.parameters(), live.net.parameters())]
    assert max(diffs) > 0
    assert ema.data_info["clip_frames"] == 8 and ema.data_info["audio_encoder"]["name"] == "mel"


def test_bad_checkpoints_are_refused_with_the_file_named(tmp_path: Path):
    missing = tmp_path / "missing.ckpt"
    with pytest.raises(CheckpointError, match="missing.ckpt: checkpoint not found"):
        load_generator(missing)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.ckpt: not a readable checkpoint"):
        load_generator(garbage)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="no LetsTalk model config"):
        load_generator(foreign)


def test_cli_generate_writes_the_video_and_fails_cleanly(demo: dict, tmp_path: Path, capsys):
    audio = _wav(tmp_path / "a.wav", 0.4, rate=16000, channels=1)
    out = tmp_path / "cli.mp4"
    args = ["generate", "--checkpoint", demo["checkpoint"], "--portrait", demo["videos"][1], "--audio", str(audio)]
    assert main([*args, "--out", str(out), "--steps", "2"]) == 0
    assert media.media_streams(out)["num_frames"] == 10
    not_audio = tmp_path / "notes.txt"
    not_audio.write_text("hello")
    bad = tmp_path / "bad.mp4"
    assert main(["generate", "--checkpoint", demo["checkpoint"], "--portrait", demo["videos"][1],
                 "--audio", str(not_audio), "--out", str(bad)]) != 0
    assert "notes.txt" in capsys.readouterr().err
    assert not bad.exists()


@pytest.mark.slow
def test_full_demo_learns_audio_driven_mouth_motion(tmp_path: Path):
    """The real demo (~9 min on 2 cores): lip sync with the true audio well above the mismatched control."""
    result = run_demo(tmp_path / "demo")
    assert result["sync_true_audio"] >= 0.5
    assert abs(result["sync_mismatched_audio"]) < 0.25
    assert result["total_seconds"] < 15 * 60

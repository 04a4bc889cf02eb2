"""Generation and the demo: the fast demo run end to end, then `letstalk generate` on its checkpoint."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from pipeline import media, provenance
from pipeline.cli import main
from pipeline.cli.demo import run_demo, score_clip
from pipeline.generate import (CheckpointError, GenerationError, frame_count, generate, load_network,
                                load_model, step_progress)
from pipeline.options import Framing, Provenance, Sampling
from pipeline.progress import ProgressLines

CENTER = Framing(crop="center")  # the demo's portraits are framed like its training data


def test_demo_runs_every_stage_and_reports(demo: dict):
    out = Path(demo["checkpoint"]).parents[2]
    assert list(demo["stage_seconds"]) == ["synth", "fit-vae", "prepare", "fit", "generate+score"]
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
    for i, clip in enumerate(demo["clips"]):  # the pictures, and the appearance scores with their references
        sheet = media.read_image(out / f"contact_sheet_{i}.png")
        assert sheet.shape == (3 * 64 + 2 * 2, 5 * 64 + 4 * 2, 3)  # portrait | real | generated, frames 0, 10, .. 40
        real = media.read_video(out / "heldout" / f"clip_{i:04d}.mp4")
        np.testing.assert_array_equal(sheet[66:130, 66:130], real[10])
        side = media.media_streams(out / f"side_by_side_{i}.mp4")
        assert (side["width"], side["num_frames"], side["audio_streams"]) == (3 * 64 + 2 * 2, 50, 1)
        assert 10 < clip["static"]["frame"]["psnr"] < 60 and 0 < clip["ceiling"]["mouth"]["ssim"] < 1
    assert set(demo["targets"]) == set(demo["still_targets"]) == {"outside_mouth", "frame", "mouth", "drift"}
    first = demo["clips"][0]
    assert demo["targets"]["frame"][0] == pytest.approx(first["generated"]["frame"]["psnr"]
                                                        - first["static"]["frame"]["psnr"])
    assert demo["still_targets"]["mouth"][0] == pytest.approx(first["still"]["mouth"]["psnr"]
                                                              - first["static"]["mouth"]["psnr"] - 2.0)


def test_the_still_head_is_refused_for_a_clip_synth_did_not_draw(tmp_path: Path):
    from pipeline.synth import synthesize

    clip = synthesize(tmp_path, clips=1, seconds=1.0, seed=3)[0]
    truth = json.loads(clip.with_suffix(".json").read_text())
    clip.with_suffix(".json").write_text(json.dumps({**truth, "seed": 4}))  # ground truth of another face
    with pytest.raises(ValueError, match=r"clip_0000.mp4: its first frame is not the face synth draws for seed 4"):
        score_clip(clip, clip, clip, None, clip_frames=8, fps=25.0)


def _wav(path: Path, seconds: float, rate: int = 22050, channels: int = 2) -> Path:
    """Speech-like stereo audio at a rate the model was not trained on (it must be resampled)."""
    t = np.arange(int(seconds * rate)) / rate
    tone = np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))
    sf.write(path, np.stack([tone] * channels, axis=1).astype(np.float32), rate)
    return path


@pytest.mark.parametrize("seconds,frames", [(0.2, 5), (1.3, 33)])  # under one 8-frame clip; chained clips, 32.5 -> 33
def test_generated_video_matches_the_audio(demo: dict, tmp_path: Path, seconds: float, frames: int):
    portrait = Path(demo["videos"][0])
    out = tmp_path / "out.mp4"
    summary = generate(demo["checkpoint"], portrait, _wav(tmp_path / "a.wav", seconds), out, sampling=Sampling(steps=3),
                       framing=CENTER)
    streams = media.media_streams(out)
    assert summary["frames"] == streams["num_frames"] == frames
    assert streams["video_streams"] == 1 and streams["audio_streams"] == 1
    assert streams["audio_duration_s"] == pytest.approx(frames / 25, abs=0.03)
    assert (streams["width"], streams["height"]) == (64, 64)
    assert summary["real_time_factor"] > 0


def test_same_seed_same_video_other_seed_differs(demo: dict, tmp_path: Path):
    audio = _wav(tmp_path / "a.wav", 0.4)
    paths = [tmp_path / f"{name}.mp4" for name in ("a", "b", "c")]
    for path, seed in zip(paths, (3, 3, 4)):
        generate(demo["checkpoint"], demo["videos"][0], audio, path, sampling=Sampling(steps=2, seed=seed),
                 framing=CENTER)
    a, b, c = (media.read_video(p).astype(int) for p in paths)
    assert np.array_equal(a, b)
    assert np.abs(a - c).mean() > 0.5


def test_ema_and_live_weights_both_load_and_differ(demo: dict):
    ema, live = load_network(demo["checkpoint"], ema=True), load_network(demo["checkpoint"], ema=False)
    diffs = [float((p - q).abs().max()) for p, q in zip(ema.net.parameters(), live.net.parameters())]
    assert max(diffs) > 0
    assert ema.data_info["clip_frames"] == 8 and ema.data_info["audio_encoder"]["name"] == "mel"


def test_bad_checkpoints_are_refused_with_the_file_named(tmp_path: Path):
    missing = tmp_path / "missing.ckpt"
    with pytest.raises(CheckpointError, match="missing.ckpt: checkpoint not found"):
        load_network(missing)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.ckpt: not a readable checkpoint"):
        load_network(garbage)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="no LetsTalk model config"):
        load_network(foreign)


def test_cli_generate_writes_the_video_and_fails_cleanly(demo: dict, tmp_path: Path, capsys):
    audio = _wav(tmp_path / "a.wav", 0.4, rate=16000, channels=1)
    out = tmp_path / "cli.mp4"
    args = ["generate", "--checkpoint", demo["checkpoint"], "--portrait", demo["videos"][1], "--audio", str(audio),
            "--crop", "center"]  # the cartoon faces are no faces to a real face detector
    assert main([*args, "--out", str(out), "--steps", "2"]) == 0
    assert media.media_streams(out)["num_frames"] == 10
    not_audio = tmp_path / "notes.txt"
    not_audio.write_text("hello")
    bad = tmp_path / "bad.mp4"
    assert main([*args[:5], "--audio", str(not_audio), "--out", str(bad), "--crop", "center"]) != 0
    assert "notes.txt" in capsys.readouterr().err
    assert not bad.exists()


CLIP_S = 8 / 25  # the fast demo model's clip: 8 frames at 25 fps
FAST = Sampling(steps=1, audio_scale=1.0, ref_scale=1.0)  # one network call per clip: content does not matter here


def _audio(path: Path, kind: str, seconds: float) -> Path:
    """Speech-like audio of `seconds` as wav, flac, mp3 or m4a, or as the audio track of an mp4 (48 kHz stereo)."""
    wav = _wav(path.with_suffix(".src.wav"), seconds, rate=48000)
    if kind in ("wav", "flac"):
        data, rate = sf.read(wav)
        sf.write(path.with_suffix(f".{kind}"), data, rate)
        return path.with_suffix(f".{kind}")
    if kind == "video":
        out = path.with_suffix(".mp4")
        media.write_video(out, np.full((int(seconds * 25), 32, 32, 3), 90, np.uint8), 25,
                          audio=media.read_audio(wav), sample_rate=16000)
        return out
    out = path.with_suffix(f".{kind}")
    codec = ["-c:a", "libmp3lame"] if kind == "mp3" else ["-c:a", "aac"]
    subprocess.run([media.ffmpeg_exe(), "-y", "-loglevel", "error", "-i", str(wav), *codec, str(out)], check=True)
    return out


def _pixel_format(path: Path) -> str:
    header = subprocess.run([media.ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True)
    return re.search(r"Video: h264[^,]*, (\w+)", header.stderr).group(1)


FORMATS = [("wav", 1.0), ("flac", 2.5), ("mp3", 4.0), ("m4a", 2.5), ("video", 4.0)]


@pytest.mark.parametrize("kind,clips", FORMATS)
def test_any_audio_format_and_length_gives_an_exact_marked_video(demo: dict, tmp_path: Path, kind: str, clips: float):
    audio = _audio(tmp_path / "speech", kind, clips * CLIP_S)
    out = tmp_path / "out.mp4"
    summary = generate(demo["checkpoint"], demo["videos"][0], audio, out, sampling=replace(FAST, seed=11),
                       framing=CENTER)
    decoded = len(media.read_audio(audio))
    frames = frame_count(decoded, 25.0)
    assert abs(frames - round(clips * 8)) <= 1  # codec padding may add up to a frame's worth of samples
    streams = media.media_streams(out)
    assert (streams["video_codec"], streams["audio_codec"], _pixel_format(out)) == ("h264", "aac", "yuv420p")
    assert summary["frames"] == streams["num_frames"] == frames
    assert streams["audio_duration_s"] == pytest.approx(frames / 25, abs=0.025)
    assert streams["duration_s"] == pytest.approx(frames / 25, abs=0.05)
    data = out.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")  # faststart: playable while downloading
    sha = hashlib.sha256(Path(demo["checkpoint"]).read_bytes()).hexdigest()
    check = provenance.verify(out)
    assert check["watermark"]["found"] and check["watermark"]["payload"] == provenance.payload_id(sha, 11)
    assert check["metadata"]["checkpoint_sha256"] == summary["checkpoint_sha256"] == sha
    assert check["metadata"]["ai_generated"] == "true" and check["metadata"]["seed"] == "11"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["wav", "flac", "mp3", "m4a", "video"])
@pytest.mark.parametrize("clips", [1.0, 2.5, 4.0])
def test_every_format_at_every_length(demo: dict, tmp_path: Path, kind: str, clips: float):
    audio = _audio(tmp_path / "speech", kind, clips * CLIP_S)
    summary = generate(demo["checkpoint"], demo["videos"][0], audio, tmp_path / "out.mp4",
                       framing=CENTER, sampling=FAST)
    assert summary["frames"] == media.media_streams(tmp_path / "out.mp4")["num_frames"]
    assert summary["frames"] == frame_count(len(media.read_audio(audio)), 25.0)


def test_frame_count_rounds_to_the_nearest_frame():
    assert [frame_count(n, 25.0) for n in (639, 640, 959, 960, 961)] == [1, 1, 1, 2, 2]  # 640 samples = 1 frame
    assert frame_count(0, 25.0) == 0 and frame_count(319, 25.0) == 0 and frame_count(320, 25.0) == 1


def test_progress_reports_every_denoising_step(demo: dict, tmp_path: Path, capsys):
    calls: list[tuple[float, str]] = []
    generate(demo["checkpoint"], demo["videos"][0], _wav(tmp_path / "a.wav", 2.5 * CLIP_S), tmp_path / "o.mp4",
             sampling=Sampling(steps=2, audio_scale=1.0, ref_scale=1.0), framing=CENTER,
             progress=lambda fraction, text: calls.append((fraction, text)))
    fractions = [fraction for fraction, _ in calls]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    steps = [message for _, message in calls if message.startswith("denoising")]  # chained clips: one at a time
    assert len(steps) == 3 * 2 and steps[-1].endswith("step 6 of 6 (3 clips x 2 steps)")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("generating o.mp4: steps")]
    assert len(lines) == 6 and lines[-1].startswith("generating o.mp4: steps 6/6 (3 clips x 2 steps), ")  # no tty


class Clock:
    """A clock a test moves by hand."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_come_every_tenth_or_every_30_seconds():
    """Without a terminal (`step_progress`): a line at the first step, then per 10 % of the steps or per 30 s,
    whichever comes first, and one at the end."""
    for seconds_per_step, shown in ((1.0, [1, *range(11, 100, 10), 100]), (10.0, [*range(1, 100, 3), 100])):
        clock, out = Clock(), io.StringIO()
        progress = step_progress(100, "generating x.mp4", " (25 clips x 4 steps)", stream=out, clock=clock)
        for _ in range(100):
            clock.now += seconds_per_step
            progress.update(1)
        lines = out.getvalue().splitlines()
        assert [int(line.split()[3].split("/")[0]) for line in lines] == shown
    assert lines[1] == "generating x.mp4: steps 4/100 (25 clips x 4 steps), 40s elapsed, ETA 16m00s"
    assert lines[-1] == "generating x.mp4: steps 100/100 (25 clips x 4 steps), 16m40s elapsed, ETA 0s"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_and_a_log_gets_lines():
    bar = step_progress(8, "generating x.mp4", stream=Terminal())
    assert not isinstance(bar, ProgressLines)
    bar.close()
    assert isinstance(step_progress(8, "generating x.mp4", stream=io.StringIO()), ProgressLines)


def test_the_video_carries_the_users_audio_as_given(demo: dict, tmp_path: Path):
    """44.1 kHz stereo in, 44.1 kHz stereo AAC out, the same samples over the video's length (channels not mixed);
    the model still hears 16 kHz mono."""
    rate = 44100
    t = np.arange(int(1.1 * rate)) / rate
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    source = np.stack([0.5 * np.sin(2 * np.pi * 180 * t) * envelope, 0.3 * np.sin(2 * np.pi * 330 * t)], axis=1)
    sf.write(tmp_path / "stereo.wav", source.astype(np.float32), rate)
    out = tmp_path / "out.mp4"
    summary = generate(demo["checkpoint"], demo["videos"][0], tmp_path / "stereo.wav", out,
                       framing=CENTER, sampling=FAST)
    streams = media.media_streams(out)
    assert (streams["audio_codec"], streams["audio_sample_rate"], streams["audio_channels"]) == ("aac", rate, 2)
    sound, sound_rate = media.read_audio_native(out)
    length = round(summary["frames"] / 25 * rate)  # the video's length: 1.1 s -> 28 frames = 1.12 s, padded
    assert sound_rate == rate and abs(len(sound) - length) <= rate // 1000
    for channel in range(2):
        assert np.corrcoef(sound[: len(t), channel], source[:, channel])[0, 1] > 0.99
    assert np.abs(sound[len(t) + rate // 200 :]).max() < 0.01  # the padding is silence
    assert np.corrcoef(sound[: len(t), 0], source[:, 1])[0, 1] < 0.1  # left is left


def test_no_provenance_warns_and_leaves_no_marks(demo: dict, tmp_path: Path, capsys):
    out = tmp_path / "plain.mp4"
    generate(demo["checkpoint"], demo["videos"][0], _wav(tmp_path / "a.wav", 0.6), out, framing=CENTER,
             marks=Provenance(marks=False), sampling=FAST)
    assert "carries no provenance marks" in capsys.readouterr().out
    check = provenance.verify(out)
    assert not check["watermark"]["found"] and "ai_generated" not in check["metadata"]
    assert main(["verify", str(out)]) == 1


def test_cli_signs_c2pa_and_records_consent(demo: dict, tmp_path: Path, capsys):
    from test_provenance import write_signing_files

    pki = write_signing_files(tmp_path)
    audio = str(_wav(tmp_path / "a.wav", 0.5))

    def run(out: Path, chain: Path) -> int:
        return main(["generate", "--checkpoint", demo["checkpoint"], "--portrait", demo["videos"][1], "--audio", audio,
                     "--out", str(out), "--crop", "center", "--steps", "1", "--seed", "4", "--consent",
                     "release-2024-17", "--c2pa-cert", str(chain), "--c2pa-key", str(pki["key"])])

    out = tmp_path / "signed.mp4"
    assert run(out, pki["chain"]) == 0
    assert main(["verify", str(out), "--trust-anchors", str(pki["root"])]) == 0
    printed = capsys.readouterr().out
    assert "watermark FOUND" in printed and "portrait_consent: release-2024-17" in printed
    assert "C2PA: Trusted, signed by LetsTalk test signer, AI-generated: yes" in printed
    assert not list(tmp_path.glob(".signed*"))  # the unsigned intermediate is gone
    bad = tmp_path / "bad.mp4"
    assert run(bad, pki["self"]) == 1
    assert "C2PA signing failed" in capsys.readouterr().err
    assert not bad.exists() and not list(tmp_path.glob(".bad*"))


def test_batch_keeps_going_past_a_bad_row_and_reports_it(demo: dict, tmp_path: Path, capsys):
    _wav(tmp_path / "a.wav", 0.4)
    sf.write(tmp_path / "silent.wav", np.zeros(16000, np.float32), 16000)
    rows = [{"portrait": demo["videos"][0], "audio": "a.wav", "out": "out/one.mp4", "seed": "1"},
            {"portrait": demo["videos"][0], "audio": "silent.wav", "out": "out/two.mp4", "seed": ""},
            {"portrait": demo["videos"][1], "audio": "missing.wav", "out": "out/three.mp4", "seed": ""},
            {"portrait": demo["videos"][1], "audio": "a.wav", "out": "out/four.mp4", "seed": "2"}]
    with open(tmp_path / "rows.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["portrait", "audio", "out", "seed"])
        writer.writeheader()
        writer.writerows(rows)
    assert main(["generate", "--checkpoint", demo["checkpoint"], "--batch", str(tmp_path / "rows.csv"),
                 "--steps", "1", "--crop", "center"]) == 1
    printed = capsys.readouterr().out
    assert "2 of 4 rows ok" in printed and "line 3 failed" in printed and "line 4 failed" in printed
    report = json.loads((tmp_path / "rows.report.json").read_text())
    assert [r["status"] for r in report["results"]] == ["ok", "failed", "failed", "ok"]
    assert "audio is silent" in report["results"][1]["reason"]
    assert "missing.wav: file not found" in report["results"][2]["reason"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["four.mp4", "one.mp4"]
    payloads = [provenance.verify(tmp_path / "out" / name)["watermark"]["payload"] for name in ("one.mp4", "four.mp4")]
    assert payloads[0] != payloads[1]  # the payload depends on the row's seed


def _tiny_vae(path: Path, latent_channels: int) -> Path:
    from diffusers import AutoencoderKL

    from pipeline.vae import demo_vae_config

    AutoencoderKL(**demo_vae_config(latent_channels=latent_channels)).save_pretrained(path)
    return path


def test_bad_inputs_fail_with_a_clear_message_and_no_output(demo: dict, tmp_path: Path, capsys):
    good = _wav(tmp_path / "good.wav", 0.4)
    sf.write(tmp_path / "silent.wav", np.full(8000, 1e-5, np.float32), 16000)
    short = _wav(tmp_path / "short.wav", 0.1)
    corrupt = tmp_path / "corrupt.m4a"
    corrupt.write_bytes(_audio(tmp_path / "c", "m4a", 0.5).read_bytes()[:600])
    cases = [
        ({"--audio": tmp_path / "silent.wav"}, "audio is silent"),
        ({"--audio": short}, "audio is too short (0.100 s)"),
        ({"--audio": corrupt}, "corrupt.m4a: unreadable or corrupt"),
        ({"--size": "128"}, "--size 128 does not match the model, which makes 64x64 videos"),
        ({"--vae": _tiny_vae(tmp_path / "vae8", 8)}, "the VAE has 8 latent channels but"),
        ({"--c2pa-cert": good}, "needs both a certificate chain"),
        ({"--portrait": tmp_path / "nothing.png"}, "nothing.png: file not found"),
    ]
    for number, (change, message) in enumerate(cases):
        out = tmp_path / f"out{number}.mp4"
        options = {"--checkpoint": demo["checkpoint"], "--portrait": demo["videos"][0], "--audio": good,
                   "--out": out, "--steps": "1", "--crop": "center", **change}
        assert main(["generate", *(str(x) for item in options.items() for x in item)]) == 1, message
        assert message in capsys.readouterr().err
        assert not out.exists() and not list(tmp_path.glob(f".out{number}*"))


def test_without_steps_the_flow_model_samples_euler_at_its_measured_default(demo: dict, tmp_path: Path):
    """No steps given: Euler at 4 steps (benchmarks/generate_speed.py: lip sync and PSNR as at 6 and 25 steps),
    reported in the summary; a given count still wins."""
    calls: list[str] = []
    wav = _wav(tmp_path / "a.wav", CLIP_S)
    summary = generate(demo["checkpoint"], demo["videos"][0], wav, tmp_path / "o.mp4",
                       sampling=Sampling(audio_scale=1.0, ref_scale=1.0), framing=CENTER,
                       progress=lambda fraction, text: calls.append(text))
    assert (summary["sampler"], summary["steps"]) == ("euler", 4)
    assert sum(text.startswith("denoising") for text in calls) == 4  # one clip, one network call per step
    assert generate(demo["checkpoint"], demo["videos"][0], wav, tmp_path / "p.mp4",
                    sampling=Sampling(steps=2, audio_scale=1.0, ref_scale=1.0),
                    framing=CENTER)["steps"] == 2


def test_out_of_memory_becomes_advice(demo: dict, tmp_path: Path, monkeypatch):
    import pipeline.generate as generation

    def exhausted(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(generation, "sample_latents", exhausted)
    out = tmp_path / "oom.mp4"
    with pytest.raises(GenerationError, match="out of GPU memory .* try --clips-per-batch 1"):
        generate(demo["checkpoint"], demo["videos"][0], _wav(tmp_path / "a.wav", 0.4), out,
                 framing=CENTER, sampling=FAST)
    assert not out.exists()


def test_portrait_crop_modes(demo: dict, tmp_path: Path):
    from PIL import Image

    from pipeline.generate import read_portrait

    wide = np.zeros((40, 80, 3), np.uint8)
    wide[:, :40] = 255  # left half white
    Image.fromarray(wide).save(tmp_path / "wide.png")
    center, whole = read_portrait(tmp_path / "wide.png", 64, "center"), read_portrait(tmp_path / "wide.png", 64, "none")
    assert center.shape == whole.shape == (1, 64, 64, 3)
    assert center[0, :, 5].mean() == 255 and center[0, :, -5].mean() == 0  # the middle 40x40, halves kept
    assert whole[0, :, :28].mean() == 255 and whole[0, :, 36:].mean() == 0  # squeezed, nothing cut
    with pytest.raises(GenerationError, match="crop must be one of"):
        read_portrait(tmp_path / "wide.png", 64, "top")
    model = load_model(demo["checkpoint"])
    assert model.checkpoint_sha256 == hashlib.sha256(Path(demo["checkpoint"]).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def full_demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The real demo (~10 min on 2 cores), once for the slow tests below."""
    return run_demo(tmp_path_factory.mktemp("full") / "demo")


@pytest.mark.slow
def test_full_demo_learns_audio_driven_mouth_motion(full_demo: dict):
    """Lip sync with the true audio well above the mismatched control, within the demo's 15 minutes."""
    assert full_demo["sync_true_audio"] >= 0.9
    assert abs(full_demo["sync_mismatched_audio"]) <= 0.15
    assert full_demo["total_seconds"] < 15 * 60


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 13: the appearance targets are not reached, and the still head shows "
                   "that outside-mouth, whole-frame and drift are out of reach of any portrait+audio model on "
                   "this data (benchmarks/fidelity.md)")
def test_full_demo_keeps_the_portrait(full_demo: dict):
    """Issue 13's targets, clip by clip: outside the mouth within 1 dB of the VAE ceiling, the whole frame at or
    above the static portrait, the mouth 2 dB above it, the last chained clip within 0.5 dB of the first."""
    missed = {name: margins for name, margins in full_demo["targets"].items() if min(margins) < 0}
    assert not missed, f"targets missed (margin in dB per clip): {missed}"

"""The production path walked as a user walks it, on production-shaped inputs at tiny sizes.

Four 640x480, 30 fps H.264 videos of a real face that pans and zooms, with 44.1 kHz stereo AAC speech (three
speakers in train, one in val); a tiny random VAE in the SD-VAE layout and a tiny random wav2vec2, saved in their
libraries' formats. Then, as the User guide says:

    prepare --crop face (from the corpus folder, relative paths) -> check -> fit on configs/base.yaml + tiny + ZeRO-2
    (2 CPU ranks, EvalCallback on) -> resume -> export -> move the run and the encoders elsewhere -> generate and
    evaluate from there.

What is asserted is what a user sees: every stage exits 0 and says so in a readable log; training's first step
comes before any evaluation work; the evaluation's ground truth is the training crop; the recorded config is the
network that ran; the artifacts work after the move, and a missing encoder is named with where its path came from.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import media
from pipeline.cli import main
from pipeline.evaluate import SOURCE_VIDEO
from pipeline.shards import Manifest, iter_tar
from pipeline.shipped import CONFIGS
from pipeline.vae import encode_frames, load_vae
from procs import run_job
from production import sd_vae, talking_video, wav2vec2

pytest.importorskip("deepspeed")
pytest.importorskip("facenet_pytorch")

REPO = Path(__file__).resolve().parents[1]
SPEAKERS = {"rec0": ("ana", "train"), "rec1": ("ben", "train"), "rec2": ("cleo", "train"), "rec3": ("dev", "val")}


def _fit(cwd: Path, *flags: str) -> str:
    """`letstalk fit` of the documented production recipe at tiny sizes on 2 CPU ranks; its stderr, as a job log."""
    argv = [sys.executable, "-m", "pipeline.cli", "fit", "--config", str(CONFIGS / "base.yaml"),
            "--config", str(CONFIGS / "model" / "tiny.yaml"), "--config", str(CONFIGS / "trainer" / "zero2.yaml"),
            "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--data.root", "corpus/shards",
            "--data.clip_frames", "4", "--data.batch_size", "2", "--data.num_workers", "1",
            "--trainer.default_root_dir", "run", *flags]
    done = run_job(argv, timeout=420, cwd=cwd, env={**os.environ, "WANDB_MODE": "offline"})
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stderr


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out + out.err


def test_the_user_guide_on_production_shaped_inputs(tmp_path: Path, monkeypatch, capsys):
    corpus = tmp_path / "corpus"
    for i, (name, (speaker, split)) in enumerate(SPEAKERS.items()):
        talking_video(corpus / "videos" / f"{name}.mp4", seconds=1.6, seed=i)
    (corpus / "corpus.csv").write_text("path,speaker,split\n" + "".join(
        f"videos/{name}.mp4,{speaker},{split}\n" for name, (speaker, split) in SPEAKERS.items()))
    sd_vae(corpus / "sd-vae")
    wav2vec2(corpus / "wav2vec2")

    # prepare, in the corpus folder with relative paths, as docs/data.md's example reads
    monkeypatch.chdir(corpus)
    code, log = _cli(["prepare", "corpus.csv", "--out", "shards", "--vae", "sd-vae", "--size", "64", "--crop", "face",
                      "--detect-every", "3", "--audio-encoder", "wav2vec2", "--audio-encoder-path", "wav2vec2",
                      "--segment-seconds", "0.8", "--min-segment-seconds", "0.4"], capsys)
    assert code == 0 and "prepare: 4 ok, 0 failed" in log and "warning" not in log, log
    manifest = Manifest.load(corpus / "shards")
    assert manifest.vae["path"] == str(corpus / "sd-vae") and manifest.audio_encoder["path"] == str(corpus / "wav2vec2")
    assert manifest.vae["sha1"] and manifest.audio_encoder["sha1"]
    code, log = _cli(["check", "shards", "--no-progress"], capsys)
    assert code == 0 and "warning" not in log, log

    # fit from another folder: the production recipe, EvalCallback on, then a resume
    monkeypatch.chdir(tmp_path)
    log = _fit(tmp_path, "--trainer.max_steps", "2")
    assert log.index("letstalk fit: step 1/2") < log.index("EvalCallback: loading the ground truth"), log[-3000:]
    assert log.count("letstalk fit: step 2/2, ") == 1 and "\r" not in log
    log = _fit(tmp_path, "--trainer.max_steps", "4", "--ckpt_path", "last")
    assert log.count("letstalk fit: resuming from") == 1 and "letstalk fit: step 4/4, " in log, log[-3000:]
    assert "ground truth ready" in log and "0 built" in log  # the evaluation clips came from the run's cache
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_dir()  # a ZeRO-2 checkpoint folder

    # the recorded config is the network that ran
    from pipeline.checkpoints import read_weights

    ran, _ = read_weights(last)
    assert ran["net"]["motion_frames"] == 2 and ran["net"]["latent_channels"] == 4 and ran["net"]["patch_size"] == 2
    for config in run.glob("lightning_logs/version_*/config.yaml"):
        assert yaml.safe_load(config.read_text())["model"]["net"] == ran["net"], config

    # the evaluation's ground truth is the crop training encoded: the VAE gives back the stored latents
    vae = load_vae(corpus / "sd-vae")
    segments = {s.key: s for shard in manifest.shard_paths(corpus / "shards") for s in iter_tar(shard)}
    cached = sorted((run / "eval_cache").glob("*.npz"))
    assert cached
    for path in cached:
        with np.load(path, allow_pickle=False) as clip:
            assert str(clip["reference"]) == SOURCE_VIDEO
            stored = segments[str(clip["key"])].latents.astype(np.float32)
            np.testing.assert_allclose(encode_frames(vae, clip["real"]), stored, rtol=2**-10, atol=1e-4)

    # export (the EMA weights by default), then move the run, the export and the encoders to another folder
    code, log = _cli(["export", str(last), "--out", str(run / "export" / "model.safetensors")], capsys)
    assert code == 0 and "ema weights" in log, log
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for folder in (run, corpus / "sd-vae", corpus / "wav2vec2"):
        shutil.move(folder, moved / folder.name)
    monkeypatch.chdir(moved)
    model = moved / "run" / "export" / "model.safetensors"
    video = corpus / "videos" / "rec3.mp4"  # a held-out speaker: portrait from its first frame, audio from its track
    generate = ["generate", "--checkpoint", str(model), "--portrait", str(video), "--audio", str(video),
                "--out", "rec3.mp4", "--steps", "2"]
    code, log = _cli(generate, capsys)
    assert code == 1 and str(corpus / "sd-vae") in log and "--vae" in log and str(model.with_suffix(".json")) in log, log
    overrides = ["--vae", "sd-vae", "--audio-encoder-path", "wav2vec2"]
    code, log = _cli([*generate, *overrides], capsys)
    assert code == 0, log
    streams = media.media_streams(moved / "rec3.mp4")
    assert (streams["audio_sample_rate"], streams["audio_channels"]) == (44100, 2)  # the user's audio, as given
    code, log = _cli(["evaluate", "--checkpoint", str(model), "--data", str(corpus / "shards"), "--num-clips", "2",
                      "--steps", "2", "--out", "eval.json", *overrides], capsys)
    assert code == 0, log
    result = json.loads((moved / "eval.json").read_text())
    assert result["reference_frames"] == {SOURCE_VIDEO: 2}

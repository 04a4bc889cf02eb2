"""Models that travel: a checkpoint finds its encoders by recorded path, override or not at all with a clear message.

The model is a real `LetsTalkDiT` with random weights whose `data_info` names an SD-VAE-layout VAE and a wav2vec2
folder (tests/production.py), recorded as `letstalk prepare` records them (id or name, absolute path, sha1).
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from pipeline import media
from pipeline.audio_encoders import build_audio_encoder
from pipeline.checkpoints import export, make_manifest, manifest_path, write_manifest
from pipeline.cli import main
from pipeline.diffusion import DiffusionConfig
from pipeline.evaluate import MetricsConfig, evaluate
from pipeline.generate import generate, load_network, load_model
from pipeline.locate import EncoderMismatchWarning, EncoderNotFoundError, fingerprint, locate_encoders
from pipeline.models.dit import DiTConfig, LetsTalkDiT
from pipeline.options import EncoderPaths, Encoders, Frames, Framing, Provenance, Sampling, Segments
from pipeline.prepare import prepare
from pipeline.vae import load_vae, vae_info
from production import astronaut_head, sd_vae, talking_video, wav2vec2

RADIUS = 2


def recorded_info(vae: Path, encoder: Path) -> dict:
    """A `data_info` for 64 px frames at 25 fps, recording the two encoder folders as prepare does."""
    audio = build_audio_encoder("wav2vec2", str(encoder), fps=25.0)
    return {"latent_channels": 4, "audio_dim": audio.D, "audio_tokens": (2 * RADIUS + 1) * audio.K,
            "audio_radius": RADIUS, "clip_frames": 8, "fps": 25.0, "sample_rate": 16000, "size": 64,
            "vae": {**vae_info(load_vae(vae), vae.name), "path": str(vae.resolve()), "sha1": fingerprint(vae)},
            "audio_encoder": {"id": audio.id, "name": "wav2vec2", "path": str(encoder.resolve()),
                              "sha1": fingerprint(encoder), "layers": [-1], "K": audio.K, "D": audio.D,
                              "sample_rate": 16000}}


def write_checkpoint(path: Path, info: dict) -> Path:
    """A `letstalk fit`-shaped checkpoint (configs + net/ema weights) of a tiny network with random weights that
    all matter (no zero-initialised outputs), so its videos depend on the audio encoder and the VAE; with its
    integrity manifest."""
    config = DiTConfig(size="tiny", latent_channels=info["latent_channels"], patch_size=2, audio_dim=info["audio_dim"],
                       audio_tokens=info["audio_tokens"])
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) * 0.05 for k, v in LetsTalkDiT(config).state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"hyper_parameters": {"net": asdict(config), "diffusion": asdict(DiffusionConfig()), "data_info": info},
                "state_dict": {f"{prefix}.{k}": v for prefix in ("net", "ema") for k, v in state.items()}}, path)
    write_manifest(make_manifest(path, 0, 1), manifest_path(path))  # as `letstalk fit` writes it
    return path


@pytest.fixture(scope="module")
def travel(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Encoders in home/, the checkpoint in run/, a dataset made with the encoders, a portrait and 44.1 kHz stereo
    speech; and the video made there."""
    root = tmp_path_factory.mktemp("travel")
    vae, encoder = sd_vae(root / "home" / "sd-vae"), wav2vec2(root / "home" / "wav2vec2")
    info = recorded_info(vae, encoder)
    checkpoint = write_checkpoint(root / "run" / "last.ckpt", info)
    talking_video(root / "videos" / "rec0.mp4", seconds=1.0)
    prepare(root / "videos", root / "shards",
            encoders=Encoders(vae=str(vae), audio_encoder="wav2vec2", audio_encoder_path=str(encoder)),
            frames=Frames(size=64), segments=Segments(segment_seconds=1.0, min_segment_seconds=0.5), progress=False)
    media.write_image(root / "portrait.png", astronaut_head())
    t = np.arange(int(0.5 * 44100)) / 44100
    voice = np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))
    sf.write(root / "speech.wav", np.stack([voice, 0.5 * voice], axis=1).astype(np.float32), 44100)
    before = root / "before.mp4"
    generate(checkpoint, root / "portrait.png", root / "speech.wav", before, sampling=Sampling(steps=2),
             framing=Framing(crop="center"))
    return {"root": root, "vae": vae, "encoder": encoder, "info": info, "checkpoint": checkpoint, "before": before}


def moved(travel: dict) -> tuple[Path, Path]:
    """The encoders moved from home/ to elsewhere/ (once): the recorded paths no longer exist."""
    home, elsewhere = travel["root"] / "home", travel["root"] / "elsewhere"
    if home.exists():
        shutil.move(home, elsewhere)
    return elsewhere / "sd-vae", elsewhere / "wav2vec2"


def test_moved_encoders_are_named_with_where_the_path_came_from_and_the_flag(travel: dict, capsys):
    vae, encoder = moved(travel)
    out = travel["root"] / "missing.mp4"
    args = ["generate", "--checkpoint", str(travel["checkpoint"]), "--portrait", str(travel["root"] / "portrait.png"),
            "--audio", str(travel["root"] / "speech.wav"), "--out", str(out), "--steps", "2", "--crop", "center"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"VAE sd-vae folder {travel['info']['vae']['path']} does not exist" in err
    assert f"that path is recorded in checkpoint {travel['checkpoint']}" in err and "Pass --vae DIR" in err
    assert main([*args, "--vae", str(vae)]) == 1
    err = capsys.readouterr().err
    assert f"audio encoder wav2vec2 folder {travel['info']['audio_encoder']['path']} does not exist" in err
    assert f"recorded in checkpoint {travel['checkpoint']}" in err and "Pass --audio-encoder-path DIR" in err
    assert travel["info"]["audio_encoder"]["sha1"] in err  # which copy to look for
    assert not out.exists()


def test_with_overrides_the_moved_model_makes_the_same_video(travel: dict):
    vae, encoder = moved(travel)
    out = travel["root"] / "after.mp4"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same folders, moved: no fingerprint warning
        assert main(["generate", "--checkpoint", str(travel["checkpoint"]), "--portrait",
                     str(travel["root"] / "portrait.png"), "--audio", str(travel["root"] / "speech.wav"),
                     "--out", str(out), "--steps", "2", "--crop", "center", "--vae", str(vae),
                     "--audio-encoder-path", str(encoder)]) == 0
    np.testing.assert_array_equal(media.read_video(out), media.read_video(travel["before"]))
    np.testing.assert_array_equal(media.read_audio_native(out)[0], media.read_audio_native(travel["before"])[0])
    gen = load_network(travel["checkpoint"], vae=vae, audio_encoder=encoder)
    assert gen.data_info["vae"]["path"] == str(vae.resolve())
    assert gen.data_info["audio_encoder"]["path"] == str(encoder.resolve())
    assert gen.data_info["audio_encoder"]["sha1"] == travel["info"]["audio_encoder"]["sha1"]


def test_batch_mode_takes_the_overrides(travel: dict):
    vae, encoder = moved(travel)
    rows = travel["root"] / "rows.csv"
    rows.write_text(f"portrait,audio,out\n{travel['root'] / 'portrait.png'},speech.wav,batch/one.mp4\n")
    assert main(["generate", "--checkpoint", str(travel["checkpoint"]), "--batch", str(rows), "--steps", "2",
                 "--crop", "center", "--vae", str(vae), "--audio-encoder-path", str(encoder)]) == 0
    np.testing.assert_array_equal(media.read_video(travel["root"] / "batch" / "one.mp4"),
                                  media.read_video(travel["before"]))


def test_evaluate_takes_the_same_overrides(travel: dict, tmp_path: Path, capsys):
    vae, encoder = moved(travel)
    args = ["evaluate", "--checkpoint", str(travel["checkpoint"]), "--data", str(travel["root"] / "shards"),
            "--num-clips", "1", "--steps", "1", "--vae", str(vae)]  # the VAE found: the audio encoder is named
    assert main(args) == 1
    assert "audio encoder wav2vec2 folder" in (err := capsys.readouterr().err) and "--audio-encoder-path DIR" in err
    (tmp_path / "empty").mkdir()
    assert main([*args, "--audio-encoder-path", str(tmp_path / "empty")]) == 1
    assert "that path was given with --audio-encoder-path" in capsys.readouterr().err
    result = evaluate(travel["checkpoint"], travel["root"] / "shards", sampling=Sampling(steps=1),
                      encoders=EncoderPaths(vae=vae, audio_encoder_path=encoder), num_clips=1,
                      metrics=MetricsConfig(appearance=False))  # appearance: slow, not at issue
    assert result["num_clips"] == 1


def test_export_rehomes_the_encoders_once(travel: dict):
    vae, encoder = moved(travel)
    out = travel["root"] / "export" / "model.safetensors"
    assert main(["export", str(travel["checkpoint"]), "--out", str(out), "--vae", str(vae),
                 "--audio-encoder-path", str(encoder)]) == 0
    config = json.loads(out.with_suffix(".json").read_text())
    assert config["source"]["weights"] == "ema"
    for key, folder in (("vae", vae), ("audio_encoder", encoder)):
        recorded = travel["info"][key]
        assert config["data_info"][key] == {**recorded, "path": str(folder.resolve())}  # name, id, sha1 kept
    a, b = travel["root"] / "ckpt.mp4", travel["root"] / "export.mp4"
    speech, portrait = travel["root"] / "speech.wav", travel["root"] / "portrait.png"
    # without provenance marks: the watermark's id comes from the file's hash, which differs by design
    generate(travel["checkpoint"], portrait, speech, a, sampling=Sampling(steps=2), framing=Framing(crop="center"),
             encoders=EncoderPaths(vae=vae, audio_encoder_path=encoder), marks=Provenance(marks=False))
    generate(out, portrait, speech, b, sampling=Sampling(steps=2), framing=Framing(crop="center"),
             marks=Provenance(marks=False))  # no overrides needed
    np.testing.assert_array_equal(media.read_video(a), media.read_video(b))


def test_another_encoder_folder_warns_with_both_hashes(travel: dict, tmp_path: Path):
    vae, encoder = moved(travel)
    other_vae, other_encoder = sd_vae(tmp_path / "sd-vae", seed=1), wav2vec2(tmp_path / "wav2vec2", seed=1)
    for overrides, folder, key in (({"vae": other_vae, "audio_encoder": encoder}, other_vae, "vae"),
                                   ({"vae": vae, "audio_encoder": other_encoder}, other_encoder, "audio_encoder")):
        with pytest.warns(EncoderMismatchWarning) as caught:
            load_model(travel["checkpoint"], **overrides)
        message = str(caught[0].message)
        assert str(folder) in message and fingerprint(folder) in message
        assert travel["info"][key]["sha1"] in message and str(travel["checkpoint"]) in message


def test_an_old_record_without_hashes_and_with_relative_paths(travel: dict, tmp_path: Path, monkeypatch):
    """Older datasets recorded paths as given (relative to where prepare ran) and no sha1: looked up from the
    current folder, and the message says so."""
    vae, encoder = moved(travel)
    info = json.loads(json.dumps(travel["info"]))
    for key in ("vae", "audio_encoder"):
        info[key].pop("sha1")
    info["vae"]["path"], info["audio_encoder"]["path"] = "sd-vae", "wav2vec2"
    monkeypatch.chdir(vae.parent)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found = locate_encoders(info, "checkpoint old.ckpt")
    assert (found["vae"]["path"], found["audio_encoder"]["path"]) == (str(vae), str(encoder))
    assert "sha1" not in found["vae"] and info["vae"]["path"] == "sd-vae"  # the record itself is left alone
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EncoderNotFoundError, match=rf"VAE sd-vae folder sd-vae does not exist; that path is recorded "
                       rf"in checkpoint old.ckpt, relative to the current folder {tmp_path}\. Pass --vae DIR"):
        locate_encoders(info, "checkpoint old.ckpt")


def test_what_is_not_an_encoder_folder_is_refused(travel: dict, tmp_path: Path):
    vae, encoder = moved(travel)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncoderNotFoundError, match=rf"audio encoder wav2vec2 folder {tmp_path / 'empty'} has no "
                       r"config.json \(not a saved model folder\); that path was given with --audio-encoder-path"):
        locate_encoders(travel["info"], "checkpoint x.ckpt", vae=vae, audio_encoder=tmp_path / "empty")
    info = {**travel["info"], "vae": {**travel["info"]["vae"], "path": None}}
    with pytest.raises(EncoderNotFoundError, match="checkpoint x.ckpt records no folder for the VAE sd-vae; pass --vae"):
        locate_encoders(info, "checkpoint x.ckpt")


def test_log_mel_needs_no_folder(travel: dict):
    vae, _ = moved(travel)
    info = {**travel["info"], "audio_encoder": {"id": "mel", "name": "mel", "path": None, "sha1": None}}
    assert locate_encoders(info, "checkpoint x.ckpt", vae=vae)["audio_encoder"] == info["audio_encoder"]
    with pytest.raises(EncoderNotFoundError, match="the model's audio encoder is the log-mel spectrogram"):
        locate_encoders(info, "checkpoint x.ckpt", vae=vae, audio_encoder=vae)


def test_export_without_overrides_copies_the_record_and_fills_no_hash(travel: dict, tmp_path: Path):
    """Export needs no encoders on its machine; a re-homed encoder the checkpoint has no sha1 for gets the hash
    of the folder given."""
    vae, encoder = moved(travel)
    info = json.loads(json.dumps(travel["info"]))
    info["vae"].pop("sha1")
    checkpoint = write_checkpoint(tmp_path / "old.ckpt", info)
    config = json.loads(export(checkpoint, tmp_path / "a.safetensors").with_suffix(".json").read_text())
    assert config["data_info"] == info  # recorded paths kept although they are gone
    config = json.loads(export(checkpoint, tmp_path / "b.safetensors", vae=vae).with_suffix(".json").read_text())
    assert config["data_info"]["vae"]["sha1"] == fingerprint(vae) == travel["info"]["vae"]["sha1"]
    assert config["data_info"]["audio_encoder"] == info["audio_encoder"]

"""The VAE: offline load/encode/decode through real diffusers AutoencoderKL, scaling, and demo VAE training."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from lightning_modules.vae import _read_frames, fit_vae, train_vae
from pipeline.media import read_video
from pipeline.sync import mouth_opening, mouth_region
from pipeline.synth import SynthClip, make_clip, synthesize
from pipeline.vae import (
    VAEError,
    calibrate_scaling_factor,
    decode_latents,
    demo_vae_config,
    encode_frames,
    load_vae,
    psnr,
    scale_latents,
    unscale_latents,
    vae_info,
)

TINY = (8, 16, 16)


@pytest.fixture(scope="module")
def clips() -> list[SynthClip]:
    """Two 1 s synthetic talking-face clips (25 frames each) with their true mouth openings."""
    return [make_clip(seed, seconds=1.0, size=64) for seed in (0, 1)]


@pytest.fixture(scope="module")
def faces(clips) -> np.ndarray:
    """Their frames, uint8 [50, 64, 64, 3]."""
    return np.concatenate([clip.frames for clip in clips])


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> tuple[AutoencoderKL, Path]:
    """A random tiny demo VAE with a non-trivial scaling/shift, saved with save_pretrained."""
    torch.manual_seed(0)
    config = demo_vae_config(latent_channels=3, block_out_channels=TINY)
    config.update(scaling_factor=0.37, shift_factor=0.05)
    vae = AutoencoderKL(**config).eval()
    path = tmp_path_factory.mktemp("tiny_vae")
    vae.save_pretrained(path)
    return vae, path


def test_demo_config_builds_a_4x_vae():
    config = demo_vae_config()
    assert config["norm_num_groups"] == 8 and config["latent_channels"] == 4
    odd = demo_vae_config(latent_channels=8, block_out_channels=(12, 20))
    assert odd["norm_num_groups"] == 4 and odd["latent_channels"] == 8
    vae = AutoencoderKL(**demo_vae_config(block_out_channels=TINY))
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert z.shape == (1, 4, 16, 16)


def test_saved_vae_loads_and_encodes_identically(tiny_vae, faces):
    original, path = tiny_vae
    loaded = load_vae(path)
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    latents = encode_frames(loaded, faces, batch_size=7)
    assert latents.dtype == np.float16 and latents.shape == (len(faces), 3, 16, 16)
    with torch.no_grad():
        x = torch.from_numpy(faces).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # [T, 3, 64, 64]
        expected = torch.cat([original.encode(chunk).latent_dist.mean for chunk in x.split(7)])  # [T, 3, 16, 16]
    expected = expected.numpy().astype(np.float16)
    np.testing.assert_array_equal(latents, expected)
    np.testing.assert_array_equal(encode_frames(original, faces, batch_size=7), latents)
    batched = encode_frames(loaded, faces, batch_size=50).astype(np.float32)  # other conv kernels: rounding only
    np.testing.assert_allclose(batched, latents.astype(np.float32), rtol=1e-2, atol=2e-3)


def test_vae_info_reads_the_config(tiny_vae):
    _, path = tiny_vae
    info = vae_info(load_vae(path), "tiny")
    assert info == {"id": "tiny", "scaling_factor": 0.37, "shift_factor": 0.05, "latent_channels": 3, "downsample": 4}
    vae = AutoencoderKL(**demo_vae_config(block_out_channels=(8, 8)))
    assert vae_info(vae, "x")["shift_factor"] == 0.0 and vae_info(vae, "x")["downsample"] == 2


def test_decode_gives_uint8_frames_matching_the_model(tiny_vae, faces):
    vae, _ = tiny_vae
    latents = torch.from_numpy(encode_frames(vae, faces[:5]))
    frames = decode_latents(vae, latents, batch_size=2)
    assert frames.dtype == np.uint8 and frames.shape == (5, 64, 64, 3)
    with torch.no_grad():
        x = vae.decode(latents.float()).sample.clamp(-1, 1)
    expected = ((x + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    assert np.abs(frames.astype(np.float64) - expected).max() <= 1.0


def test_scale_unscale_round_trip():
    info = {"scaling_factor": 0.37, "shift_factor": 0.05}
    z = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    scaled = scale_latents(z, info)
    torch.testing.assert_close(scaled, (z - 0.05) * 0.37)
    torch.testing.assert_close(unscale_latents(scaled, info), z)
    torch.testing.assert_close(unscale_latents(scale_latents(z, {"scaling_factor": 2.0}), {"scaling_factor": 2.0}), z)


def test_calibrated_scaling_makes_unit_variance(tiny_vae, faces):
    vae, _ = tiny_vae
    factor = calibrate_scaling_factor(vae, faces)
    z = torch.from_numpy(encode_frames(vae, faces)).double()
    assert float((z * factor).std()) == pytest.approx(1.0, rel=1e-3)


def test_load_vae_missing_dir(tmp_path):
    with pytest.raises(VAEError, match=f"{tmp_path / 'nope'}.*does not exist"):
        load_vae(tmp_path / "nope")


def test_load_vae_without_config(tmp_path):
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(VAEError, match=f"{tmp_path}.*no config.json"):
        load_vae(tmp_path)


def test_load_vae_corrupt_weights(tiny_vae, tmp_path):
    _, path = tiny_vae
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    weights = (path / "diffusion_pytorch_model.safetensors").read_bytes()
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(VAEError, match=f"{tmp_path}.*cannot load"):
        load_vae(tmp_path)


def test_load_vae_from_pipeline_folder(tiny_vae, tmp_path, faces):
    """A full diffusers pipeline directory (weights under vae/) loads its VAE."""
    vae, _ = tiny_vae
    vae.save_pretrained(tmp_path / "vae")
    np.testing.assert_array_equal(encode_frames(load_vae(tmp_path), faces[:2]), encode_frames(vae, faces[:2]))


def test_bad_frames_and_latents_are_refused(tiny_vae, faces):
    vae, _ = tiny_vae
    with pytest.raises(VAEError, match="uint8"):
        encode_frames(vae, faces.astype(np.float32))
    with pytest.raises(VAEError, match="not divisible"):
        encode_frames(vae, faces[:, :62, :62])
    with pytest.raises(VAEError, match=r"\[T, 3, h, w\]"):
        decode_latents(vae, torch.zeros(1, 4, 16, 16))


def test_psnr():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    assert psnr(a, a) == float("inf")
    assert psnr(a, a + 1) == pytest.approx(10 * np.log10(255.0**2), rel=1e-9)
    with pytest.raises(ValueError, match="same shape"):
        psnr(a, a[:1])


def _logged(out: Path, name: str) -> list[float]:
    (metrics,) = (out / "logs").rglob("metrics.csv")
    with metrics.open() as handle:
        return [float(row[name]) for row in csv.DictReader(handle) if row.get(name)]


def test_train_vae_learns_and_saves_a_loadable_model(tmp_path, clips, faces):
    out, val_psnr = train_vae(faces, tmp_path / "vae", max_steps=120)
    rec = _logged(out, "vae/rec")
    assert len(rec) == 12 and rec[-1] < 0.4 * rec[0]
    assert _logged(out, "vae/val_psnr") == [pytest.approx(val_psnr)]
    vae = load_vae(out)
    info = vae_info(vae, "demo")
    assert info["scaling_factor"] != 1.0 and info["downsample"] == 4
    z = scale_latents(torch.from_numpy(encode_frames(vae, faces)).float(), info)
    assert float(z.std()) == pytest.approx(1.0, rel=0.05)
    decoded = decode_latents(vae, unscale_latents(z, info))
    assert psnr(faces, decoded) > 21.0 and val_psnr > 20.0
    for clip, start in zip(clips, (0, 25)):  # the mouth opening survives encode -> decode
        box = mouth_region(clip.meta)
        opening = mouth_opening(decoded[start : start + 25], box)
        assert np.corrcoef(opening, mouth_opening(clip.frames, box))[0, 1] > 0.9
        assert np.corrcoef(opening, clip.mouth_open)[0, 1] > 0.9


def test_fit_vae_reads_videos(tmp_path):
    videos = tmp_path / "videos"
    synthesize(videos, clips=2, seconds=1.0, size=64, seed=3)
    out = fit_vae(videos, tmp_path / "vae", max_steps=3, batch_size=8, max_frames=30, block_out_channels=TINY)
    assert (out / "config.json").is_file()
    assert load_vae(out).config.scaling_factor != 1.0
    frames = _read_frames(videos, 64, max_frames=10)  # 5 evenly spaced frames of each 25-frame clip
    first = read_video(videos / "clip_0000.mp4", size=64)
    assert frames.shape == (10, 64, 64, 3)
    np.testing.assert_array_equal(frames[:5], first[[0, 6, 12, 18, 24]])


def test_fit_vae_without_videos(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path}.*no .mp4"):
        fit_vae(tmp_path, tmp_path / "vae")


def test_train_vae_refuses_bad_frames(tmp_path, faces):
    with pytest.raises(ValueError, match="uint8"):
        train_vae(faces.astype(np.float32), tmp_path)
    with pytest.raises(ValueError, match="at least 2 frames"):
        train_vae(faces[:1], tmp_path)

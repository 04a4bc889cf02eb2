"""The VAE: offline load/encode/decode through real diffusers AutoencoderKL and AutoencoderDC, scaling,
the latent-space facts the manifest records, and demo VAE training."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderDC, AutoencoderKL

from lightning_modules.vae import _read_frames, fit_vae, train_vae
from pipeline.locate import fingerprint
from pipeline.media import read_video
from pipeline.metrics.appearance import psnr
from pipeline.options import Encoders, Frames
from pipeline.prepare import prepare
from pipeline.shards import iter_tar
from pipeline.sync import mouth_opening, mouth_region
from pipeline.synth import SynthClip, draw_clip, synthesize
from pipeline.vae import (
    VAEError,
    calibrate_scaling_factor,
    decode_latents,
    demo_vae_config,
    encode_frames,
    load_vae,
    recommended_patch_size,
    scale_latents,
    unscale_latents,
    vae_info,
)

TINY = (8, 16, 16)
DC_TINY = (8, 16, 32)  # f4, attention-free
DC_F32 = (8, 8, 16, 16, 32, 32)  # f32 like DC-AE f32c32, at 64x64 a 2x2 latent


def dc_config(channels: tuple[int, ...], latent_channels: int, **overrides) -> dict:
    """A tiny attention-free `AutoencoderDC` config: ResBlocks only, one layer per stage."""
    stages = len(channels)
    config = {
        "latent_channels": latent_channels,
        "attention_head_dim": 8,
        "encoder_block_types": "ResBlock",
        "decoder_block_types": "ResBlock",
        "encoder_block_out_channels": channels,
        "decoder_block_out_channels": channels,
        "encoder_layers_per_block": (1,) * stages,
        "decoder_layers_per_block": (1,) * stages,
        "encoder_qkv_multiscales": ((),) * stages,
        "decoder_qkv_multiscales": ((),) * stages,
    }
    return {**config, **overrides}


@pytest.fixture(scope="module")
def clips() -> list[SynthClip]:
    """Two 1 s synthetic talking-face clips (25 frames each) with their true mouth openings."""
    return [draw_clip(seed, seconds=1.0, size=64) for seed in (0, 1)]


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


@pytest.fixture(scope="module")
def tiny_dc(tmp_path_factory) -> tuple[AutoencoderDC, Path]:
    """A random tiny f4c8 deep-compression autoencoder, saved with save_pretrained."""
    torch.manual_seed(0)
    vae = AutoencoderDC(**dc_config(DC_TINY, 8, scaling_factor=0.41)).eval()
    path = tmp_path_factory.mktemp("tiny_dc")
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
    assert info == {
        "id": "tiny", "type": "kl", "scaling_factor": 0.37, "shift_factor": 0.05, "latent_channels": 3, "downsample": 4
    }
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


def test_saved_dc_vae_loads_and_encodes_identically(tiny_dc, faces):
    original, path = tiny_dc
    loaded = load_vae(path)
    assert isinstance(loaded, AutoencoderDC) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    latents = encode_frames(loaded, faces, batch_size=7)
    assert latents.dtype == np.float16 and latents.shape == (len(faces), 8, 16, 16)
    with torch.no_grad():
        x = torch.from_numpy(faces).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # [T, 3, 64, 64]
        expected = torch.cat([original.encode(chunk).latent for chunk in x.split(7)])  # [T, 8, 16, 16]
    np.testing.assert_array_equal(latents, expected.numpy().astype(np.float16))
    np.testing.assert_array_equal(encode_frames(original, faces, batch_size=7), latents)
    assert float(np.abs(latents.astype(np.float32)).max()) > 0.1  # a real latent, not zeros


def test_dc_decode_gives_uint8_frames_matching_the_model(tiny_dc, faces):
    vae, _ = tiny_dc
    latents = torch.from_numpy(encode_frames(vae, faces[:5]))  # [5, 8, 16, 16]
    frames = decode_latents(vae, latents, batch_size=2)
    assert frames.dtype == np.uint8 and frames.shape == (5, 64, 64, 3)
    with torch.no_grad():
        x = vae.decode(latents.float()).sample.clamp(-1, 1)  # [5, 3, 64, 64]
    expected = ((x + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    assert np.abs(frames.astype(np.float64) - expected).max() <= 1.0
    with pytest.raises(VAEError, match=r"\[T, 8, h, w\]"):
        decode_latents(vae, torch.zeros(1, 4, 16, 16))


def test_dc_vae_info_has_no_shift(tiny_dc):
    _, path = tiny_dc
    info = vae_info(load_vae(path), "dc-tiny")
    assert info == {
        "id": "dc-tiny", "type": "dc", "scaling_factor": 0.41, "shift_factor": 0.0, "latent_channels": 8, "downsample": 4
    }


@pytest.mark.parametrize(
    "vae",
    [
        pytest.param(lambda: AutoencoderKL(**demo_vae_config(block_out_channels=(8, 8))), id="kl-f2"),
        pytest.param(lambda: AutoencoderKL(**demo_vae_config(block_out_channels=(8, 8, 8, 8))), id="kl-f8"),
        pytest.param(lambda: AutoencoderDC(**dc_config((8, 16), 4)), id="dc-f2"),
        pytest.param(lambda: AutoencoderDC(**dc_config(DC_F32, 32)), id="dc-f32c32"),
        pytest.param(lambda: AutoencoderDC(**dc_config(DC_TINY, 8, encoder_layers_per_block=(0, 1, 1))), id="dc-0-1-1"),
        pytest.param(lambda: AutoencoderDC(**dc_config(DC_TINY, 8, encoder_layers_per_block=(1, 1, 0))), id="dc-1-1-0"),
        pytest.param(lambda: AutoencoderDC(**dc_config(DC_TINY, 8, downsample_block_type="Conv")), id="dc-conv"),
    ],
)
def test_downsample_from_config_matches_a_real_encode(vae):
    """The factor read from the config is what the encoder really does to a random image."""
    torch.manual_seed(0)
    model = vae().eval()
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        encoded = model.encode(image)
    latent = encoded.latent_dist.mean if isinstance(model, AutoencoderKL) else encoded.latent  # [1, C, h, w]
    info = vae_info(model, "x")
    assert info["downsample"] == 64 // latent.shape[-1] == 64 // latent.shape[-2]
    assert info["latent_channels"] == latent.shape[1]


def test_recommended_patch_size_keeps_tokens_per_frame():
    assert recommended_patch_size({"downsample": 8}) == 2  # SD-VAE f8: the paper's p = 2
    assert recommended_patch_size({"downsample": 4}) == 4  # the demo VAE
    assert recommended_patch_size({"downsample": 32}) == 1  # DC-AE f32
    for downsample in (1, 2, 4, 8, 16):
        patch = recommended_patch_size({"downsample": downsample})
        assert (256 // (downsample * patch)) ** 2 == (256 // 16) ** 2
    assert recommended_patch_size(vae_info(AutoencoderDC(**dc_config(DC_F32, 32)), "f32")) == 1
    for bad in (0, 3, -4, 8.0, "8", True, None):
        with pytest.raises(VAEError, match="power of two"):
            recommended_patch_size({"downsample": bad})


def test_load_dc_vae_from_pipeline_folder(tiny_dc, tmp_path, faces):
    """A diffusers pipeline directory whose vae/ subfolder is a DC-AE (the Sana layout) loads it."""
    vae, _ = tiny_dc
    vae.save_pretrained(tmp_path / "vae")
    (tmp_path / "model_index.json").write_text('{"_class_name": "SanaPipeline"}')
    loaded = load_vae(tmp_path)
    assert isinstance(loaded, AutoencoderDC)
    np.testing.assert_array_equal(encode_frames(loaded, faces[:2]), encode_frames(vae, faces[:2]))


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ('{"_class_name": "UNet2DModel"}', "_class_name is 'UNet2DModel'; supported VAEs are AutoencoderKL, AutoencoderDC"),
        ('{"latent_channels": 4}', "_class_name is None"),
        ('["AutoencoderKL"]', "_class_name is None"),
        ('{"_class_name": "AutoencoderKL"', "cannot read the VAE config"),
    ],
)
def test_load_vae_refuses_other_configs(tmp_path, config, problem):
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(VAEError, match=re.escape(f"{tmp_path / 'config.json'}: {problem}")):
        load_vae(tmp_path)


def test_load_vae_names_the_subfolder_config(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text('{"_class_name": "AutoencoderTiny"}')
    with pytest.raises(VAEError, match=re.escape(f"{tmp_path / 'vae' / 'config.json'}: _class_name is 'AutoencoderTiny'")):
        load_vae(tmp_path)


def test_unsupported_model_class_is_refused():
    with pytest.raises(VAEError, match="unsupported VAE class Linear"):
        vae_info(torch.nn.Linear(2, 2), "x")


def test_prepare_with_a_dc_vae_writes_dc_latents(tmp_path):
    """`prepare` with an f32c32 DC-AE: 64x64 frames become [T, 32, 2, 2] latents, the manifest says "dc"."""
    torch.manual_seed(0)
    dc_dir = tmp_path / "dc-f32c32"
    AutoencoderDC(**dc_config(DC_F32, 32, scaling_factor=0.5)).save_pretrained(dc_dir)
    videos = synthesize(tmp_path / "videos", clips=2, seconds=1.0, size=64, seed=5)
    manifest = prepare(tmp_path / "videos", tmp_path / "shards", encoders=Encoders(vae=str(dc_dir)),
                       frames=Frames(size=64), progress=False)
    vae = load_vae(dc_dir)
    assert manifest.vae == {**vae_info(vae, "dc-f32c32"), "path": str(dc_dir.resolve()), "sha1": fingerprint(dc_dir)}
    assert manifest.vae["type"] == "dc" and manifest.vae["downsample"] == 32 and manifest.vae["latent_channels"] == 32
    assert manifest.vae["shift_factor"] == 0.0 and manifest.vae["scaling_factor"] == 0.5
    assert recommended_patch_size(manifest.vae) == 1 and not manifest.failed
    segments = {s.key: s for shard in manifest.shard_paths(tmp_path / "shards") for s in iter_tar(shard)}
    assert len(segments) == 2
    for video in videos:
        (segment,) = [s for s in segments.values() if s.meta["source"] == str(video)]
        assert segment.latents.dtype == np.float16 and segment.latents.shape == (25, 32, 2, 2)
        np.testing.assert_array_equal(segment.latents, encode_frames(vae, read_video(video, fps=25, size=64)))
    with pytest.raises(ValueError, match="not divisible by the VAE downsampling factor 32"):
        prepare(tmp_path / "videos", tmp_path / "shards48", encoders=Encoders(vae=str(dc_dir)), frames=Frames(size=48),
                progress=False)


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

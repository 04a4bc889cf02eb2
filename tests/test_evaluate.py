"""pipeline.evaluate: a tiny real checkpoint on real shards, with and without (random-weight) metric networks.

The checkpoint is built, not trained (training is `test_training`'s job): the real LetsTalkModule
with its data description from the real datamodule, saved with the keys `letstalk fit` writes, over
shards that `prepare` made from synthetic talking faces with a random demo-size VAE.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from torch import nn

from datamodules.letstalk import LetsTalkDataModule
from lightning_modules.letstalk import LetsTalkModule
from pipeline import media
from pipeline.evaluate import (LATENT_DECODE, SOURCE_VIDEO, ClipLoader, MetricsConfig, MetricSuite, evaluate,
                               select_segments)
from pipeline.generate import CheckpointError
from pipeline.metrics import MetricWeightsError
from pipeline.metrics.i3d import InceptionI3d
from pipeline.metrics.inception import FIDInceptionV3
from pipeline.metrics.syncnet import SyncNet
from pipeline.options import Encoders, Sampling, Segments
from pipeline.prepare import prepare
from pipeline.shards import Manifest
from pipeline.synth import synthesize
from pipeline.vae import decode_latents, demo_vae_config, load_vae

FRAMES = 18  # >= 16 (one FVD clip) and > 5 (SyncNet windows)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    synthesize(root / "videos", clips=3, seconds=FRAMES / 25, size=64, fps=25, seed=0)
    AutoencoderKL(**demo_vae_config()).save_pretrained(root / "vae")
    prepare(root / "videos", root / "shards", encoders=Encoders(vae=str(root / "vae")),
            segments=Segments(segment_seconds=FRAMES / 25, min_segment_seconds=0.5), progress=False)
    info = LetsTalkDataModule(str(root / "shards"), clip_frames=8, audio_radius=2).data_info
    net = {"size": "tiny", "patch_size": 4, **{k: info[k] for k in ("latent_channels", "audio_dim", "audio_tokens")}}
    module = LetsTalkModule(net=net, data_info=info)
    state = module.state_dict()  # net.*; a `letstalk fit` checkpoint also holds the EMA network as ema.*
    state.update({f"ema.{k[len('net.'):]}": v for k, v in module.state_dict().items()})
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": state}, root / "tiny.ckpt")
    return {"root": root, "checkpoint": root / "tiny.ckpt", "shards": root / "shards"}


def _random_weights(net: nn.Module, path: Path) -> str:
    """He-initialised weights (features neither vanish nor explode), saved as a state dict."""
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
    torch.save(net.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def weights(tiny: dict[str, Path]) -> MetricsConfig:
    root = tiny["root"]
    return MetricsConfig(fid_weights=_random_weights(FIDInceptionV3(), root / "pt_inception.pth"),
                         fvd_weights=_random_weights(InceptionI3d(), root / "i3d_pretrained_400.pt"),
                         syncnet_weights=_random_weights(SyncNet(), root / "syncnet_v2.model"),
                         fid_frames_per_clip=2)


@pytest.fixture(scope="module")
def full(tiny: dict[str, Path], weights: MetricsConfig) -> tuple[dict, str]:
    """`evaluate` with every metric network configured (random weights), and the table it printed."""
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = evaluate(tiny["checkpoint"], tiny["shards"], sampling=Sampling(seed=0, steps=1), num_clips=2,
                          metrics=weights, out=tiny["root"] / "full.json")
    return result, printed.getvalue()


def test_without_weights_metrics_are_skipped_with_notes(tiny, tmp_path, capsys):
    out = tmp_path / "eval" / "result.json"
    result = evaluate(tiny["checkpoint"], tiny["shards"], sampling=Sampling(seed=0, steps=1), num_clips=2, out=out)
    assert json.loads(out.read_text()) == {k: v for k, v in result.items() if k != "out"}
    assert {k for k in result["metrics"] if not k.startswith("appearance/")} == {"sync_synthetic",
                                                                                "sync_synthetic_real"}
    assert set(result["skipped"]) == {"fid", "fvd", "sync_c", "sync_d"}
    assert "--fid-weights" in result["skipped"]["fid"] and "--syncnet-weights" in result["skipped"]["sync_d"]
    # the ground-truth faces open their mouths with the audio: the synthetic metric sees it
    assert result["metrics"]["sync_synthetic_real"] > 0.9
    assert -1.0 <= result["metrics"]["sync_synthetic"] <= 1.0
    assert result["reference_frames"] == {SOURCE_VIDEO: 2} and result["num_clips"] == 2
    assert [c["frames"] for c in result["clips"]] == [FRAMES, FRAMES]
    said = capsys.readouterr()
    table = said.out
    assert "synthetic lip sync (r)" in table and "skipped FID: no Inception weights" in table
    # a job's log shows progress: the first clip, then the last (the 30 s interval does not pass here)
    assert re.findall(r"evaluate: clips (\d)/2", said.err) == ["1", "2"], said.err
    assert "skipped Sync-C (SyncNet confidence), Sync-D (SyncNet distance)" in table and str(out) in table
    assert "mouth box: static portrait" in table and "drift: last chained clip" in table
    # the static reference, computed here from the source videos: frame 0 repeated against frames 1..
    static = []
    for key in (c["key"] for c in result["clips"]):
        (segment,) = [s for s in select_segments(tiny["shards"], 3, 0) if s.key == key]
        real = media.read_video(segment.meta["source"], fps=25, size=64)[:FRAMES].astype(np.float64)
        static.append(10 * math.log10(255**2 / np.mean((real[1:] - real[:1]) ** 2)))
    assert result["metrics"]["appearance/static/frame/psnr"] == pytest.approx(np.mean(static), abs=1e-9)
    assert result["appearance"]["static"]["frame"]["psnr"] == result["metrics"]["appearance/static/frame/psnr"]
    sheets = sorted((out.parent / "result_sheets").glob("*.png"))  # portrait | real | generated, per clip
    columns = math.ceil(FRAMES / 10)  # frames 0, 10, ..
    assert len(sheets) == 2 and media.read_image(sheets[0]).shape == (3 * 64 + 4, columns * 66 - 2, 3)


def test_with_random_weight_networks_every_metric_is_computed(full):
    result, table = full
    values = result["metrics"]
    assert result["skipped"] == {}
    assert {k for k in values if not k.startswith("appearance/")} == {
        "fid", "fvd", "sync_c", "sync_d", "sync_c_real", "sync_d_real", "sync_synthetic", "sync_synthetic_real"}
    assert all(math.isfinite(v) for v in values.values())
    assert values["fid"] > 0 and values["fvd"] > 0  # random-VAE frames differ from the ground truth
    assert values["sync_d"] > 0 and values["sync_c"] >= 0
    for clip in result["clips"]:
        assert abs(clip["sync_offset"]) <= 15 and abs(clip["sync_offset_real"]) <= 15
    assert json.loads(Path(result["out"]).read_text())["metrics"] == values
    assert "FID" in table and "FVD" in table and "Sync-C" in table and "skipped" not in table


def test_generated_equal_to_ground_truth_scores_as_ground_truth(tiny, weights):
    """Wiring check without generation: FID of a set against itself is 0; the synthetic score equals the real one."""
    suite = MetricSuite(MetricsConfig(fid_weights=weights.fid_weights, fid_frames_per_clip=2))
    manifest = Manifest.load(tiny["shards"])
    clips = [ClipLoader(manifest, 64)(s) for s in select_segments(tiny["shards"], 2, seed=0)]
    values, skipped = suite.summarize([suite.clip_stats(c.real, c, clip_frames=8) for c in clips])
    assert abs(values["fid"]) < 1e-6
    assert values["appearance/generated/mouth/psnr"] == math.inf and values["appearance/generated/frame/ssim"] == 1.0
    assert "appearance/ceiling/frame/psnr" not in values  # the loader had no VAE: no ceiling
    assert values["sync_synthetic"] == values["sync_synthetic_real"] > 0.9
    assert set(skipped) == {"fvd", "sync_c", "sync_d"}


def test_subset_is_fixed_by_the_seed(tiny):
    keys = lambda n, seed: [s.key for s in select_segments(tiny["shards"], n, seed)]  # noqa: E731
    assert keys(2, 0) == keys(2, 0)
    assert len({tuple(keys(2, seed)) for seed in range(8)}) > 1
    everything = keys(10, 0)  # more than there are: all, in dataset order
    assert everything == sorted(everything) and len(everything) == 3
    with pytest.raises(ValueError, match="num_clips"):
        select_segments(tiny["shards"], 0, 0)


def test_missing_source_video_falls_back_to_the_latents_with_a_warning(tiny):
    manifest = Manifest.load(tiny["shards"])
    segment = select_segments(tiny["shards"], 1, seed=0)[0]
    segment.meta["source"] = str(tiny["root"] / "gone.mp4")
    with pytest.warns(UserWarning, match=rf"{segment.key}: no source video at .*gone\.mp4; its ground truth is the "
                                         "VAE decode of the stored latents"):
        clip = ClipLoader(manifest, 64)(segment)
    assert clip.reference == LATENT_DECODE and clip.mouth_box is None and "gone.mp4" in clip.note
    expected = decode_latents(load_vae(tiny["root"] / "vae"), segment.latents.astype(np.float32))
    assert np.array_equal(clip.real, expected)


def test_bad_inputs_name_the_file(tiny, weights, tmp_path):
    with pytest.raises(MetricWeightsError, match="nothere.pth"):
        evaluate(tiny["checkpoint"], tiny["shards"], metrics=MetricsConfig(fid_weights=str(tmp_path / "nothere.pth")))
    with pytest.raises(MetricWeightsError, match=r"pt_inception\.pth: not the syncnet_python"):
        MetricSuite(MetricsConfig(syncnet_weights=weights.fid_weights))
    with pytest.raises(CheckpointError, match="missing.ckpt"):
        evaluate(tmp_path / "missing.ckpt", tiny["shards"])
    with pytest.raises(FileNotFoundError, match="no manifest"):
        evaluate(tiny["checkpoint"], tmp_path)


def test_cli_evaluate(tiny, tmp_path, capsys):
    from pipeline.cli import main

    out = tmp_path / "cli.json"
    args = ["evaluate", "--checkpoint", str(tiny["checkpoint"]), "--data", str(tiny["shards"])]
    assert main(args + ["--num-clips", "1", "--steps", "1", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["num_clips"] == 1 and "skipped FID" in capsys.readouterr().out
    assert main(args + ["--fid-weights", str(tmp_path / "none.pth")]) == 1
    assert "none.pth" in capsys.readouterr().err

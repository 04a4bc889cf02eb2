"""Long videos: generation chains clips through motion frames and the memory bank; residual generation
(relative to the portrait) in training and sampling; the seam metric."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.clips import cut_clip
from datamodules.letstalk import LetsTalkDataModule
from lightning_modules.letstalk import LetsTalkModule
from pipeline.diffusion import Diffusion, DiffusionConfig
from pipeline.generate import TrainedNetwork, sample_latents
from pipeline.metrics.seams import seam_ratio
from pipeline.models.dit import DiTConfig, LetsTalkDiT
from pipeline.shards import Segment

C, S, WIN, DA, CLIP = 4, 8, 3, 6, 4


class Recorder(torch.nn.Module):
    """Wraps the network and records the motion/memory and batch size each denoiser call receives."""

    def __init__(self, net: LetsTalkDiT):
        super().__init__()
        self.net, self.config, self.calls, self.batch_sizes = net, net.config, [], []

    def forward(self, x, t, ref, audio, drop_ref=None, drop_audio=None, motion=None, memory=None, drop_motion=None):
        self.calls.append((motion, memory))
        self.batch_sizes.append(x.shape[0])
        return self.net(x, t, ref, audio, drop_ref, drop_audio, motion=motion, memory=memory, drop_motion=drop_motion)


def trained(**long) -> TrainedNetwork:
    torch.manual_seed(0)
    net = LetsTalkDiT(DiTConfig(latent_channels=C, audio_dim=DA, audio_tokens=WIN, **long)).eval()
    with torch.no_grad():  # non-zero output, so consecutive clips differ
        net.final.proj.weight.normal_(0, 0.02)
    return TrainedNetwork(Recorder(net), Diffusion(DiffusionConfig(objective="flow")), {"clip_frames": CLIP})


def sample(gen: TrainedNetwork, frames: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ref, windows = torch.randn(1, C, S, S, generator=g), torch.randn(frames, WIN, DA, generator=g)
    return sample_latents(gen, ref, windows, steps=3, audio_scale=1.0, ref_scale=1.0, seed=seed)


def test_each_clip_is_conditioned_on_the_latents_generated_before_it():
    long = {"motion_frames": 2, "memory_frames": 2, "memory_stride": 2, "cond_noise_infer": 0.0}
    gen = trained(**long)
    z = sample(gen, 3 * CLIP - 1)  # 3 clips, the last one padded and cut
    assert z.shape == (3 * CLIP - 1, C, S, S)
    calls = gen.net.calls
    assert len(calls) == 3 * 3  # 3 clips x 3 steps (guidance scale 1: one call per step)
    assert all(motion is None and memory is None for motion, memory in calls[:3])  # the first clip: nulls
    config = gen.net.config
    for clip in (1, 2):
        start = clip * CLIP
        for motion, memory in calls[3 * clip : 3 * clip + 3]:
            torch.testing.assert_close(motion[0], z[start - 2 : start])  # the last M frames so far
            torch.testing.assert_close(memory[0], z[config.long_video.memory_indices(start)])
    noisy = trained(**{**long, "cond_noise_infer": 0.2})
    z = sample(noisy, 2 * CLIP)
    motion, clean = noisy.net.calls[3][0][0], z[CLIP - 2 : CLIP]  # flow: (1 - 0.2)·z + 0.2·ε
    assert not torch.allclose(motion, clean) and torch.corrcoef(torch.stack([motion.flatten(), clean.flatten()]))[0, 1] > 0.9


def _frames_of(context: torch.Tensor, z: torch.Tensor) -> list[int]:
    """The frame of the generated latents z [T, C, h, w] that each context frame [K, C, h, w] is."""
    return [next(j for j in range(len(z)) if torch.allclose(frame, z[j])) for frame in context]


@pytest.mark.parametrize("motion, memory, stride", [(2, 2, 2), (CLIP, 3, 1), (1, 2, 5)])
def test_training_cuts_the_context_frames_generation_conditions_on(motion, memory, stride):
    """At every clip start generation reaches, the motion and memory frames a training clip is cut with
    (`cut_clip` on a segment whose frame i holds the value i) are the frames generation feeds the network."""
    long = {"motion_frames": motion, "memory_frames": memory, "memory_stride": stride, "cond_noise_infer": 0.0}
    gen = trained(**long)
    z = sample(gen, 4 * CLIP)
    frames = np.broadcast_to(np.arange(4 * CLIP, dtype=np.float16)[:, None, None, None], (4 * CLIP, C, S, S))
    segment = Segment("v/0", frames, np.zeros((4 * CLIP, 1, DA), np.float16), b"", {})
    for clip in (1, 2, 3):
        start = clip * CLIP
        cut = cut_clip(segment, start, 0, CLIP, 0, gen.net.config.long_video)
        given_motion, given_memory = gen.net.calls[3 * clip]  # 3 sampler steps per clip
        assert cut["motion"][:, 0, 0, 0].int().tolist() == _frames_of(given_motion[0], z)
        assert cut["memory"][:, 0, 0, 0].int().tolist() == _frames_of(given_memory[0], z)


def test_more_motion_frames_than_a_clip_has_are_refused_before_training():
    """Generation's second clip has only clip_frames frames before it: M > clip_frames would give it motion frames
    training never showed (clamped repeats of frame 0), so the data module refuses the setting."""
    with pytest.raises(ValueError, match=r"motion_frames=5 is more than data.clip_frames=4.*motion_frames <= 4"):
        LetsTalkDataModule("unused", clip_frames=CLIP).set_context(DiTConfig(motion_frames=CLIP + 1))
    LetsTalkDataModule("unused", clip_frames=CLIP).set_context(DiTConfig(motion_frames=CLIP))


def test_without_long_video_options_or_chaining_clips_are_independent():
    gen = trained()
    z = sample(gen, 2 * CLIP)
    assert all(motion is None and memory is None for motion, memory in gen.net.calls)
    torch.testing.assert_close(z, sample(trained(), 2 * CLIP))  # a fixed seed gives the same video
    unchained = trained(motion_frames=2, memory_frames=1)
    g = torch.Generator().manual_seed(1)
    ref, windows = torch.randn(1, C, S, S, generator=g), torch.randn(2 * CLIP, WIN, DA, generator=g)
    sample_latents(unchained, ref, windows, steps=3, audio_scale=1.0, ref_scale=1.0, chain=False)
    assert all(motion is None and memory is None for motion, memory in unchained.net.calls)


def test_independent_clips_are_sampled_in_batches_equal_to_clip_by_clip():
    """Without chaining, k clips share one network call per step (with guidance, one batch of 3k: full, portrait
    only, none); their noise is drawn clip by clip, so the video equals sampling the clips one at a time."""
    gen = trained()
    with torch.no_grad():  # every weight random: audio and portrait reach the output (zero-initialised gates would not)
        for param in gen.net.parameters():
            param.normal_(0, 0.1)
    g = torch.Generator().manual_seed(1)
    ref, windows = torch.randn(1, C, S, S, generator=g), torch.randn(3 * CLIP - 1, WIN, DA, generator=g)
    advanced: list[int] = []
    batched = sample_latents(gen, ref, windows, steps=3, on_step=advanced.append, clips_per_batch=2)
    assert gen.net.batch_sizes == [3 * 2] * 3 + [3 * 1] * 3 and advanced == [2, 2, 2, 1, 1, 1]
    one_by_one = sample_latents(gen, ref, windows, steps=3, clips_per_batch=1)
    assert batched.shape == (3 * CLIP - 1, C, S, S)
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-5)
    other_audio = sample_latents(gen, ref, windows.flip(0), steps=3, clips_per_batch=2)
    assert (other_audio - batched).abs().max() > 1e-2  # the audio matters, so its placement in the batch is tested


def test_residual_generation_adds_the_portrait_back_and_chains_absolute_latents():
    """The network is the same with or without `residual`; only what its samples mean changes."""
    plain, residual = trained(), trained(residual=True)
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(1, C, S, S, generator=g)
    torch.testing.assert_close(sample(residual, 2 * CLIP), sample(plain, 2 * CLIP) + ref)  # sample() draws this ref
    chained = trained(residual=True, motion_frames=2, cond_noise_infer=0.0)
    z = sample(chained, 2 * CLIP)
    torch.testing.assert_close(chained.net.calls[3][0][0], z[CLIP - 2 : CLIP])  # motion: the video so far, not residuals


def test_residual_training_targets_the_change_from_the_portrait():
    info = {"latent_channels": C, "audio_dim": DA, "audio_tokens": WIN}
    net = {"patch_size": 2, **info}
    plain, residual = (LetsTalkModule(net={**net, "residual": r}, data_info={"clip_frames": CLIP, **info})
                       for r in (False, True))
    residual.net.load_state_dict(plain.net.state_dict())
    g = torch.Generator().manual_seed(2)
    ref, change = torch.randn(3, 1, C, S, S, generator=g), torch.randn(3, CLIP, C, S, S, generator=g)
    batch = {"ref": ref, "audio": torch.randn(3, CLIP, WIN, DA, generator=g)}
    loss = lambda module, latents: module._loss({**batch, "latents": latents},  # noqa: E731
                                                torch.Generator().manual_seed(3), dropout=False)
    assert loss(residual, ref + change) == loss(plain, change)
    assert loss(residual, ref + change) != loss(plain, ref + change)


def test_seam_ratio_measures_jumps_at_clip_boundaries():
    t = np.arange(12, dtype=np.float32)
    smooth = np.broadcast_to(t[:, None, None, None] * 2, (12, 4, 4, 3))
    assert seam_ratio(smooth, 4) == {"seam": 2.0, "inside": 2.0, "ratio": 1.0}
    jumpy = smooth + np.repeat(np.array([0, 10, 0], np.float32), 4)[:, None, None, None]  # clip 2 is offset by 10
    result = seam_ratio(jumpy, 4)
    assert result["seam"] == pytest.approx((12 + 8) / 2) and result["inside"] == 2.0 and result["ratio"] == 5.0
    with pytest.raises(ValueError, match="more than one clip"):
        seam_ratio(smooth[:4], 4)


@pytest.mark.slow
def test_chained_clips_of_a_briefly_trained_long_video_model_have_no_visible_seams(tmp_path):
    """The full demo, then `benchmarks/long_video_seams.py` (~25 min on 2 cores): seams <= 1.5x inside-clip motion."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from pipeline.cli.demo import run_demo

    run_demo(tmp_path / "demo")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "long_video_seams.py"
    subprocess.run([sys.executable, str(script), "--demo", str(tmp_path / "demo"), "--out", str(tmp_path / "long"),
                    "--steps", "600", "--json", str(tmp_path / "seams.json")], check=True)
    models = json.loads((tmp_path / "seams.json").read_text())["models"]
    long, independent = models["chained (motion + memory)"], models["same model, clips not chained"]
    assert long["ratio"] <= 1.5 and long["ratio"] < independent["ratio"]

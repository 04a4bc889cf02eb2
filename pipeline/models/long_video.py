"""The long-video context of a clip: which earlier latent frames condition it, and how they are noised.

A clip whose first latent frame is `start` is conditioned on
* its motion frames: the M frames right before it, start-M .. start-1;
* its memory bank: N frames `memory_stride` apart, oldest first, ending one stride before the motion frames;
  an index before the video's first frame is clamped to it (the start of a video has no earlier history).

Training cuts both from the ground-truth segment (datamodules/letstalk.py), generation and the in-loop evaluation
from the frames generated so far (pipeline/generate.py); both ask `LongVideoContext.indices`, so they cannot
disagree. A training clip starts at frame M or later, so its motion frames are real frames; generation's second
clip starts at clip_frames, so M <= clip_frames (`check_clip_frames`) for its motion frames to be real too.

Noise-regularised conditioning: at generation the context frames are the model's own samples, with sampling errors;
trained on clean ground truth, the model would trust them too much and errors would pile up clip after clip. So
they are put through the diffusion's forward process at a small level u (a fraction of the training timesteps,
t = u·N; for flow u is σ): in training u ~ U(0, cond_noise_max) per sample, plus motion dropout (a clip gets the
null motion and memory, as a video's first clip does), in validation and generation the fixed u = cond_noise_infer.
The model is not told u.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.diffusion import Diffusion


@dataclass(frozen=True)
class LongVideoContext:
    """The network config's long-video settings (`DiTConfig.long_video`); 0 frames = off."""

    motion_frames: int = 0  # M
    memory_frames: int = 0  # N
    memory_stride: int = 4  # latent frames between memory frames
    motion_dropout: float = 0.1  # training: P(a clip gets the null motion and memory)
    cond_noise_max: float = 0.3  # training: context noised to a level ~ U(0, cond_noise_max)
    cond_noise_infer: float = 0.3  # validation and generation: context noised to this level

    @property
    def active(self) -> bool:
        return bool(self.motion_frames or self.memory_frames)

    @property
    def history_frames(self) -> int:
        """Frames before a clip that its motion and memory can reach: M + N·memory_stride."""
        return self.motion_frames + self.memory_frames * self.memory_stride

    def check_clip_frames(self, clip_frames: int) -> None:
        """Refuse M > clip_frames: generation's second clip has only clip_frames generated frames before it."""
        if self.motion_frames > clip_frames:
            raise ValueError(
                f"model.net.motion_frames={self.motion_frames} is more than data.clip_frames={clip_frames}: a "
                f"generated video's second clip has only {clip_frames} frames before it to take motion frames from; "
                f"set motion_frames <= {clip_frames} or train longer clips")

    def motion_indices(self, start: int) -> list[int]:
        """start-M .. start-1 (clamped at frame 0, which only generation's first clips could reach)."""
        return [max(0, start - self.motion_frames + j) for j in range(self.motion_frames)]

    def memory_indices(self, start: int) -> list[int]:
        """N frames, oldest first, `memory_stride` apart, ending one stride before the motion frames; clamped at 0."""
        last = start - self.motion_frames - self.memory_stride
        return [max(0, last - self.memory_stride * j) for j in reversed(range(self.memory_frames))]

    def indices(self, start: int) -> dict[str, list[int]]:
        """{"motion": ..., "memory": ...} frame indices of a clip at `start`, for the parts the model has."""
        parts = {"motion": self.motion_indices(start), "memory": self.memory_indices(start)}
        return {key: index for key, index in parts.items() if index}

    def levels(self, batch: int, generator: torch.Generator | None, device: torch.device | str,
               training: bool) -> tuple[torch.Tensor | float, torch.Tensor | None]:
        """(noise level, motion dropout [B] bool or None) for a batch: drawn in training, fixed otherwise."""
        if not training:
            return self.cond_noise_infer, None
        level = torch.rand(batch, generator=generator, device=device) * self.cond_noise_max
        drop = torch.rand(batch, generator=generator, device=device) < self.motion_dropout
        return level, drop


def noise_context(diffusion: Diffusion, latents: torch.Tensor, level: torch.Tensor | float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Motion or memory latents [B, K, C, h, w] diffused to `level` ([B] tensor or one float; module docstring).
    Returns latents of the same shape and dtype."""
    b = latents.shape[0]
    u = torch.as_tensor(level, dtype=torch.float32, device=latents.device).expand(b)
    device = generator.device if generator is not None else latents.device  # a CPU generator may drive GPU latents
    noise = torch.randn(latents.shape, generator=generator, device=device).to(latents.device, latents.dtype)
    return diffusion.noise_and_target(latents, noise, u * diffusion.config.num_train_timesteps)[0]

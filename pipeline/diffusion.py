"""Diffusion objectives and samplers on diffusers schedulers, so training and sampling share one schedule.

Objectives: ``eps`` and ``v`` on a DDPM noise schedule (``DDPMScheduler`` for training,
``DDIMScheduler`` / ``DPMSolverMultistepScheduler`` built from the same config for
sampling), and ``flow`` (rectified flow: x_σ = (1-σ)·x0 + σ·ε, target ε - x0) with
``FlowMatchEulerDiscreteScheduler`` for sampling. Timesteps given to the model are on
the 0..1000 scale for every objective.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

OBJECTIVES = ("eps", "v", "flow")
SAMPLERS = {"eps": ("ddim", "dpm++"), "v": ("ddim", "dpm++"), "flow": ("euler",)}
TIMESTEP_SAMPLING = ("uniform", "logit_normal")

# model(x, t, drop_ref, drop_audio) -> prediction; the conditions are bound by the caller.
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class DiffusionConfig:
    objective: str = "flow"  # eps | v | flow
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"  # DDPM betas for eps / v (as DiT / Latte)
    timestep_sampling: str = "uniform"  # uniform | logit_normal
    audio_dropout: float = 0.1  # P(drop audio only) in training
    ref_dropout: float = 0.05  # P(drop portrait only)
    both_dropout: float = 0.05  # P(drop both): the unconditional prediction for guidance

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"diffusion.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"diffusion.timestep_sampling must be one of {TIMESTEP_SAMPLING}, got {self.timestep_sampling!r}")
        total = self.audio_dropout + self.ref_dropout + self.both_dropout
        if min(self.audio_dropout, self.ref_dropout, self.both_dropout) < 0 or total > 1:
            raise ValueError(f"diffusion dropouts must be >= 0 and sum to <= 1, got {total}")

    def to_dict(self) -> dict:
        return asdict(self)


class Diffusion:
    """Noising, training targets and guided sampling for one objective."""

    def __init__(self, config: DiffusionConfig):
        config.validate()
        self.config = config
        self.ddpm = DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                                  prediction_type="epsilon" if config.objective == "eps" else "v_prediction",
                                  clip_sample=False)

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None,
                         device: torch.device | str = "cpu") -> torch.Tensor:
        """Training timesteps [B] in [0, 1000): integer for eps / v, continuous σ·1000 for flow."""
        if self.config.timestep_sampling == "logit_normal":
            u = torch.sigmoid(torch.randn(batch, generator=generator, device=device))
        else:
            u = torch.rand(batch, generator=generator, device=device)
        n = self.config.num_train_timesteps
        if self.config.objective == "flow":
            return u * n
        return (u * n).long().clamp_(max=n - 1)

    def noise_and_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, regression target) for clean latents x0 [B, ...] at timesteps t [B]."""
        if self.config.objective == "flow":
            sigma = (t.float() / self.config.num_train_timesteps).view(-1, *[1] * (x0.dim() - 1))
            return (1 - sigma) * x0 + sigma * noise, noise - x0
        xt = self.ddpm.add_noise(x0, noise, t)
        target = noise if self.config.objective == "eps" else self.ddpm.get_velocity(x0, noise, t)
        return xt, target

    def dropout_masks(self, batch: int, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(drop_ref, drop_audio) [B] bool: audio only, portrait only, or both, with the configured odds."""
        u = torch.rand(batch, generator=generator, device=device)
        c = self.config
        drop_audio = u < c.audio_dropout
        drop_ref = (u >= c.audio_dropout) & (u < c.audio_dropout + c.ref_dropout)
        both = (u >= c.audio_dropout + c.ref_dropout) & (u < c.audio_dropout + c.ref_dropout + c.both_dropout)
        return drop_ref | both, drop_audio | both

    def scheduler(self, sampler: str, steps: int):
        """A diffusers scheduler for sampling, configured like the training schedule."""
        if sampler not in SAMPLERS[self.config.objective]:
            raise ValueError(f"sampler {sampler!r} does not fit objective {self.config.objective!r}; "
                             f"choose one of {SAMPLERS[self.config.objective]}")
        if sampler == "euler":
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.config.num_train_timesteps, shift=1.0)
        elif sampler == "ddim":
            scheduler = DDIMScheduler.from_config(self.ddpm.config, timestep_spacing="trailing", set_alpha_to_one=False)
        else:
            scheduler = DPMSolverMultistepScheduler.from_config(self.ddpm.config, algorithm_type="dpmsolver++",
                                                                timestep_spacing="trailing")
        scheduler.set_timesteps(steps)
        return scheduler

    @staticmethod
    def guided(model: Denoiser, x: torch.Tensor, t: torch.Tensor, audio_scale: float, ref_scale: float) -> torch.Tensor:
        """Classifier-free guidance with separate portrait and audio scales, in one batched call.

        pred = u + s_ref·(c_ref - u) + s_audio·(c_full - c_ref), with u unconditional,
        c_ref portrait only and c_full both conditions; scales of 1 give c_full exactly.
        """
        b = x.shape[0]
        if audio_scale == 1.0 and ref_scale == 1.0:
            no = torch.zeros(b, dtype=torch.bool, device=x.device)
            return model(x, t, no, no)
        flags = torch.arange(3, device=x.device).repeat_interleave(b)  # 0 full, 1 portrait only, 2 none
        out = model(x.repeat(3, *[1] * (x.dim() - 1)), t.repeat(3), flags == 2, flags >= 1)
        full, ref_only, uncond = out.chunk(3)
        return uncond + ref_scale * (ref_only - uncond) + audio_scale * (full - ref_only)

    @torch.no_grad()
    def sample(self, model: Denoiser, shape: tuple[int, ...], sampler: str | None = None, steps: int = 25,
               audio_scale: float = 1.0, ref_scale: float = 1.0, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw clean latents of `shape` ([B, F, C, h, w]) by running the sampler from pure noise."""
        sampler = sampler or SAMPLERS[self.config.objective][0]
        scheduler = self.scheduler(sampler, steps)
        x = noise if noise is not None else torch.randn(shape, generator=generator, device=device, dtype=dtype)
        x = x * getattr(scheduler, "init_noise_sigma", 1.0)
        for t in scheduler.timesteps:
            tt = t.to(device=device, dtype=torch.float32).expand(shape[0])
            pred = self.guided(model, x, tt, audio_scale, ref_scale)
            x = scheduler.step(pred, t, x).prev_sample
        return x

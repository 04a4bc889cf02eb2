"""Diffusion objectives and samplers on diffusers schedulers, so training and sampling share one schedule.

Every objective noises as x_t = a_t·x0 + b_t·ε:

- ``eps`` and ``v`` use a DDPM schedule (a_t = √ᾱ_t, b_t = √(1-ᾱ_t) from ``DDPMScheduler``;
  ``DPMSolverMultistepScheduler`` built from the same config samples with DDIM or DPM-Solver++);
  the network predicts ε, or v = a_t·ε - b_t·x0 (Salimans & Ho 2022).
- ``flow`` is rectified flow (a = 1-σ, b = σ, σ = t/N, N = 1000 training timesteps); the network predicts the velocity
  dx/dσ = ε - x0, and ``FlowMatchEulerDiscreteScheduler`` integrates it.

With ``network_output="x0"`` the network outputs the clean latents instead, turned into the
objective's prediction before the loss and the sampler see it (x-prediction with the objective's
own loss: Li & He 2025, "Back to Basics: Let Denoising Generative Models Denoise"); a zero output
is then the latent 0, the portrait itself for a residual model (`DiTConfig.residual`).

Timesteps given to the model are on the 0..1000 scale for every objective. The parameterisations
eps, x0, v and velocity are linear in (x0, ε) at fixed t, so ``Diffusion.convert`` turns any one
into any other by solving one 2×2 system; training targets and min-SNR loss weights come from the
same coefficients.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

OBJECTIVES = ("eps", "v", "flow")
SAMPLERS = {"eps": ("ddim", "dpm++"), "v": ("ddim", "dpm++"), "flow": ("euler",)}
# Sampling steps when none are asked for: 4 Euler steps on the flow objective, the fewest that keep lip sync and PSNR
# of more steps on the demo's models (benchmarks/generate_speed.md); 25 for the eps/v samplers.
# Re-measure for a model of your own before relying on 4.
DEFAULT_STEPS = {"euler": 4, "ddim": 25, "dpm++": 25}
# Classifier-free guidance scales when none are given (generate, evaluate, the app, EvalCallback): the scales that
# scored best in lip sync and portrait PSNR on the demo's models (benchmarks/fidelity.md, benchmarks/defaults.md).
AUDIO_SCALE, REF_SCALE = 2.0, 2.5


def guidance(audio_scale: float | None = None, ref_scale: float | None = None) -> tuple[float, float]:
    """(audio, portrait) guidance scales with None filled in from AUDIO_SCALE and REF_SCALE."""
    return (AUDIO_SCALE if audio_scale is None else audio_scale, REF_SCALE if ref_scale is None else ref_scale)

TIMESTEP_SAMPLING = ("uniform", "logit_normal")
LOSS_WEIGHTING = ("none", "min_snr")
PARAMETERISATIONS = ("eps", "x0", "v", "velocity")
PREDICTS = {"eps": "eps", "v": "v", "flow": "velocity"}  # what the network outputs for each objective
NETWORK_OUTPUTS = ("native", "x0")
MIN_NOISE_SCALE = 0.05  # x0 -> prediction divides by the noise scale b; it is held at >= this (as Li & He)

# model(x, t, drop_ref, drop_audio) -> prediction; the conditions are bound by the caller.
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _mix(kind: str, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """(c_x0, c_eps) such that the parameterisation `kind` equals c_x0·x0 + c_eps·ε at scales (a, b)."""
    return {"eps": (0.0, 1.0), "x0": (1.0, 0.0), "v": (-b, a), "velocity": (-1.0, 1.0)}[kind]


@dataclass
class DiffusionConfig:
    objective: str = "flow"  # eps | v | flow
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"  # DDPM betas for eps / v (as DiT / Latte)
    timestep_sampling: str = "uniform"  # uniform | logit_normal
    # Condition dropout: each training sample drops audio only, portrait only, both, or nothing,
    # with these probabilities (disjoint events; nothing has 1 - their sum).
    audio_dropout: float = 0.1  # P(drop audio only)
    ref_dropout: float = 0.05  # P(drop portrait only)
    both_dropout: float = 0.05  # P(drop both): the unconditional prediction for guidance
    loss_weighting: str = "none"  # none | min_snr (Hang et al. 2023, see Diffusion.loss_weights)
    min_snr_gamma: float = 5.0  # γ of min-SNR-γ
    network_output: str = "native"  # native: the objective's prediction (PREDICTS) | x0: the clean latents

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"diffusion.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"diffusion.timestep_sampling must be one of {TIMESTEP_SAMPLING}, got {self.timestep_sampling!r}")
        total = self.audio_dropout + self.ref_dropout + self.both_dropout
        if min(self.audio_dropout, self.ref_dropout, self.both_dropout) < 0 or total > 1:
            raise ValueError(f"diffusion dropouts must be >= 0 and sum to <= 1, got {total}")
        if self.loss_weighting not in LOSS_WEIGHTING:
            raise ValueError(f"diffusion.loss_weighting must be one of {LOSS_WEIGHTING}, got {self.loss_weighting!r}")
        if self.network_output not in NETWORK_OUTPUTS:
            raise ValueError(f"diffusion.network_output must be one of {NETWORK_OUTPUTS}, got {self.network_output!r}")
        if not self.min_snr_gamma > 0:
            raise ValueError(f"diffusion.min_snr_gamma must be > 0, got {self.min_snr_gamma}")

    def to_dict(self) -> dict:
        return asdict(self)


class Diffusion:
    """Noising, training targets, loss weights, parameterisation changes and guided sampling for one objective."""

    def __init__(self, config: DiffusionConfig):
        config.validate()
        self.config = config
        self.ddpm = DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                                  prediction_type="epsilon" if config.objective == "eps" else "v_prediction",
                                  clip_sample=False)
        self._alphas_cumprod = self.ddpm.alphas_cumprod  # [N] float32, moved to the timesteps' device on use

    def coefficients(self, t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scales (a, b) of x_t = a·x0 + b·ε for timesteps t [B], float32, shaped [B, 1, ...] to `ndim` dims.

        DDPM timesteps index ᾱ after rounding (the schedulers use integer timesteps); flow uses σ = t/N.
        """
        shape = (-1,) + (1,) * (ndim - 1)
        if self.config.objective == "flow":
            sigma = t.float() / self.config.num_train_timesteps
            return (1 - sigma).view(shape), sigma.view(shape)
        if self._alphas_cumprod.device != t.device:
            self._alphas_cumprod = self._alphas_cumprod.to(t.device)
        alpha_bar = self._alphas_cumprod[t.round().long()]
        return alpha_bar.sqrt().view(shape), (1 - alpha_bar).sqrt().view(shape)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio (a/b)² [B] at timesteps t [B]; infinite at flow σ = 0."""
        a, b = self.coefficients(t, 1)
        return (a / b).square()

    def convert(self, pred: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, to: str,
                source: str | None = None) -> torch.Tensor:
        """A prediction at x_t [B, ...] and t [B] re-expressed in another parameterisation.

        `source` and `to` are among eps, x0, v (a·ε - b·x0) and velocity (ε - x0); `source`
        defaults to what this objective's network predicts. Solves x_t = a·x0 + b·ε together with
        pred = c_x0·x0 + c_eps·ε for (x0, ε), then recombines; computed in float32, returned in
        pred's dtype. Singular only where the prediction carries no x0 information (eps at a = 0).
        """
        source = source or PREDICTS[self.config.objective]
        for name in (source, to):
            if name not in PARAMETERISATIONS:
                raise ValueError(f"parameterisation must be one of {PARAMETERISATIONS}, got {name!r}")
        if to == source:
            return pred
        a, b = self.coefficients(t, xt.dim())
        c_x0, c_eps = _mix(source, a, b)
        p, x = pred.float(), xt.float()
        det = a * c_eps - b * c_x0
        x0, eps = (c_eps * x - b * p) / det, (a * p - c_x0 * x) / det
        d_x0, d_eps = _mix(to, a, b)
        return (d_x0 * x0 + d_eps * eps).to(pred.dtype)

    def from_network(self, out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's output at x_t [B, ...], t [B] as this objective's prediction: itself, or for
        network_output "x0" the prediction made from x0 = out and ε = (x_t - a·x0) / max(b, MIN_NOISE_SCALE)."""
        if self.config.network_output == "native":
            return out
        a, b = self.coefficients(t, xt.dim())
        x0 = out.float()
        eps = (xt.float() - a * x0) / b.clamp(min=MIN_NOISE_SCALE)
        c_x0, c_eps = _mix(PREDICTS[self.config.objective], a, b)
        return (c_x0 * x0 + c_eps * eps).to(out.dtype)

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
        """(x_t, regression target) in x0's dtype for clean latents x0 [B, ...] at timesteps t [B]."""
        a, b = self.coefficients(t, x0.dim())
        c_x0, c_eps = _mix(PREDICTS[self.config.objective], a, b)
        x, eps = x0.float(), noise.float()
        return (a * x + b * eps).to(x0.dtype), (c_x0 * x + c_eps * eps).to(x0.dtype)

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weights [B] float32 for the squared error of the objective's prediction at timesteps t [B].

        ``none``: ones. ``min_snr`` (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
        Weighting Strategy"): the loss should weigh the x0 error by min(SNR, γ). At fixed x_t an x0
        error Δ makes a prediction error g·Δ with g = ∂pred/∂x0 = -(a·c_eps - b·c_x0)/b, so the
        weight is min(SNR, γ)/g²:
        eps: min(SNR, γ)/SNR; v: min(SNR, γ)/(SNR + 1) (as a² + b² = 1);
        flow (velocity ε - x0, g = -1/σ): min(SNR, γ)·σ² = min((1-σ)², γσ²) with SNR = ((1-σ)/σ)².
        All are <= 1; flow's weight goes to 0 at both ends of σ.
        """
        if self.config.loss_weighting == "none":
            return torch.ones(t.shape[0], device=t.device)
        a, b = self.coefficients(t, 1)
        c_x0, c_eps = _mix(PREDICTS[self.config.objective], a, b)
        # min(SNR, γ)/g² with SNR = a²/b², g² = det²/b², as min(a², γ·b²)/det²: exact 1 where SNR <= γ for eps.
        det = a * c_eps - b * c_x0
        return torch.minimum(a.square(), self.config.min_snr_gamma * b.square()) / det.square()

    def loss(self, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Scalar float32 loss: per-sample mean squared error [B] times `loss_weights(t)`, averaged over the batch."""
        per_sample = (pred.float() - target.float()).square().flatten(1).mean(1)  # [B]
        return (per_sample * self.loss_weights(t)).mean()

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
        """A diffusers scheduler for sampling `steps` steps, configured like the training schedule.

        All start at the noisiest training timestep ("trailing" spacing) and end on clean latents.
        ``ddim`` (deterministic, η = 0) runs as first-order DPM-Solver++, which is the same update
        (Lu et al. 2022, DPM-Solver / DPM-Solver++) but steps between the schedule's own timesteps:
        diffusers' ``DDIMScheduler.step`` assumes a stride of N // steps, which with trailing
        spacing is wrong whenever `steps` does not divide N (diffusers issue #12633).
        """
        sampler, steps = self.sampling(sampler, steps)
        if sampler == "euler":
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.config.num_train_timesteps, shift=1.0)
        else:
            scheduler = DPMSolverMultistepScheduler.from_config(self.ddpm.config, algorithm_type="dpmsolver++",
                                                                solver_order=1 if sampler == "ddim" else 2,
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

    def sampling(self, sampler: str | None = None, steps: int | None = None) -> tuple[str, int]:
        """(sampler, steps) with None filled in: the objective's first sampler and its DEFAULT_STEPS; a sampler that
        does not fit the objective is refused."""
        sampler = sampler or SAMPLERS[self.config.objective][0]
        if sampler not in SAMPLERS[self.config.objective]:
            raise ValueError(f"sampler {sampler!r} does not fit objective {self.config.objective!r}; "
                             f"choose one of {SAMPLERS[self.config.objective]}")
        return sampler, DEFAULT_STEPS[sampler] if steps is None else steps

    @torch.no_grad()
    def sample(self, model: Denoiser, shape: tuple[int, ...], sampler: str | None = None, steps: int | None = None,
               audio_scale: float = 1.0, ref_scale: float = 1.0, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw clean latents of `shape` ([B, F, C, h, w]) by running the sampler from pure noise."""
        sampler, steps = self.sampling(sampler, steps)
        scheduler = self.scheduler(sampler, steps)
        x = noise if noise is not None else torch.randn(shape, generator=generator, device=device, dtype=dtype)
        x = x * getattr(scheduler, "init_noise_sigma", 1.0)

        def predict(x, t, drop_ref, drop_audio):  # guidance mixes predictions, which are linear in the output
            return self.from_network(model(x, t, drop_ref, drop_audio), x, t)

        for t in scheduler.timesteps:
            tt = t.to(device=device, dtype=torch.float32).expand(shape[0])
            pred = self.guided(predict, x, tt, audio_scale, ref_scale)
            x = scheduler.step(pred, t, x).prev_sample
        return x

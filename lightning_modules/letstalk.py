"""LetsTalkModule: batches of clips in, diffusion loss, EMA weights and checkpoints out."""

from __future__ import annotations

import copy
import os
import time
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from pipeline.diffusion import Diffusion, DiffusionConfig
from pipeline.models.dit import DiTConfig, LetsTalkDiT, noise_context
from pipeline.throughput import peak_flops, throughput
from pipeline.vae import recommended_patch_size

# The EMA copy of the network is in eval mode on purpose (it is never trained by backprop).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100  # linear warm-up from 0, then constant
    ema_decay: float = 0.999  # capped by (1 + step) / (10 + step) early on
    nan_policy: str = "stop"  # non-finite loss: "stop" the run, or "skip" the step (no update, counted)
    max_skipped_steps: int = 10  # "skip": stop after this many consecutive skipped steps

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"optim.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(f"optim.nan_policy must be one of {NAN_POLICIES}, got {self.nan_policy!r}")
        if self.max_skipped_steps < 1:
            raise ValueError(f"optim.max_skipped_steps must be >= 1, got {self.max_skipped_steps}")


NAN_POLICIES = ("stop", "skip")


def _local(p: nn.Parameter) -> torch.Tensor:
    """This rank's values of a parameter: its ZeRO-3 shard (`ds_tensor`, `data` is empty) or the whole tensor."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


@torch.no_grad()
def ema_update(ema: nn.Module, live: nn.Module, decay: float, shadow: list[torch.Tensor] | None = None) -> None:
    """ema <- decay·ema + (1 - decay)·live, parameter by parameter, on this rank's values, in fp32.

    Under DeepSpeed ZeRO-3 EMA and live modules are partitioned alike (same shapes, same ranks), so the
    update runs on the local shards: no gather, no communication, and the EMA stays sharded like the
    weights (its checkpointing and export follow the model's own ZeRO-3 path). When DeepSpeed has cast the
    modules to bf16/fp16, `shadow` (fp32 copies of the EMA's local values, see `ema_shadow`) carries the
    average, since steps of (1 - decay) ≈ 1e-3 vanish in bf16 rounding; the EMA parameters get its rounding.
    """
    pairs = [(_local(e), _local(p)) for e, p in zip(ema.parameters(), live.parameters())]
    for i, (e, p) in enumerate(pairs):
        if e.shape != p.shape:
            raise RuntimeError(f"EMA and live parameters are partitioned differently: {tuple(e.shape)} vs "
                               f"{tuple(p.shape)}")
        if shadow is None:
            e.copy_(e.float().lerp_(p.float(), 1 - decay))
        else:
            e.copy_(shadow[i].lerp_(p.float(), 1 - decay))


def ema_shadow(ema: nn.Module) -> list[torch.Tensor] | None:
    """fp32 copies of the EMA's local values when its parameters are in lower precision, else None."""
    params = list(ema.parameters())
    if all(_local(p).dtype == torch.float32 for p in params):
        return None
    return [_local(p).float().clone() for p in params]


def _coerce(cls, value):
    """Accept a dataclass instance or a plain dict (as stored in checkpoints)."""
    if isinstance(value, cls):
        return value
    known = {f.name for f in fields(cls)}
    unknown = set(value) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {sorted(unknown)}; known: {sorted(known)}")
    return cls(**value)


class LetsTalkModule(L.LightningModule):
    """Trains a LetsTalkDiT with a diffusion objective; keeps an EMA copy that is saved with it.

    The data-dependent sizes (latent channels, audio dim, audio tokens) are taken from the
    DataModule's manifest when the network is built in ``configure_model``; the resolved
    network config and the data description go into the checkpoint's hyper-parameters,
    which is all ``letstalk generate`` needs besides the weights.
    """

    def __init__(self, net: DiTConfig | dict | None = None, diffusion: DiffusionConfig | dict | None = None,
                 optim: OptimConfig | dict | None = None, data_info: dict | None = None, seed: int = 0):
        super().__init__()
        net = _coerce(DiTConfig, net or {})
        diffusion = _coerce(DiffusionConfig, diffusion or {})
        optim = _coerce(OptimConfig, optim or {})
        net.validate()
        diffusion.validate()
        optim.validate()
        self.save_hyperparameters({"net": asdict(net), "diffusion": asdict(diffusion), "optim": asdict(optim),
                                   "data_info": data_info or {}, "seed": seed})
        self.diffusion = Diffusion(diffusion)
        self.optim = optim
        self.net: LetsTalkDiT | None = None
        self.ema: LetsTalkDiT | None = None
        self._tick: float | None = None
        self._skipped = 0  # consecutive non-finite steps skipped (nan_policy "skip")
        self._skipped_total = 0
        self._shadow: list[torch.Tensor] | None = None  # fp32 EMA under bf16 DeepSpeed (see `ema_update`)
        self._shadow_ready = False
        if data_info:  # restored from a checkpoint: sizes already resolved
            self._build(net)

    def _build(self, net: DiTConfig) -> None:
        self.net = LetsTalkDiT(net)
        self.ema = copy.deepcopy(self.net).requires_grad_(False).eval()
        self.hparams["net"] = asdict(net)

    def setup(self, stage: str) -> None:
        """Hand the model's long-video settings to the DataModule (its one source), before any batch is made."""
        datamodule = self.trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "set_context"):
            datamodule.set_context(DiTConfig(**self.hparams["net"]))

    def configure_model(self) -> None:
        if self.net is not None:
            return
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "data_info"):
            raise ValueError("LetsTalkModule needs a LetsTalkDataModule to size the network from its manifest")
        info = datamodule.data_info
        net = DiTConfig(**self.hparams["net"])
        for key in ("latent_channels", "audio_dim", "audio_tokens"):
            setattr(net, key, int(info[key]))
        if net.patch_size == "auto":  # tokens per frame independent of the VAE's downsampling
            net.patch_size = recommended_patch_size(info["vae"])
        self.hparams["data_info"] = info
        self._build(net)

    # -- training -----------------------------------------------------------------------
    def _loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None,
              dropout: bool = True) -> torch.Tensor:
        x0 = batch["latents"]  # [B, F, C, h, w] scaled
        b = x0.shape[0]
        t = self.diffusion.sample_timesteps(b, generator, x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        xt, target = self.diffusion.noise_and_target(x0, noise, t)
        if dropout:
            drop_ref, drop_audio = self.diffusion.dropout_masks(b, generator, x0.device)
        else:
            drop_ref = drop_audio = None
        context = self._context(batch, generator, training=dropout)
        pred = self.net(xt, t.float(), batch["ref"], batch["audio"], drop_ref, drop_audio, **context)
        return self.diffusion.loss(pred.float(), target.float(), t)  # min-SNR weighted when configured

    def _context(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None,
                 training: bool) -> dict[str, torch.Tensor | None]:
        """Motion/memory inputs of the batch, noised by `noise_context` (training: random level up to
        cond_noise_max, plus motion dropout; otherwise the generation level cond_noise_infer)."""
        cfg = self.net.config
        if not (cfg.motion_frames or cfg.memory_frames):
            return {}
        device = batch["latents"].device
        b = batch["latents"].shape[0]
        if training:
            level = torch.rand(b, generator=generator, device=device) * cfg.cond_noise_max
            drop = torch.rand(b, generator=generator, device=device) < cfg.motion_dropout
        else:
            level, drop = cfg.cond_noise_infer, None
        context = {"drop_motion": drop}
        for key, count in (("motion", cfg.motion_frames), ("memory", cfg.memory_frames)):
            if count:
                if key not in batch:
                    raise ValueError(f"the model has {key}_frames={count} but the batch has no {key!r}; "
                                     "call LetsTalkDataModule.set_context with the model config")
                context[key] = noise_context(self.diffusion, batch[key], level, generator)
        return context

    def on_train_start(self) -> None:
        if self.global_step:
            rank_zero_info(f"letstalk fit: resumed at step {self.global_step} "
                           f"(SLURM_RESTART_COUNT={os.environ.get('SLURM_RESTART_COUNT', 0)})")

    def _step_generator(self) -> torch.Generator:
        """The training noise of a step is a function of (seed, step, rank) only, so a resumed run draws
        exactly what an uninterrupted one would, without saving RNG states, on any number of ranks."""
        key = [int(self.hparams["seed"]), self.global_step, self.global_rank]
        return torch.Generator(device=self.device).manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        loss = self._loss(batch, self._step_generator())
        b = batch["latents"].shape[0]
        finite = self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True)
        if not finite:  # every rank decides alike, so all skip or all stop together
            self._skipped += 1
            self._skipped_total += 1
            where = f"loss is {loss.item()} at step {self.global_step}"
            if self.optim.nan_policy == "stop":
                raise FloatingPointError(f"{where}; lower optim.lr or check the data (the last checkpoint is kept; "
                                         "optim.nan_policy=skip skips such steps instead)")
            if self._skipped >= self.optim.max_skipped_steps:
                raise FloatingPointError(f"{where}: {self._skipped} consecutive non-finite steps "
                                         f"(optim.max_skipped_steps={self.optim.max_skipped_steps}); lower optim.lr "
                                         "or check the data (the last checkpoint is kept)")
            self.log("train/skipped_steps", float(self._skipped_total), batch_size=b)
            return None  # Lightning skips backward and the optimizer update for this batch
        self._skipped = 0
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=b)
        now = time.perf_counter()
        if self._tick is not None:
            frames, _, h, w = batch["latents"].shape[1:]
            p = self.net.config.patch_size
            world, peak = self.trainer.world_size, peak_flops(self.device)  # MFU over all ranks' devices
            rates = throughput(b * world, now - self._tick, 3 * self.net.flops_per_clip(frames, h, w),
                               frames * (h // p) * (w // p), peak * world if peak else None)
            for name, value in rates.items():
                self.log(f"train/{name}", value, prog_bar=name == "clips_per_s", batch_size=b)
        self._tick = now
        if self.device.type == "cuda":  # peak since the last logged step, then reset
            if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
                self.log("train/gpu_mem_gb", torch.cuda.max_memory_allocated(self.device) / 2**30, batch_size=b)
                torch.cuda.reset_peak_memory_stats(self.device)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        norms = [p.grad.detach().norm() for p in self.net.parameters() if p.grad is not None]
        if norms:
            self.log("train/grad_norm", torch.stack(norms).norm(), batch_size=1)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer update, then the EMA update: once per optimizer step (not per accumulated micro-batch,
        not on a skipped step), and before callbacks see the step, so a checkpoint of step N holds EMA step N."""
        super().optimizer_step(*args, **kwargs)
        if self._skipped:
            return
        step = self.global_step + 1  # Lightning counts this step after the hook returns
        if not self._shadow_ready:  # after the strategy cast and a checkpoint restore
            self._shadow, self._shadow_ready = ema_shadow(self.ema), True
        ema_update(self.ema, self.net, min(self.optim.ema_decay, (1 + step) / (10 + step)), self._shadow)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Loss of the EMA weights at a fixed noise draw per batch, so validation curves are comparable."""
        generator = torch.Generator(device=batch["latents"].device).manual_seed(1000 + batch_idx)
        live, self.net = self.net, self.ema
        try:
            loss = self._loss(batch, generator, dropout=False)
        finally:
            self.net = live
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["latents"].shape[0], sync_dist=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.optim.lr, betas=tuple(self.optim.betas),
                                weight_decay=self.optim.weight_decay)
        warmup = max(1, self.optim.warmup_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._shadow_ready = False  # rebuilt from the restored EMA at the next update

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["hyper_parameters"] = dict(self.hparams)

    def weights(self, ema: bool = True) -> nn.Module:
        return self.ema if ema else self.net

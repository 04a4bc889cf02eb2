"""LetsTalkModule: batches of clips in, diffusion loss, EMA weights and checkpoints out."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_modules.ema import base_optimizer, ema_state_dict, with_ema
from lightning_modules.preflight import preflight
from pipeline.diffusion import Diffusion, DiffusionConfig
from pipeline.models.dit import DiTConfig, LetsTalkDiT
from pipeline.models.long_video import noise_context
from pipeline.models.pretrained import InitFrom, load_pretrained
from pipeline.throughput import peak_flops, throughput

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
    """Trains a LetsTalkDiT with a diffusion objective; its optimizer keeps the EMA weights (`lightning_modules.ema`).

    The data-dependent sizes (latent channels, audio dim, audio tokens) are taken from the
    DataModule's manifest in ``setup`` (`resolve`), before the network is built; the resolved
    network config and the data description go into the checkpoint's hyper-parameters,
    which is all ``letstalk generate`` needs besides the weights.
    """

    clock = staticmethod(time.perf_counter)  # seconds, for the throughput rates (a test sets its own)

    def __init__(self, net: DiTConfig | dict | None = None, diffusion: DiffusionConfig | dict | None = None,
                 optim: OptimConfig | dict | None = None, data_info: dict | None = None, seed: int = 0,
                 init_from: InitFrom | dict | None = None):
        super().__init__()
        net = _coerce(DiTConfig, net or {})
        diffusion = _coerce(DiffusionConfig, diffusion or {})
        optim = _coerce(OptimConfig, optim or {})
        init_from = None if init_from is None else _coerce(InitFrom, init_from)
        for config in (net, diffusion, optim, init_from):
            if config is not None:
                config.validate()
        self.save_hyperparameters({"net": asdict(net), "diffusion": asdict(diffusion), "optim": asdict(optim),
                                   "data_info": data_info or {}, "seed": seed,
                                   "init_from": None if init_from is None else asdict(init_from)})
        self.diffusion = Diffusion(diffusion)
        self.optim = optim
        self.net: LetsTalkDiT | None = None
        self._tick: float | None = None
        self._skipped = 0  # consecutive non-finite steps skipped (nan_policy "skip")
        self._skipped_total = 0
        self._bad_samples: set[str] = set()  # the distinct damaged samples met on any rank (keys); checkpointed
        self._val_net: LetsTalkDiT | None = None  # the EMA network during a validation epoch
        self._loaded_ema: dict[str, torch.Tensor] | None = None  # a checkpoint's `ema.*`, when no optimizer runs
        if data_info:  # restored from a checkpoint: sizes already resolved
            self.net = LetsTalkDiT(net)

    def resolve(self, datamodule: Any = None) -> DiTConfig:
        """The network config for this run's data (`DiTConfig.for_data` on the `data_info` of `datamodule`, by default
        the trainer's), recorded in the hyper-parameters, so hparams.yaml, config.yaml and checkpoints hold what
        runs; idempotent."""
        if self.hparams["data_info"]:
            return DiTConfig(**self.hparams["net"])
        if datamodule is None and self._trainer is not None:
            datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "data_info"):
            raise ValueError("LetsTalkModule needs a LetsTalkDataModule to size the network from its manifest")
        info = datamodule.data_info
        net = DiTConfig(**self.hparams["net"]).for_data(info)
        self.save_hyperparameters({**self.hparams, "net": asdict(net), "data_info": info})
        return net

    def setup(self, stage: str) -> None:
        """Size the network from the data, check that the run can work (`lightning_modules.preflight`: every problem
        in one message, before anything expensive), and hand the model's long-video settings to the DataModule
        (their one source) before any batch is made."""
        datamodule = self.trainer.datamodule
        if stage == TrainerFn.FITTING:
            preflight(self, datamodule)
        elif hasattr(datamodule, "set_context"):
            datamodule.set_context(self.resolve())

    def configure_model(self) -> None:
        if self.net is not None:
            return
        self.net = LetsTalkDiT(self.resolve())
        spec = self.hparams.get("init_from")
        if spec:  # on a resume too (the checkpoint path is not known yet): the checkpoint's weights then replace these
            report = load_pretrained(self.net, InitFrom(**spec))
            rank_zero_info(f"letstalk fit: initialised from {spec['kind']} weights {spec['path']}\n{report.table()}")

    # -- training -----------------------------------------------------------------------
    def _loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None,
              dropout: bool = True, net: LetsTalkDiT | None = None) -> torch.Tensor:
        x0 = batch["latents"]  # [B, F, C, h, w] scaled
        if self.net.config.residual:  # the change from the portrait (DiTConfig.residual)
            x0 = x0 - batch["ref"][:, :1]  # [B, F, C, h, w] - [B, 1, C, h, w]
        b = x0.shape[0]
        t = self.diffusion.sample_timesteps(b, generator, x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        xt, target = self.diffusion.noise_and_target(x0, noise, t)
        if dropout:
            drop_ref, drop_audio = self.diffusion.dropout_masks(b, generator, x0.device)
        else:
            drop_ref = drop_audio = None
        context = self._context(batch, generator, training=dropout)
        out = (net or self.net)(xt, t.float(), batch["ref"], batch["audio"], drop_ref, drop_audio, **context)
        pred = self.diffusion.from_network(out, xt, t)
        return self.diffusion.loss(pred.float(), target.float(), t)  # min-SNR weighted when configured

    def _context(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None,
                 training: bool) -> dict[str, torch.Tensor | None]:
        """Motion/memory inputs of the batch, noised by `noise_context` at `LongVideoContext.levels` (training: a
        random level up to cond_noise_max, plus motion dropout; otherwise the generation level cond_noise_infer)."""
        long_video = self.net.config.long_video
        if not long_video.active:
            return {}
        level, drop = long_video.levels(batch["latents"].shape[0], generator, batch["latents"].device, training)
        context = {"drop_motion": drop}
        for key, count in (("motion", long_video.motion_frames), ("memory", long_video.memory_frames)):
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
        b = batch["latents"].shape[0]
        self._count_bad_samples(batch.pop("bad_samples", None), b)
        loss = self._loss(batch, self._step_generator())
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
            # No update: the optimizer skips its next step (and EMA). Backward still runs on every rank, on a zero
            # loss, as DDP and DeepSpeed need (Lightning refuses a None loss on more than one rank).
            base_optimizer(self.optimizers()).skip_next_step = True
            return loss.nan_to_num(0.0) * 0.0
        self._skipped = 0
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=b)
        now = self.clock()
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

    def _count_bad_samples(self, new: list[str] | None, b: int) -> None:
        """Count the distinct damaged samples met so far by every reader (`new`: those the batch's loader worker met
        since its previous batch; the main process's index, validation and evaluation clips: the datamodule's
        `faults`) on every rank, log it as `data/bad_samples` and stop the run, on every rank alike, once it passes
        the datamodule's budget (`pipeline.shards.BadSamples`). A sample met by several readers or ranks, or every
        epoch, counts once."""
        if new is None:
            return
        faults = getattr(self.trainer.datamodule, "faults", None)
        fresh = sorted({*new, *(faults.seen if faults is not None else ())} - self._bad_samples)
        anywhere = int(self.trainer.strategy.reduce(torch.tensor(float(len(fresh)), device=self.device),
                                                    reduce_op="sum"))
        if anywhere:  # some rank met a new one: every rank takes the union (the same collective on every rank)
            gathered = [fresh]
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                gathered = [None] * torch.distributed.get_world_size()
                torch.distributed.all_gather_object(gathered, fresh)
            self._bad_samples.update(key for part in gathered for key in part)
        self.log("data/bad_samples", float(len(self._bad_samples)), batch_size=b)
        if faults is not None:
            faults.check(len(self._bad_samples))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Global gradient norm before clipping (DDP: of the all-reduced gradients; ZeRO: see `optimizer_step`)."""
        norms = [p.grad.detach().norm() for p in self.net.parameters() if p.grad is not None]
        if norms and not self._skipped:
            self.log("train/grad_norm", torch.stack(norms).norm(), batch_size=1)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The update (and with it the EMA, see `lightning_modules.ema`). Under DeepSpeed ZeRO gradients live in
        the engine's partitions, not in `p.grad`: the engine computes the same pre-clipping global norm."""
        super().optimizer_step(*args, **kwargs)
        engine = getattr(self.trainer.strategy, "deepspeed_engine", None)
        if engine is not None and not self._skipped and engine.get_global_grad_norm() is not None:
            self.log("train/grad_norm", float(engine.get_global_grad_norm()), batch_size=1)

    def ema_network(self) -> LetsTalkDiT:
        """The EMA weights as a float32 eval-mode network on this device; every rank must call it (under ZeRO it
        gathers). Without an optimizer (validate, predict) the checkpoint's EMA, else the live weights."""
        return LetsTalkDiT.from_weights(self.net.config, self._ema_state(), self.device)

    def _ema_state(self) -> dict[str, torch.Tensor]:
        """The EMA state dict: the optimizer's, else a loaded checkpoint's, else (with a warning) the live weights."""
        optimizer = self.trainer.optimizers[0] if self._trainer is not None and self.trainer.optimizers else None
        if optimizer is None and self._loaded_ema:
            return self._loaded_ema
        if optimizer is None:
            rank_zero_warn("no EMA weights here (no optimizer state, e.g. `validate` of a DeepSpeed folder): using the "
                           "live weights; `letstalk export --ema` of the checkpoint gives the EMA")
        return ema_state_dict(self.net, optimizer)

    def restart_rate_window(self) -> None:
        """Leave the time since the last step out of the throughput rates: called after stalls that are not
        training (validation, checkpointing, evaluation), so clips/s and MFU measure training steps only."""
        self._tick = None

    def on_validation_epoch_start(self) -> None:
        self._val_net = self.ema_network()

    def on_validation_epoch_end(self) -> None:
        self._val_net = None
        self.restart_rate_window()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Loss of the EMA weights at a fixed noise draw per batch, so validation curves are comparable."""
        generator = torch.Generator(device=batch["latents"].device).manual_seed(1000 + batch_idx)
        loss = self._loss(batch, generator, dropout=False, net=self._val_net)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["latents"].shape[0], sync_dist=True)
        return loss

    def configure_optimizers(self):
        """AdamW with the EMA (`lightning_modules.ema`), fused into one kernel per step on GPUs; DeepSpeed's CPU Adam
        when ZeRO offloads the optimizer."""
        adam: type[torch.optim.Optimizer] = torch.optim.AdamW
        extra = {"fused": True} if self.device.type == "cuda" else {}
        if getattr(self.trainer.strategy, "offload_optimizer", False):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            adam, extra = DeepSpeedCPUAdam, {}  # AdamW by default (adamw_mode=True)
        opt = with_ema(adam)(self.net.parameters(), ema_decay=self.optim.ema_decay, lr=self.optim.lr,
                             betas=tuple(self.optim.betas), weight_decay=self.optim.weight_decay, **extra)
        warmup = max(1, self.optim.warmup_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Configs, the world size, and (outside DeepSpeed, whose folders keep it in the optimizer shards, read by
        `pipeline.checkpoints`) the EMA network as `ema.*`, which generation and export read."""
        self.restart_rate_window()
        checkpoint["hyper_parameters"] = dict(self.hparams)
        checkpoint["world_size"] = self.trainer.world_size
        checkpoint["bad_samples"] = sorted(self._bad_samples)
        if "state_dict" in checkpoint and not hasattr(self.trainer.strategy, "deepspeed_engine"):
            ema = self._ema_state()
            checkpoint["state_dict"].update({f"ema.{k}": v for k, v in ema.items()})

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a mid-epoch resume on another number of ranks; take the `ema.*` entries out of the state dict (the
        optimizer state holds the EMA that training resumes)."""
        written_by = checkpoint.get("world_size")
        epochs = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
        mid_epoch = epochs.get("started", 0) > epochs.get("processed", 0)
        fitting = self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING
        if fitting and written_by and written_by != self.trainer.world_size and mid_epoch:
            raise ValueError(
                f"this checkpoint was written by {written_by} ranks in the middle of an epoch and cannot resume on "
                f"{self.trainer.world_size}: each rank's place in the data stream belongs to that number of ranks. "
                f"Resume it with {written_by} ranks (--trainer.num_nodes x --trainer.devices); the weights alone go "
                "anywhere with `letstalk export`")
        saved = checkpoint.get("bad_samples", [])  # a count in checkpoints of earlier versions: kept as a count
        self._bad_samples = set(saved) if isinstance(saved, list) else {f"(met before the resume) {i}"
                                                                         for i in range(int(saved))}
        state = checkpoint.get("state_dict", {})
        ema = {k[len("ema."):]: state.pop(k) for k in [k for k in state if k.startswith("ema.")]}
        self._loaded_ema = ema or None

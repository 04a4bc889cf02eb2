"""What a run shows while it trains: a progress bar on a terminal, plain lines in a batch job's log, and the
training metrics of its first and last steps on every logger, so a short, stopped or crashed run still leaves
them in metrics.csv and W&B whatever `trainer.log_every_n_steps` is. `letstalk fit` adds these callbacks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

from pipeline.progress import ProgressLines


class _StepDescription:
    """"Epoch N" without Lightning's "/-2" when the run is limited by steps (max_epochs -1)."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is not None and self.trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"


class StepProgressBar(_StepDescription, RichProgressBar if _RICH_AVAILABLE else TQDMProgressBar):
    """Lightning's own progress bar for a terminal, with a step-limited run's epoch shown as "Epoch N"."""


class ProgressLog(L.Callback):
    """Rank 0 prints a plain line at the first step, then every `every_s` seconds and at the last step
    (`pipeline.progress.ProgressLines`): step of max_steps, epoch, loss, clips/s, elapsed time and ETA. For logs
    without a terminal, where a bar is unreadable. `clock` (seconds, monotonic) and `out` are injectable for tests."""

    def __init__(self, every_s: float = 60.0, clock: Callable[[], float] = time.monotonic, out: TextIO | None = None):
        if every_s <= 0:
            raise ValueError(f"ProgressLog every_s must be > 0, got {every_s}")
        self.every_s, self.clock, self.out = every_s, clock, out
        self._lines: ProgressLines | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = trainer.max_steps if trainer.max_steps > 0 else None
        self._lines = ProgressLines(total, "letstalk fit: step", interval=self.every_s, first=trainer.global_step,
                                    clock=self.clock, stream=self.out)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not trainer.is_global_zero or self._lines is None:
            return
        metrics, detail = trainer.callback_metrics, f", epoch {trainer.current_epoch}"
        if "train/loss" in metrics:
            detail += f", loss {float(metrics['train/loss']):.4f}"
        if "train/clips_per_s" in metrics:
            detail += f", {float(metrics['train/clips_per_s']):.1f} clips/s"
        self._lines.update(trainer.global_step - self._lines.done, detail)


class LogFirstAndLastStep(L.Callback):
    """Logs the `train/*` metrics of this process's first step and of its last (at the end of training, or when it
    fails) to every logger and flushes them, where `trainer.log_every_n_steps` did not already: a run shorter than
    that, or stopped or crashed before its next logging step, still leaves its metrics. Rows are numbered as
    Lightning numbers its own (step - 1, the epoch the step trained in)."""

    def __init__(self) -> None:
        self._first: int | None = None
        self._latest: tuple[int, int, dict[str, float]] | None = None  # (step, epoch, train metrics) of the last step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        self._latest = (trainer.global_step, trainer.current_epoch, metrics)
        if self._first is None:
            self._first = trainer.global_step
            self._log(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._latest is not None and self._latest[0] != self._first:
            self._log(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)

    def _log(self, trainer: L.Trainer) -> None:
        step, epoch, metrics = self._latest
        if not metrics or step % trainer.log_every_n_steps == 0:  # nothing logged yet, or Lightning logged this step
            return
        for logger in trainer.loggers:
            logger.log_metrics({**metrics, "epoch": float(epoch)}, step=step - 1)
            logger.save()

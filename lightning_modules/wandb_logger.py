"""Lightning's WandbLogger, made to outlive W&B's service process.

SLURM's preemption SIGTERM reaches every process of a task, W&B's service (`wandb-core`) included, which exits on
it. Lightning's logger then raises "Connection lost" at the next step's metrics and ends the rank before it can save
(lightning_modules/requeue.py). This one says so once and stops logging to W&B for the rest of this start; the CSV
log goes on, and the next start resumes the same W&B run (its id is stable: pipeline/cli/train.py).
"""

from __future__ import annotations

import functools
import sys

from lightning.pytorch.loggers import WandbLogger as _WandbLogger


def _unless_lost(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.lost:
            return None
        try:
            return method(self, *args, **kwargs)
        except ConnectionError as error:
            self.lost = True
            print(f"letstalk: W&B's service is gone ({type(error).__name__}: {error}): no W&B logging for the rest "
                  "of this start, the CSV log goes on", file=sys.stderr, flush=True)
            return None

    return wrapper


class WandbLogger(_WandbLogger):
    """WandbLogger whose logging calls stop, with one message, once W&B's service is gone (module doc)."""

    lost = False
    log_metrics = _unless_lost(_WandbLogger.log_metrics)
    log_hyperparams = _unless_lost(_WandbLogger.log_hyperparams)
    log_image = _unless_lost(_WandbLogger.log_image)
    log_video = _unless_lost(_WandbLogger.log_video)
    log_table = _unless_lost(_WandbLogger.log_table)
    after_save_checkpoint = _unless_lost(_WandbLogger.after_save_checkpoint)
    finalize = _unless_lost(_WandbLogger.finalize)

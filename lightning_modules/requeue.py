"""SlurmRequeue: on SLURM's warning signal (USR1 before the time limit) or its preemption signal (SIGTERM, with
GraceTime to spare), save a checkpoint at a step all ranks agree on, requeue the job, stop.
FaultLog: record the error that ends fit, for slurm/train.sbatch's decision to requeue the job after a fault.

Why not Lightning's auto-requeue (`SLURMEnvironment(auto_requeue=True)`, which `letstalk fit` turns off under
SLURM) nor its SIGTERM handler: both run collectives from inside the signal handler (the auto-requeue's checkpoint
save; the SIGTERM handler's broadcast), on every rank. The signal finds each rank at a different point of its step,
and a rank waiting in a collective (a gradient reduce, ...) runs its Python handler only once that collective
returns. The handler's collectives then pair with the other rank's step collectives: gloo aborts with "Received
data size doesn't match expected size" (seen on 2 CPU ranks, tests/test_slurm.py), NCCL typically hangs until its
timeout; either way the job is neither saved nor requeued, and a half-written `hpc_ckpt_N.ckpt` is the newest
checkpoint of the run.

Here the handlers only set a flag (SIGTERM's replaces Lightning's once training starts). At the start of each batch
all ranks take one decision with one all-reduce (any rank signalled: all stop); at the end of the first optimizer
step after it they save one checkpoint together through `trainer.save_checkpoint` (into `<name>.partial`, renamed by
rank 0 once every rank has written: complete or absent), rank 0 runs `scontrol requeue`, and every rank leaves `fit`
at once by `SIGTERMException`, not by `trainer.should_stop` (a stop would run validation and the fit-end hooks).
SLURM restarts the job (SLURM_RESTART_COUNT + 1), which resumes from the newest complete checkpoint
(`--ckpt_path last`, pipeline/cli/train.py).

Preemption (PreemptMode=REQUEUE) sends SIGTERM to the tasks and their children, not to the batch script nor srun;
the loader workers ignore it (datamodules.stream.ignore_sigterm), the rank saves as above. GraceTime later, SLURM
requeues the job: SIGTERM to srun too, which gives the tasks KillWait before it SIGKILLs them. A save not finished
by then stays a `.partial`, which resume skips, and the job resumes from the newest complete checkpoint. A
`scontrol requeue` or scancel reaches srun at once, and the tasks save within KillWait the same way.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_modules.preflight import ConfigError
from lightning_modules.trainer import CheckpointSpaceError
from pipeline import faults
from pipeline.checkpoints import REQUEUE_PREFIX



class SlurmRequeue(Callback):
    """Save, `scontrol requeue` and leave fit at the first optimizer step after USR1 or SIGTERM reached a rank
    (module doc)."""

    def __init__(self, warning: int = signal.SIGUSR1):
        self.warning = warning
        self.signalled: str | None = None  # the signal this rank got
        self.stopping = False  # all ranks agreed to stop
        self._previous: dict[int, object] = {}
        self._step = -1

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.getsignal(s) for s in (self.warning, signal.SIGTERM)}  # restored at teardown
            signal.signal(self.warning, self._on_signal)

    def on_train_start(self, trainer, pl_module) -> None:
        if self._previous:  # after Lightning registered its SIGTERM handler (Trainer._run), which this replaces
            signal.signal(signal.SIGTERM, self._on_signal)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        self.signalled = self.signalled or signal.Signals(signum).name  # nothing collective here: see the module doc

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = trainer.global_step
        if not self.stopping:
            self.stopping = trainer.strategy.reduce_boolean_decision(self.signalled is not None, all=False)
            if self.stopping and self.signalled:
                print(f"letstalk fit: {self.signalled} on rank {trainer.global_rank}: saving at the end of step "
                      f"{trainer.global_step + 1}, then leaving", file=sys.stderr, flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.stopping or trainer.global_step == self._step:  # also within gradient accumulation: no step yet
            return
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the requeue's; we leave anyway (module doc)
        root = Path(trainer.default_root_dir)
        path = root / f"{REQUEUE_PREFIX}{trainer.global_step}.ckpt"
        partial = path.with_name(path.name + ".partial")
        trainer.save_checkpoint(partial)  # every rank; ends with a barrier: all ignore SIGTERM before the requeue
        if trainer.is_global_zero:
            os.replace(partial, path)
            for old in root.glob(f"{REQUEUE_PREFIX}*.ckpt"):
                if old != path:
                    shutil.rmtree(old) if old.is_dir() else old.unlink()
            self._requeue(path)
        raise SIGTERMException  # leave fit now, on every rank (module doc)

    @staticmethod
    def _requeue(path: Path) -> None:
        array = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if array else os.environ.get("SLURM_JOB_ID")
        done = subprocess.run(["scontrol", "requeue", str(job)], capture_output=True, text=True) if job else None
        outcome = ("requeued" if done and done.returncode == 0 else
                   f"not requeued ({done.stderr.strip() if done else 'no SLURM_JOB_ID'})")
        print(f"letstalk fit: saved {path}; job {job} {outcome}; leaving", file=sys.stderr, flush=True)


class FaultLog(Callback):
    """Record the exception that ends fit on this rank, with its step, for slurm/train.sbatch's decision to requeue
    the job or stop (`pipeline.faults`)."""

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, (SIGTERMException, ConfigError)):  # a signal: no fault; a ConfigError: recorded as
            return  # one by pipeline/cli/train.py, which also sees those raised before a trainer exists
        kind = faults.SPACE if isinstance(exception, CheckpointSpaceError) else faults.CRASH
        faults.record(exception, trainer.global_step, trainer.global_rank, kind)

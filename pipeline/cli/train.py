"""`letstalk fit|validate`: LightningCLI over LetsTalkModule and LetsTalkDataModule.

On top of LightningCLI:
- resume: `--ckpt_path last` takes the newest complete one of the ModelCheckpoint `last` checkpoints and the
  requeue checkpoints in the run folder (`requeue-step=N.ckpt`, saved on USR1 by SlurmRequeue; Lightning's older
  `hpc_ckpt_N.ckpt` too); a newer but incomplete one (a save cut short) or damaged one (a file that differs from
  its integrity manifest, lightning_modules/trainer.py) is skipped with a message naming the file, so that it
  cannot fail every restart. A requeued SLURM job (SLURM_RESTART_COUNT > 0) resumes that way even without the
  flag. No complete checkpoint yet: a fresh start.
- SLURM (`srun letstalk fit`): USR1 saves, requeues and stops at an optimizer step all ranks agree on
  (lightning_modules/requeue.py), instead of Lightning's auto-requeue, which saves from inside the signal handler.
- W&B: the run id is kept in `<save_dir>/wandb_run_id` so a resumed or requeued run continues the same
  W&B run. Offline unless WANDB_MODE=online (which also overrides `offline: true` in a config); the API
  key is read by wandb from the environment only and never enters a config.
- refusals: a config that cannot work (DeepSpeed not installed, ...) stops before training with a message
  that names the key to change; errors of our own code (ValueError, OSError, FloatingPointError) are
  printed as one `letstalk fit: error: ...` line (LETSTALK_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import Namespace, set_parsing_settings
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment

from datamodules import LetsTalkDataModule
from lightning_modules.eval_callback import EvalCallback
from lightning_modules.letstalk import LetsTalkModule
from lightning_modules.preflight import ConfigError, preflight
from lightning_modules.progress import LogFirstAndLastStep, ProgressLog, StepProgressBar
from lightning_modules.requeue import FaultLog, SlurmRequeue
from lightning_modules.trainer import LetsTalkTrainer
from pipeline import faults
from pipeline.checkpoints import REQUEUE_PREFIX, manifest_path, newest_complete, verify_checkpoint
from pipeline.cli.config_keys import unknown_keys

WANDB_ID_FILE = "wandb_run_id"


def say(message: str) -> None:
    """One line on stderr from global rank 0 only (every rank of a job runs the same code and would repeat it)."""
    if rank_zero_only.rank == 0:
        print(f"letstalk fit: {message}", file=sys.stderr, flush=True)


def _as_list(value: Any) -> list:
    return [] if value in (None, False, True) else value if isinstance(value, list) else [value]


def _class_path(entry: Any) -> str:
    return str(entry.get("class_path", "")) if isinstance(entry, (dict, Namespace)) else str(entry)


def check_trainer_config(trainer: Namespace | dict) -> None:
    """Refuse trainer settings that cannot work here, naming the key to change."""
    strategy = trainer.get("strategy")
    name = _class_path(strategy)
    if "deepspeed" not in name.lower():
        return
    try:
        import deepspeed  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"trainer.strategy is DeepSpeed but deepspeed is not importable ({err}); "
                          "pip install -e '.[deepspeed]' or use --trainer.strategy ddp") from None
    accelerator = str(trainer.get("accelerator") or "auto").lower()
    if name != "lightning_modules.strategies.DeepSpeedStrategy" and (accelerator == "cpu" or not torch.cuda.is_available()):
        raise ConfigError(f"trainer.strategy {name} runs on CUDA GPUs only; lightning_modules.strategies.DeepSpeedStrategy "
                          "(configs/trainer/zero*.yaml) takes the same arguments and also runs on CPU processes")


def stable_wandb_id(save_dir: str | Path) -> str | None:
    """The W&B run id of the run folder: read from `<save_dir>/wandb_run_id`, created by rank 0 on first start
    (WANDB_RUN_ID when a W&B sweep agent set it, else a random id). Other ranks never log to W&B."""
    path = Path(save_dir) / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    if rank_zero_only.rank != 0:
        return None
    run_id = os.environ.get("WANDB_RUN_ID") or uuid.uuid4().hex[:8]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(run_id)
    tmp.replace(path)
    return run_id


def resume_checkpoint(trainer, ckpt_path: str | None) -> str | None:
    """Resolve `last` (and a SLURM requeue without --ckpt_path) to the newest complete and intact last/requeue
    checkpoint (`pipeline.checkpoints.newest_complete`); each one skipped is named with why. Every rank verifies
    (this runs before the process group exists, and all must take the same one): each reads the checkpoint once,
    from the page cache after the first on a node. An explicit path is verified too: a damaged one stops the run
    (CheckpointIntegrityError names the file), one without a manifest is used with a warning."""
    if ckpt_path is None and int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0:
        ckpt_path = "last"
    if ckpt_path != "last":
        if ckpt_path is not None and Path(ckpt_path).exists() and verify_checkpoint(ckpt_path) is None:  # damaged: raises
            say(f"{ckpt_path} has no integrity manifest (written before checkpoints carried one, or by another tool): "
                "resuming from it unverified")
        return ckpt_path
    root = Path(trainer.default_root_dir)
    candidates = [*root.glob(f"{REQUEUE_PREFIX}*.ckpt"), *root.glob("hpc_ckpt_*.ckpt")]
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            candidates += Path(callback.dirpath).glob(f"{callback.CHECKPOINT_NAME_LAST}*{callback.FILE_EXTENSION}")
    expected = any(manifest_path(path).is_file() for path in candidates)  # else: a run from before manifests
    newest, skipped = newest_complete(candidates, expected)
    for path, kind, why in skipped:
        say(f"skipping {kind} checkpoint {path}: {why}")
    if newest is None:
        say(f"no complete last or requeue checkpoint under {root}: starting from scratch")
        return None
    unverified = "" if expected else " (no integrity manifest: its structure was checked, not its bytes)"
    say(f"resuming from {newest}{unverified}")
    return str(newest)


class LogConfigCallback(SaveConfigCallback):
    """Writes config.yaml to the log folder (LightningCLI's default) with the network config as it runs (sized from
    the data, `LetsTalkModule.resolve`: no "auto" left), and logs the resolved config to W&B."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.already_saved and isinstance(pl_module, LetsTalkModule):
            net = pl_module.resolve()
            self.config = self.config.clone()
            for key, value in asdict(net).items():
                self.config[f"model.net.{key}"] = value
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        resolved = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_hyperparams({"config": resolved})


class LetsTalkCLI(LightningCLI):
    """LightningCLI with stable W&B run ids, resume resolution and config refusals (see the module doc), running
    LetsTalkTrainer (every checkpoint complete or absent, with its integrity manifest: lightning_modules/trainer.py)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_class", LetsTalkTrainer)
        super().__init__(*args, **kwargs)

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand)
        if config is None:
            return
        check_trainer_config(config.trainer)
        online = os.environ.get("WANDB_MODE") == "online"
        for entry in _as_list(config.trainer.get("logger")):
            if not _class_path(entry).endswith("WandbLogger"):
                continue
            args = entry.init_args
            if online:
                args.offline = False
            if args.get("id") is None and args.get("version") is None:
                args.id = stable_wandb_id(args.get("save_dir") or config.trainer.get("default_root_dir") or ".")

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--evaluation", type=bool, default=True,
                            help="false: leave out the EvalCallback(s) of trainer.callbacks (a quick start, a debug run)")

    def instantiate_trainer(self, **kwargs: Any):
        """The trainer's callbacks, completed: without EvalCallback under `--evaluation false`; a progress bar on a
        terminal, else plain progress lines (`lightning_modules.progress`); the first and last steps' metrics always
        logged; under SLURM, SlurmRequeue acting on USR1 with Lightning's own auto-requeue off (one mechanism only)
        and FaultLog recording a fault for train.sbatch's restart decision."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = _as_list(config.get("callbacks"))
        if not self._get(self.config_init, "evaluation", default=True):
            callbacks = [c for c in callbacks if not isinstance(c, EvalCallback)]
        if not any(isinstance(c, ProgressBar) for c in callbacks):
            if config.get("enable_progress_bar") is not False and sys.stderr.isatty():
                callbacks.append(StepProgressBar())
            else:
                kwargs["enable_progress_bar"] = False
                callbacks.append(ProgressLog())
        callbacks.append(LogFirstAndLastStep())
        if self.subcommand == "fit" and SLURMEnvironment.detect():
            plugins = [p for p in _as_list(config.get("plugins")) if not isinstance(p, SLURMEnvironment)]
            kwargs["plugins"] = [*plugins, SLURMEnvironment(auto_requeue=False)]
            callbacks += [SlurmRequeue(), FaultLog()]
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        """The run's checks first (`preflight`), before fit starts the loggers (a W&B run, a log folder): a run that
        cannot start leaves nothing behind. Then `--ckpt_path last` resolved."""
        self.datamodule.trainer = self.trainer  # as fit attaches it: the checks count the ranks' loader slots
        preflight(self.model, self.datamodule)
        fit = self.config_init["fit"]
        fit["ckpt_path"] = resume_checkpoint(self.trainer, fit.get("ckpt_path"))


def run_lightning_cli(argv: list[str]) -> LightningCLI:
    """Parse `argv` (starting with the subcommand) and run it; `--config` files compose left to right.

    Configs may interpolate other keys, resolved after all configs and flags are merged, e.g.
    `dirpath: ${trainer.default_root_dir}/checkpoints` follows a `--trainer.default_root_dir` flag.
    """
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)  # `${trainer.x}` under any subcommand
    warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
    # noise in every rank's log: a torch deprecation inside Lightning, and a DataLoader caution that TrainClips
    # answers (each worker yields its own share of the epoch plan)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    warnings.filterwarnings("ignore", message=".*Your `IterableDataset` has `__len__` defined.*")
    problems = unknown_keys(argv[1:])
    if problems:
        if rank_zero_only.rank == 0:
            listed = "\n".join(f"  {problem}" for problem in problems)
            print(f"letstalk {argv[0]}: error: {len(problems)} unknown key{'s' * (len(problems) > 1)}:\n{listed}\n"
                  f"tip: `letstalk {argv[0]} --help` lists the options, `--print_config` the resolved config",
                  file=sys.stderr, flush=True)
        faults.record(SystemExit(f"{len(problems)} unknown keys"), None, rank_zero_only.rank, faults.CONFIG)
        raise SystemExit(2)
    try:
        return LetsTalkCLI(LetsTalkModule, LetsTalkDataModule, args=argv, save_config_callback=LogConfigCallback,
                           save_config_kwargs={"overwrite": True},
                           parser_kwargs={"parser_mode": "omegaconf+"})
    except (ValueError, OSError, FloatingPointError) as err:
        if os.environ.get("LETSTALK_DEBUG"):
            raise
        rank = rank_zero_only.rank
        if rank == 0 or not isinstance(err, ConfigError):  # a ConfigError is the same on every rank: said once
            where = "" if rank == 0 else f" (rank {rank})"
            print(f"letstalk {argv[0] if argv else 'fit'}{where}: error: {err}", file=sys.stderr, flush=True)
        # for train.sbatch (unless FaultLog recorded it in fit); a ConfigError would fail the same way again
        faults.record(err, None, rank, faults.CONFIG if isinstance(err, ConfigError) else faults.CRASH)
        raise SystemExit(1) from None
    except SystemExit as exit:
        if exit.code == 2:  # the parser's: a bad option or value
            faults.record(exit, None, rank_zero_only.rank, faults.CONFIG)
        raise
    except Exception as err:  # any other error, e.g. TooManyBadSamples from the checks before fit
        faults.record(err, None, rank_zero_only.rank)
        raise
    finally:
        # WandbLogger leaves its run open; close it so a later run in this process starts its own. (wandb is
        # imported by then if a WandbLogger ran; a run without one, e.g. on a GPU image without wandb, needs none.)
        wandb = sys.modules.get("wandb")
        if wandb is not None and wandb.run is not None:
            try:
                wandb.finish()
            except ConnectionError:  # its service is gone (lightning_modules/wandb_logger.py): close the connection
                with contextlib.suppress(ConnectionError):  # here, not in W&B's atexit hook, which prints the error
                    wandb.teardown()

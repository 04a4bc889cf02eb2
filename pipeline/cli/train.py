"""`letstalk fit|validate`: LightningCLI over LetsTalkModule and LetsTalkDataModule."""

from __future__ import annotations

import warnings

import wandb
from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI

from datamodules import LetsTalkDataModule
from lightning_modules.letstalk import LetsTalkModule


def run_lightning_cli(argv: list[str]) -> LightningCLI:
    """Parse `argv` (starting with the subcommand) and run it; `--config` files compose left to right.

    Configs may interpolate other keys, resolved after all configs and flags are merged, e.g.
    `dirpath: ${trainer.default_root_dir}/checkpoints` follows a `--trainer.default_root_dir` flag.
    """
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)  # `${trainer.x}` under any subcommand
    warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
    try:
        return LightningCLI(LetsTalkModule, LetsTalkDataModule, args=argv, save_config_kwargs={"overwrite": True},
                            parser_kwargs={"parser_mode": "omegaconf+"})
    finally:
        # WandbLogger leaves its run open; close it so a later run in this process starts its own.
        if wandb.run is not None:
            wandb.finish()

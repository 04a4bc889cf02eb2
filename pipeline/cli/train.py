"""`letstalk fit|validate`: LightningCLI over LetsTalkModule and LetsTalkDataModule."""

from __future__ import annotations

import warnings

from lightning.pytorch.cli import LightningCLI

from datamodules import LetsTalkDataModule
from lightning_modules.letstalk import LetsTalkModule


def run_lightning_cli(argv: list[str]) -> LightningCLI:
    """Parse `argv` (starting with the subcommand) and run it; `--config` files compose left to right."""
    warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
    return LightningCLI(LetsTalkModule, LetsTalkDataModule, args=argv, save_config_kwargs={"overwrite": True})

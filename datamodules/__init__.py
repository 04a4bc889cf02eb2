"""Shards -> batches for the LightningModules."""

from __future__ import annotations

from datamodules.letstalk import LetsTalkDataModule

__all__ = ["LetsTalkDataModule"]

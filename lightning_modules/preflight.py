"""Checks that a training run can work, made before anything expensive, with every problem in one message.

A launch on many GPUs should not build networks, start DeepSpeed, preload evaluation clips or fork loader
workers only to stop on a setting. `preflight` runs in `LetsTalkModule.setup`: after the DataModule has read
the manifest and the index (global rank 0 reads them, the other ranks receive them), before the network is
built. Every rank checks the same inputs, so every rank stops alike; `letstalk fit` prints the message once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from pipeline.models.dit import DiTConfig
from pipeline.shards import DataWarning


class ConfigError(ValueError):
    """A configuration that cannot work, found before training starts."""


def preflight(module: Any, datamodule: Any) -> DiTConfig:
    """The run's network config sized from the data (`LetsTalkModule.resolve`), once everything below holds;
    else ConfigError listing each problem with the setting to change:

    - the model's data sizes (latent channels, audio features and tokens) agree with the data;
    - some segment is long enough for a clip and its motion frames, and some of those are training segments;
    - every loader slot (ranks x data.num_workers) gets at least one training segment;
    - a file the run reads at start (model.init_from.path) exists.

    Warns (once, rank 0) when the validation split is empty: validation and evaluation then use training segments.
    """
    problems: list[str] = []
    try:
        net = module.resolve(datamodule)
    except ValueError as err:
        problems.append(str(err))
        net = DiTConfig(**module.hparams["net"])  # its long-video settings do not depend on the data
    try:
        datamodule.set_context(net)
        datamodule.train_batches_per_epoch  # noqa: B018 - raises when the training segments cannot fill the slots
    except ValueError as err:
        if str(err) not in problems:  # the data's own refusal, met again
            problems.append(str(err))
    spec = module.hparams.get("init_from")
    if spec and not Path(spec["path"]).is_file():
        problems.append(f"model.init_from.path: {spec['path']} does not exist")
    if problems:
        listed = "\n".join(f"  {i}. {problem}" for i, problem in enumerate(problems, 1))
        raise ConfigError(f"this run cannot start ({len(problems)} problem{'s' * (len(problems) > 1)}):\n{listed}")
    if datamodule.train_samples and not datamodule.val_samples:
        speakers = len({datamodule.speaker_of(s.key) for s in datamodule.train_samples})
        rank_zero_warn(f"{datamodule.root}: the validation split is empty ({speakers} speakers, all in train); "
                       "validation and evaluation use training segments. Give some speakers split=val in the "
                       "prepare list, or set data.val_percent", category=DataWarning)
    return net

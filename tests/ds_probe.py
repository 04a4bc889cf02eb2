"""Callbacks that `letstalk fit` subprocesses of tests/test_deepspeed.py and tests/test_two_nodes.py load by class path
(tests/ is on their PYTHONPATH): they record what DeepSpeed holds in memory, for comparison with what was written to
disk, and where each rank ran and what it trained on."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file


class SaveGathered(L.Callback):
    """At the end of fit: the live weights gathered by DeepSpeed (`zero.GatheredParameters`) and the EMA network
    (`LetsTalkModule.ema_network`, DeepSpeed's tensor-fragment API), written by rank 0 to `<path>`."""

    def __init__(self, path: str):
        self.path = path

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ema = pl_module.ema_network().state_dict()
        partitioned = [p for p in pl_module.net.parameters() if hasattr(p, "ds_id")]
        if partitioned:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(partitioned)
        else:
            gather = contextlib.nullcontext()
        with gather:
            net = {k: v.detach().float().clone() for k, v in pl_module.net.state_dict().items()}
        if trainer.is_global_zero:
            save_file({**{f"net.{k}": v for k, v in net.items()}, **{f"ema.{k}": v for k, v in ema.items()}},
                      self.path)


class RecordBatches(L.Callback):
    """Rank 0 appends the keys and clip starts of each training batch it trains on to `<path>` (JSON lines)."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.is_global_zero:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": trainer.global_step, "keys": list(batch["key"]),
                                    "start": [int(s) for s in torch.as_tensor(batch["start"])]}) + "\n")


class RecordRanks(L.Callback):
    """Every rank writes `<folder>/rank<global rank>.jsonl`: at the start of training where it runs (global, local and
    node rank, world size, the SLURM node and task it is), then the keys and clip starts of each training batch."""

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def _write(self, trainer: L.Trainer, record: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / f"rank{trainer.global_rank}.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_start(self, trainer, pl_module) -> None:
        self._write(trainer, {"global_rank": trainer.global_rank, "local_rank": trainer.local_rank,
                              "node_rank": trainer.node_rank, "world_size": trainer.world_size,
                              "num_nodes": trainer.num_nodes, "slurm_node": os.environ.get("SLURMD_NODENAME"),
                              "slurm_procid": os.environ.get("SLURM_PROCID"), "step": trainer.global_step})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._write(trainer, {"step": trainer.global_step, "keys": list(batch["key"]),
                              "start": [int(s) for s in torch.as_tensor(batch["start"])]})

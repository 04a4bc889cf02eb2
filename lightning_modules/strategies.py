"""DeepSpeedStrategy: Lightning's DeepSpeed ZeRO strategy on CUDA GPUs and, for smoke tests, on CPU processes.

Lightning's own `DeepSpeedStrategy` refuses any accelerator but CUDA. DeepSpeed itself runs on CPU
processes (its CPU accelerator, `gloo`), so with `--trainer.accelerator cpu` this subclass runs the
same ZeRO-2/3 code a cluster runs (partitioning, checkpoint folders, offload, bf16), slowly but for
real: a cluster config can be tried on a laptop, and CI tests the real thing. On GPUs it is exactly
Lightning's strategy.

Also, against Lightning's defaults:
- the micro batch size DeepSpeed wants for its logging comes from the DataModule's `batch_size`
  (Lightning reads `train_dataloader().batch_sampler`, which our streaming loader has not);
- the network is built whole, not under `zero.Init` (see `model_sharded_context`);
- a checkpoint folder written by another number of ranks is refused before DeepSpeed reads it
  (ZeRO partitions belong to ranks: a silent wrong resume is worse than none);
- on CPU, DeepSpeed's shared-memory all-reduce op is not compiled: its communication backend JIT-builds it
  with the machine's C++ compiler at start-up, but only its own launcher (which sets LOCAL_SIZE) switches it
  on, and only inference all-reduces use it, so under Lightning the build is pure start-up cost and a
  compiler dependency (and a lock file that a killed build leaves behind makes every later start wait).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies import DeepSpeedStrategy as LightningDeepSpeedStrategy

from pipeline.checkpoints import written_by


class DeepSpeedStrategy(LightningDeepSpeedStrategy):
    """ZeRO stage 1/2/3 with optional CPU offload (all `lightning.pytorch.strategies.DeepSpeedStrategy` arguments),
    on CUDA GPUs or on CPU processes (see the module docstring)."""

    def _on_cpu(self) -> bool:
        return not isinstance(self.accelerator, CUDAAccelerator)

    def setup_environment(self) -> None:
        if self._on_cpu():  # skip Lightning's CUDA-only check
            DDPStrategy.setup_environment(self)
        else:
            super().setup_environment()

    @property
    def root_device(self) -> torch.device:
        if self._on_cpu():  # DeepSpeed reads the device index as this process's local rank
            return torch.device("cpu", self.local_rank)
        return super().root_device

    def setup_distributed(self) -> None:
        if self._on_cpu():  # Lightning's version validates CUDA device indices
            import deepspeed.ops
            from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

            deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False  # see the module docstring
            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()
        else:
            super().setup_distributed()

    @contextmanager
    def model_sharded_context(self) -> Iterator[None]:
        """Build the network whole; `deepspeed.initialize` partitions it for ZeRO-3. Under `zero.Init` each submodule is
        partitioned as soon as it is built, so initialisation done afterwards in place (adaLN-Zero's zeros, ...) would
        be lost and ZeRO-3 would train another network than DDP. Every registry size fits one device whole."""
        yield

    def _auto_select_batch_size(self) -> int:
        datamodule = self.lightning_module.trainer.datamodule
        size = getattr(datamodule, "batch_size", None)
        return int(size) if size else super()._auto_select_batch_size()

    @property
    def offload_optimizer(self) -> bool:
        """True when the optimizer state lives on the CPU: DeepSpeed then requires its own CPU Adam."""
        self._init_config_if_needed()
        zero = self.config.get("zero_optimization", {})
        return zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        ranks = written_by(checkpoint_path)
        if ranks is not None and ranks != self.world_size:
            raise ValueError(
                f"{checkpoint_path}: this DeepSpeed checkpoint was written by {ranks} ranks and cannot resume on "
                f"{self.world_size}: ZeRO partitions its optimizer state by rank. Resume it with {ranks} ranks "
                "(--trainer.num_nodes x --trainer.devices), or take its weights with `letstalk export "
                f"{checkpoint_path} --out model.safetensors --ema` for generation and evaluation")
        return super().load_checkpoint(checkpoint_path, weights_only)

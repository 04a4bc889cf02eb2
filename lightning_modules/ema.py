"""EMA of the trained weights, kept by the optimizer beside Adam's moments.

Why in the optimizer: the tensors an optimizer updates are the fp32 master weights under every
strategy: the module's own parameters on one device or under DDP, this rank's flat fp32 partitions
under DeepSpeed ZeRO-1/2/3 (in CPU memory with optimizer offload). An EMA kept as
`optimizer.state[p]["ema"]` is therefore fp32 under bf16, partitioned exactly like Adam's state
under ZeRO (no gather and no communication per step), offloaded with it, saved and restored with
it by every strategy's checkpointing, and untouched by `torch.compile`. It starts at the weights
after the first update and follows them with decay min(ema_decay, (1 + n) / (10 + n)) after
update n. Reading it back as network weights (`ema_state_dict`) maps it onto the module's
parameters: directly without DeepSpeed, through DeepSpeed's tensor-fragment API under ZeRO.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import nn

from pipeline.checkpoints import EMA_KEY

COUNT_KEY = "ema_updates"


@torch.no_grad()
def update_ema(optimizer: torch.optim.Optimizer, max_decay: float) -> None:
    """After an optimizer update: ema <- decay·ema + (1 - decay)·weights for every tensor of its param groups."""
    for group in optimizer.param_groups:
        emas, weights = [], []
        for p in group["params"]:
            state = optimizer.state[p]
            if EMA_KEY in state:
                emas.append(state[EMA_KEY])
                weights.append(p.detach())
                state[COUNT_KEY] += 1
            else:  # the first update
                state[EMA_KEY], state[COUNT_KEY] = p.detach().clone(), 1
        if emas:
            n = optimizer.state[group["params"][0]][COUNT_KEY]  # updates so far, alike in the group
            torch._foreach_lerp_(emas, weights, 1 - min(max_decay, (1 + n) / (10 + n)))


@cache
def with_ema(optimizer_class: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """`optimizer_class` whose `step` also updates the EMA (any torch optimizer, or DeepSpeed's CPU Adam)."""

    class WithEMA(optimizer_class):
        def __init__(self, params, ema_decay: float, **kwargs):
            super().__init__(params, **kwargs)
            self.ema_decay = ema_decay
            self.skip_next_step = False  # set for a step that must change nothing (a non-finite loss)

        def step(self, closure=None, **kwargs):
            loss = None
            if closure is not None:  # Lightning's closure runs training_step, which may ask to skip this step
                with torch.enable_grad():
                    loss = closure()
            if self.skip_next_step:
                self.skip_next_step = False
                return loss
            super().step(**kwargs)
            update_ema(self, self.ema_decay)
            return loss

    WithEMA.__name__ = WithEMA.__qualname__ = f"{optimizer_class.__name__}WithEMA"
    return WithEMA


def base_optimizer(optimizer: object) -> torch.optim.Optimizer:
    """The optimizer that holds the EMA, under Lightning's wrapper (which copies its attributes, so unwrap it
    first) and DeepSpeed's ZeRO optimizer."""
    optimizer = getattr(optimizer, "_optimizer", optimizer)
    while not hasattr(optimizer, "ema_decay"):
        if not hasattr(optimizer, "optimizer"):
            raise TypeError(f"{type(optimizer).__name__} keeps no EMA (build it with lightning_modules.ema.with_ema)")
        optimizer = optimizer.optimizer
    return optimizer


def _zero_partitioned(p: nn.Parameter) -> bool:
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


@torch.no_grad()
def ema_state_dict(net: nn.Module, optimizer: object | None) -> dict[str, torch.Tensor]:
    """The whole network's EMA weights in fp32 (buffers as they are), on every rank: a collective under ZeRO.

    Before the first update (or without an optimizer) the EMA is the weights themselves.
    """
    base = base_optimizer(optimizer) if optimizer is not None else None
    started = base is not None and any(EMA_KEY in s for s in base.state.values())  # alike on every rank
    out: dict[str, torch.Tensor] = {}
    for name, p in net.named_parameters():
        if _zero_partitioned(p):
            from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

            value = safe_get_full_optimizer_state(p, EMA_KEY) if started else safe_get_full_fp32_param(p)
            shape = p.ds_shape if hasattr(p, "ds_shape") else p.shape
            out[name] = value.detach().float().reshape(shape).clone()
        else:
            value = base.state.get(p, {}).get(EMA_KEY, p) if started else p
            out[name] = value.detach().float().clone()
    persistent = net.state_dict().keys()
    out.update({name: b.detach().clone() for name, b in net.named_buffers() if name in persistent})
    return out

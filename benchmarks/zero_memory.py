"""Memory per GPU of every registry size (S, B, L, XL) for training on 8 GPUs (1 node) and 64 GPUs (8 nodes of 8):
model states under DDP, ZeRO-2, ZeRO-3 and ZeRO-3 with CPU offload, and activations of one 16-frame 256² clip.

Model states come from DeepSpeed's own estimators (`estimate_zero2_model_states_mem_needs`,
`estimate_zero3_model_states_mem_needs`, the functions behind the `*_all_cold` printers; `--deepspeed-tables`
prints those too), with our EMA added: DeepSpeed does not know it, and it lives in the optimizer state (fp32,
4 B/param, `lightning_modules.ema`), so it is partitioned like Adam's moments under ZeRO. DDP is counted here:
mixed-precision AdamW keeps 16 B/param (fp32 weights 4 + grads 4 + Adam moments 8), + EMA 4. ZeRO-3 figures are
those for `zero_init=False`, as our strategy builds the network whole (`DeepSpeedStrategy.model_sharded_context`).
Parameter counts come from each network built on the meta device (4×32×32 SD-VAE latents, patch 2, wav2vec2-size
audio: 768-d, 10 vectors per frame window, as `benchmarks/model_sizes.py`).

Activations: the memory autograd keeps for backward after the forward of the training loss
(`LetsTalkModule._loss`, batch 1, 16 frames of 32×32 latents = 256 tokens/frame, weights in bf16 as DeepSpeed casts
them, activation checkpointing off, the default), counted exactly as the bytes of the distinct storages that
`torch.autograd.graph.saved_tensors_hooks` sees, parameters excluded. It is counted on the meta device, with the
kernels a GPU runs: SDPA as FlashAttention (saves q, k, v, output, fp32 logsumexp) and RMSNorm as the fused CUDA
kernel (saves input and fp32 rstd; on CPU and meta RMSNorm decomposes into fp32 ops that save more). The counting
is checked on real CPU tensors at tiny and S (full clip, bf16): meta with the CPU kernels must match the real run's
saved bytes (up to LayerNorm's mean/rstd, bf16 on CPU and fp32 on CUDA and meta), and a dispatch-mode tracker of
every storage still alive after the forward must match the saved bytes. With checkpointing on, only live storages
count (the checkpoint's own hooks hide the rest); its backward peak adds about one block's activations.

    python benchmarks/zero_memory.py [--buffer-factor 1.5] [--skip-check] [--threads 1] [--deepspeed-tables]
                                     [--json benchmarks/zero_memory.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from deepspeed.runtime.zero.stage3 import (estimate_zero3_model_states_mem_needs,
                                           estimate_zero3_model_states_mem_needs_all_cold)
from deepspeed.runtime.zero.stage_1_and_2 import (estimate_zero2_model_states_mem_needs,
                                                  estimate_zero2_model_states_mem_needs_all_cold)
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lightning_modules.letstalk import LetsTalkModule
from pipeline.models.dit import DiTConfig, LetsTalkDiT

FRAMES, CHANNELS, LATENT, PATCH, AUDIO_DIM, AUDIO_TOKENS = 16, 4, 32, 2, 768, 10
SIZES = ("S", "B", "L", "XL")
CHECK_SIZES = ("tiny", "S")  # real CPU forwards: ~1 s and ~10 s on one core
GPUS_PER_NODE = 8
SETUPS = {8: 1, 64: 8}  # GPUs: nodes
DIFFUSION = {"objective": "flow", "timestep_sampling": "logit_normal"}  # configs/base.yaml
ADAM_BYTES, EMA_BYTES = 16, 4  # per param: fp32 weights + fp32 grads + Adam m, v; the EMA in the optimizer state
GiB = 2**30


def net_config(size: str, checkpointing: bool = False) -> DiTConfig:
    return DiTConfig(size=size, latent_channels=CHANNELS, patch_size=PATCH, audio_dim=AUDIO_DIM,
                     audio_tokens=AUDIO_TOKENS, grad_checkpointing=checkpointing)


# -- model states ---------------------------------------------------------------------------------
def count_params(size: str) -> tuple[int, int]:
    """(total params, largest layer's params) as DeepSpeed's `model_to_params` counts them (a layer: one module's
    own parameters), of the network built on the meta device (DeepSpeed dedupes by data_ptr, 0 on meta: no
    parameter is shared, so a plain sum)."""
    with torch.device("meta"):
        net = LetsTalkDiT(net_config(size))
    total = sum(p.numel() for p in net.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in net.modules())
    return total, largest


def model_states(total: int, largest: int, gpus: int, buffer: float) -> dict[str, dict[str, float]]:
    """Bytes per GPU and CPU bytes per node of each strategy, DeepSpeed's estimate plus our EMA."""
    nodes = SETUPS[gpus]
    ema_rank = EMA_BYTES * total / gpus  # this rank's EMA partition under ZeRO
    kw = dict(num_gpus_per_node=GPUS_PER_NODE, num_nodes=nodes, additional_buffer_factor=buffer)
    z2_cpu, z2_gpu = estimate_zero2_model_states_mem_needs(total, cpu_offload=False, **kw)
    z3_cpu, z3_gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, cpu_offload=False,
                                                              cpu_offload_params=False, zero_init=False, **kw)
    off_cpu, off_gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, cpu_offload=True,
                                                                cpu_offload_params=True, zero_init=False, **kw)
    off_cpu_init, _, _ = estimate_zero3_model_states_mem_needs(total, largest, cpu_offload=True,
                                                               cpu_offload_params=True, zero_init=True, **kw)
    return {
        "DDP": {"gpu": (ADAM_BYTES + EMA_BYTES) * total, "cpu_per_node": None, "deepspeed_gpu": None,
                "ema_gpu": EMA_BYTES * total},
        "ZeRO-2": {"gpu": z2_gpu + ema_rank, "cpu_per_node": z2_cpu, "deepspeed_gpu": z2_gpu, "ema_gpu": ema_rank},
        "ZeRO-3": {"gpu": z3_gpu + ema_rank, "cpu_per_node": z3_cpu, "deepspeed_gpu": z3_gpu, "ema_gpu": ema_rank},
        "ZeRO-3 offload": {"gpu": off_gpu, "cpu_per_node": off_cpu + ema_rank * GPUS_PER_NODE, "deepspeed_gpu": off_gpu,
                           "deepspeed_cpu_per_node": off_cpu, "ema_cpu_per_node": ema_rank * GPUS_PER_NODE,
                           "deepspeed_cpu_per_node_zero_init": off_cpu_init},
    }


# -- activations ----------------------------------------------------------------------------------
class _FusedRMSNorm(torch.autograd.Function):
    """What CUDA's fused `_fused_rms_norm` keeps for backward (input, fp32 rstd, weight), on meta tensors."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, dims: int) -> torch.Tensor:
        rstd = x.new_empty((*x.shape[: x.dim() - dims], *(1,) * dims), dtype=torch.float32)
        ctx.save_for_backward(x, rstd, weight)
        return torch.empty_like(x)


@contextlib.contextmanager
def kernels(kind: str) -> Iterator[None]:
    """Meta tensors run the kernels of `kind`: "gpu" (FlashAttention, fused RMSNorm) or "cpu" (flash attention for
    CPU, composite RMSNorm); otherwise meta's SDPA decomposes into matmuls that save the attention matrix."""
    sdpa, rms_norm = F.scaled_dot_product_attention, F.rms_norm
    if kind == "gpu":
        F.scaled_dot_product_attention = lambda q, k, v: torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[0]
        F.rms_norm = lambda x, shape, weight=None, eps=None: _FusedRMSNorm.apply(x, weight, len(shape))
    elif kind == "cpu":
        F.scaled_dot_product_attention = lambda q, k, v: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v)[0]
    try:
        yield
    finally:
        F.scaled_dot_product_attention, F.rms_norm = sdpa, rms_norm


class LiveStorages(TorchDispatchMode):
    """Every storage an op creates, held weakly: those still alive at the end are what the forward left allocated."""

    def __init__(self):
        super().__init__()
        self.seen: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                old = self.seen.get(storage._cdata)
                if old is None or old[0].expired():
                    self.seen[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
        return out

    def alive(self, exclude: set[int]) -> int:
        return sum(n for k, (ref, n) in self.seen.items() if not ref.expired() and k not in exclude)


def activations(size: str, device: str, kind: str = "", checkpointing: bool = False) -> dict:
    """Bytes kept for backward by the forward of the training loss of one bf16 clip, on `device` with `kind` kernels."""
    torch.manual_seed(0)
    with torch.device(device):
        module = LetsTalkModule(net=net_config(size, checkpointing), diffusion=DIFFUSION, data_info={"benchmark": 1})
    net = module.net.to(torch.bfloat16)
    params = {p.untyped_storage()._cdata for p in net.parameters()}
    batch = {"latents": torch.randn(1, FRAMES, CHANNELS, LATENT, LATENT, device=device),
             "ref": torch.randn(1, 1, CHANNELS, LATENT, LATENT, device=device),
             "audio": torch.randn(1, FRAMES, AUDIO_TOKENS, AUDIO_DIM, device=device)}
    saved: dict[int, int] = {}
    per_block = [0] * len(net.blocks)
    current: list[int | None] = [None]

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in params and key not in saved:
            saved[key] = t.untyped_storage().nbytes()
            if current[0] is not None:
                per_block[current[0]] += saved[key]
        return t

    hooks = [h for i, block in enumerate(net.blocks) for h in (
        block.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i)),
        block.register_forward_hook(lambda m, a, o: current.__setitem__(0, None)))]
    live = LiveStorages()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), kernels(kind), live:
        loss = module._loss(batch)
    seconds = time.perf_counter() - start
    for h in hooks:
        h.remove()
    assert loss.requires_grad
    return {"saved_bytes": sum(saved.values()), "live_bytes": live.alive(params), "max_block_bytes": max(per_block),
            "seconds": seconds}


# -- report ---------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--buffer-factor", type=float, default=1.5, help="DeepSpeed's additional_buffer_factor")
    parser.add_argument("--skip-check", action="store_true", help="skip the real CPU forwards at tiny and S")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for the real forwards")
    parser.add_argument("--deepspeed-tables", action="store_true", help="also print DeepSpeed's *_all_cold tables")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.process_time()

    rows = []
    for size in SIZES:
        total, largest = count_params(size)
        row = {"size": size, "params": total, "params_M": total / 1e6, "largest_layer_params": largest,
               "model_states": {gpus: model_states(total, largest, gpus, args.buffer_factor) for gpus in SETUPS}}
        if args.deepspeed_tables:
            for gpus, nodes in SETUPS.items():
                estimate_zero2_model_states_mem_needs_all_cold(total, GPUS_PER_NODE, nodes, args.buffer_factor)
                estimate_zero3_model_states_mem_needs_all_cold(total, largest, GPUS_PER_NODE, nodes, args.buffer_factor)
        gpu = activations(size, "meta", "gpu")
        ckpt = activations(size, "meta", "gpu", checkpointing=True)
        row["activations"] = {
            "gpu_kernels": gpu, "cpu_kernels": activations(size, "meta", "cpu"),
            "checkpointing_gpu_kernels": ckpt,
            "checkpointing_peak_estimate_bytes": ckpt["live_bytes"] + gpu["max_block_bytes"]}
        rows.append(row)

    checks = []
    if not args.skip_check:
        for size in CHECK_SIZES:
            real, meta = activations(size, "cpu"), activations(size, "meta", "cpu")
            checks.append({"size": size, "real_cpu": real, "meta_cpu_kernels": meta,
                           "meta_vs_real": meta["saved_bytes"] / real["saved_bytes"] - 1,
                           "live_vs_saved_real": real["live_bytes"] / real["saved_bytes"] - 1})

    def g(x: float | None) -> str:
        return "-" if x is None else f"{x / GiB:.2f}" if x >= 0.1 * GiB else f"{x / GiB:.3f}"

    cols = ["DDP", "ZeRO-2", "ZeRO-3", "ZeRO-3 offload"]
    head = ["size", "params_M"] + [f"{c}@{n}" for n in SETUPS for c in cols + ["offload CPU/node"]]
    print("Model states, GiB per GPU (offload CPU/node: GiB of host memory per node of 8 GPUs), "
          f"additional_buffer_factor={args.buffer_factor}")
    print(" | ".join(head))
    for row in rows:
        cells = [row["size"], f"{row['params_M']:.1f}"]
        for gpus in SETUPS:
            states = row["model_states"][gpus]
            cells += [g(states[c]["gpu"]) for c in cols] + [g(states["ZeRO-3 offload"]["cpu_per_node"])]
        print(" | ".join(cells))
    ddp = ADAM_BYTES + EMA_BYTES
    print(f"""notes: DDP = {ddp} B/param counted here: fp32 weights 4 + grads 4 + AdamW m, v 8, + our EMA 4
  (not counted: DDP's gradient buckets, +4 B/param unless gradient_as_bucket_view, and autocast's bf16 weight copies).
  ZeRO-2 / ZeRO-3 / ZeRO-3 offload = DeepSpeed's own estimate (estimate_zero2/zero3_model_states_mem_needs; ZeRO-3
  offload = offload_param + offload_optimizer to CPU; ZeRO-3 with zero_init=False: our strategy builds the net whole),
  + our EMA, which DeepSpeed's estimator does not know: it is fp32 optimizer state (lightning_modules.ema),
  partitioned like Adam's moments, so + 4·params/GPUs bytes per GPU (ZeRO-2, ZeRO-3), or on the CPU with offload
  (+ 4·params/nodes per node, without the buffer factor). DeepSpeed's estimate excludes communication buckets,
  ZeRO-3's prefetch/live-parameter buffers and persistent small parameters, and activations (below).""")
    offload = [(r["size"], n, r["model_states"][n]["ZeRO-3 offload"]) for r in rows for n in SETUPS]
    steady = ", ".join(f"{size} {g(o['deepspeed_cpu_per_node_zero_init'] + o['ema_cpu_per_node'])}@{n}"
                       for size, n, o in offload)
    print("  offload CPU/node is DeepSpeed's zero_init=False figure: it counts every rank's whole fp32 model at load "
          f"(4 B/param x 8 ranks x buffer);\n  its zero_init=True figure (partitioned states only, 18 B/param/nodes x "
          f"buffer), + EMA: {steady}")

    print(f"\nActivations of one clip ({FRAMES} frames x 256², {CHANNELS}x{LATENT}x{LATENT} latents, patch {PATCH}: "
          f"{(LATENT // PATCH) ** 2} tokens/frame), batch 1, bf16 weights, GiB")
    head = ["size", "params_M", "ckpt off (GPU kernels)", "ckpt off (CPU kernels)", "ckpt on: held",
            "ckpt on: peak est."]
    print(" | ".join(head))
    for row in rows:
        act = row["activations"]
        print(" | ".join([row["size"], f"{row['params_M']:.1f}", g(act["gpu_kernels"]["saved_bytes"]),
                          g(act["cpu_kernels"]["saved_bytes"]), g(act["checkpointing_gpu_kernels"]["live_bytes"]),
                          g(act["checkpointing_peak_estimate_bytes"])]))
    print("notes: bytes of the distinct storages autograd saves in the forward of the training loss (parameters "
          "excluded),\n  counted on the meta device. GPU kernels: FlashAttention SDPA, fused RMSNorm (what CUDA runs); "
          "CPU kernels: CPU flash\n  SDPA, composite fp32 RMSNorm. Checkpointing on (grad_checkpointing=True): "
          "storages alive after the forward;\n  peak est. adds the largest block's activations, recomputed in "
          "backward.")
    if checks:
        print("check on real CPU tensors (bf16, full clip): saved bytes, meta CPU-kernel count vs real; "
              "live = storages alive after forward")
        print(" | ".join(["size", "real saved MiB", "meta MiB", "meta vs real", "live vs saved", "real fwd s"]))
        for c in checks:
            print(" | ".join([c["size"], f"{c['real_cpu']['saved_bytes'] / 2**20:.2f}",
                              f"{c['meta_cpu_kernels']['saved_bytes'] / 2**20:.2f}", f"{c['meta_vs_real']:+.3%}",
                              f"{c['live_vs_saved_real']:+.3%}", f"{c['real_cpu']['seconds']:.1f}"]))
        print("  (meta vs real: LayerNorm's mean/rstd are bf16 on CPU, fp32 on CUDA and meta)")
    print(f"CPU time {time.process_time() - start:.1f} s")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"frames": FRAMES, "latent": [CHANNELS, LATENT, LATENT], "patch": PATCH, "audio_dim": AUDIO_DIM,
                       "audio_tokens": AUDIO_TOKENS, "gpus_per_node": GPUS_PER_NODE,
                       "additional_buffer_factor": args.buffer_factor, "units": "bytes",
                       "rows": rows, "checks": checks}, f, indent=2)


if __name__ == "__main__":
    main()

"""Training throughput of the network: clips/s, tokens/s, TFLOP/s, MFU and peak memory per variant.

Each row times `--steps` optimizer steps (AdamW, after `--warmup` steps) of one model size on random
latents, portrait and audio, on one device: sizes × {eager, compiled} × {activation checkpointing off,
on} × attention backend, in bf16 autocast on a GPU (fp32 on a CPU). The same run also times a naive
variant of the same model (fp32, `math` attention, eager, no checkpointing) as its in-run baseline, so
a speed-up is read off one table on one machine. FLOPs are the model's own count (3× the forward per
training step, `LetsTalkDiT.flops_per_clip`), MFU against `pipeline.throughput.peak_flops` (None on a
CPU). Multi-GPU strategies (DDP, ZeRO-2) are measured by `letstalk fit`, which logs the same rates
(benchmarks/gpu_check.sh runs one).

    python benchmarks/train_throughput.py --sizes B XL --batch 8 --compile both       # GPU: 16 × 256²
    python benchmarks/train_throughput.py --sizes tiny S --frames 8 --latent 16 --batch 2 --steps 5   # CPU
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
from model_sizes import AUDIO_DIM, AUDIO_TOKENS, CHANNELS, FRAMES, LATENT, PATCH

from pipeline.models.attention import BACKENDS
from pipeline.models.dit import DiTConfig, LetsTalkDiT
from pipeline.models.sizes import SIZES
from pipeline.throughput import peak_flops, throughput


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(size: str, compiled: bool, checkpointing: bool, backend: str, bf16: bool, args: argparse.Namespace,
            device: torch.device) -> dict:
    """One variant: build, warm up (compilation happens there), time; returns a table row."""
    torch.manual_seed(0)
    config = DiTConfig(size=size, latent_channels=CHANNELS, patch_size=PATCH, audio_dim=AUDIO_DIM,
                       audio_tokens=AUDIO_TOKENS, attention_backend=backend, grad_checkpointing=checkpointing,
                       compile=compiled)
    net = LetsTalkDiT(config).to(device).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type == "cuda")
    b, f, s = args.batch, args.frames, args.latent
    x = torch.randn(b, f, CHANNELS, s, s, device=device)
    ref = torch.randn(b, 1, CHANNELS, s, s, device=device)
    audio = torch.randn(b, f, AUDIO_TOKENS, AUDIO_DIM, device=device)
    t = torch.rand(b, device=device) * 1000

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = (net(x, t, ref, audio).float() - x).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    seconds = time.perf_counter() - start
    rates = throughput(b * args.steps, seconds, 3 * net.flops_per_clip(f, s, s), f * (s // PATCH) ** 2,
                       peak_flops(device))
    return {"size": size, "compiled": compiled, "checkpointing": checkpointing, "backend": backend,
            "precision": "bf16" if bf16 else "fp32", "batch": b, "frames": f, "latent": s,
            "step_ms": 1000 * seconds / args.steps, **rates, "mfu": rates.get("mfu"),
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "S"], choices=list(SIZES))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--frames", type=int, default=FRAMES)
    parser.add_argument("--latent", type=int, default=LATENT, help="latent height and width (256² SD-VAE: 32)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", choices=["off", "on", "both"], default="off")
    parser.add_argument("--checkpointing", choices=["off", "on", "both"], default="off")
    parser.add_argument("--backends", nargs="+", default=["sdpa"], choices=[b for b in BACKENDS if b != "linear"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-baseline", action="store_true", help="skip the naive fp32/math/eager row")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    bf16 = device.type == "cuda"
    choose = {"off": [False], "on": [True], "both": [False, True]}
    plan = [(size, c, k, backend, bf16) for size in args.sizes
            for c, k, backend in itertools.product(choose[args.compile], choose[args.checkpointing], args.backends)]
    if not args.no_baseline:
        plan += [(size, False, False, "math", False) for size in args.sizes]
    rows = []
    for variant in plan:
        rows.append(measure(*variant, args, device))
        r = rows[-1]
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
        peak = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f} GiB"
        print(f"{r['size']:>5} compiled={r['compiled']!s:5} ckpt={r['checkpointing']!s:5} {r['backend']:>10} "
              f"{r['precision']}: {r['step_ms']:8.1f} ms/step {r['clips_per_s']:8.2f} clips/s "
              f"{r['tokens_per_s']:10.0f} tokens/s {r['tflops_per_s']:7.3f} TFLOP/s MFU {mfu} peak {peak}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                       "torch": torch.__version__, "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

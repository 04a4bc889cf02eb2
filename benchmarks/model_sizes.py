"""Parameters and FLOPs of every registered size for a 16-frame 256² clip (4×32×32 SD-VAE latents,
patch 2, wav2vec2-size audio: 768-d, 10 vectors per frame window), from the model's own FLOP
counter; `--check` also counts them with `torch.utils.flop_counter`. Models are built on the meta
device, so nothing is allocated or computed (on meta, SDPA decomposes into matmuls the counter sees;
on a CPU the counter has no formula for the fused SDPA kernel).

    python benchmarks/model_sizes.py [--check] [--head-dim 128] [--portrait-fusion siamese]
                                     [--audio-fusion symbiotic] [--attention-backend linear] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.models.attention import BACKENDS
from pipeline.models.dit import FUSIONS, DiTConfig, LetsTalkDiT
from pipeline.models.sizes import SIZES

FRAMES, CHANNELS, LATENT, PATCH, AUDIO_DIM, AUDIO_TOKENS = 16, 4, 32, 2, 768, 10


def measure(config: DiTConfig, check: bool) -> dict:
    with torch.device("meta"):
        net = LetsTalkDiT(config)
        row = {"size": config.size, "hidden": SIZES[config.size].hidden, "depth": SIZES[config.size].depth,
               "heads": config.heads, "head_dim": config.head_dim,
               "params_M": sum(p.numel() for p in net.parameters()) / 1e6}
        flops = net.flops_per_clip(FRAMES, LATENT, LATENT)
        row["GFLOPs_fwd_per_clip"] = flops / 1e9
        row["TFLOPs_train_step_per_clip"] = 3 * flops / 1e12  # forward + backward (2x forward)
        if check:
            x = torch.randn(1, FRAMES, CHANNELS, LATENT, LATENT)
            ref = torch.randn(1, config.ref_frames, CHANNELS, LATENT, LATENT)
            audio = torch.randn(1, FRAMES, AUDIO_TOKENS, AUDIO_DIM)
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                net(x, torch.tensor([500.0]), ref, audio)
            row["GFLOPs_torch_counter"] = counter.get_total_flops() / 1e9
            row["counter_ratio"] = flops / counter.get_total_flops()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="also count with torch.utils.flop_counter")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--portrait-fusion", choices=FUSIONS, default="symbiotic")
    parser.add_argument("--audio-fusion", choices=FUSIONS, default="direct")
    parser.add_argument("--attention-backend", choices=[b for b in BACKENDS if b != "flash_attn"], default="sdpa")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = [measure(DiTConfig(size=size, latent_channels=CHANNELS, patch_size=PATCH, audio_dim=AUDIO_DIM,
                              audio_tokens=AUDIO_TOKENS, head_dim=args.head_dim, portrait_fusion=args.portrait_fusion,
                              audio_fusion=args.audio_fusion, attention_backend=args.attention_backend), args.check)
            for size in SIZES]
    cols = ["size", "hidden", "depth", "heads", "head_dim", "params_M", "GFLOPs_fwd_per_clip",
            "TFLOPs_train_step_per_clip"]
    cols += ["GFLOPs_torch_counter", "counter_ratio"] if args.check else []
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in cols))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

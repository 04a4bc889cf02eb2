"""Parameters and FLOPs of every registered size for a 16-frame 256² clip (4×32×32 SD-VAE latents,
patch 2, wav2vec2-size audio: 768-d, 10 vectors per frame window), from the model's own FLOP
counter; `--check` also measures them with `torch.utils.flop_counter` (slow for the large sizes).

    python benchmarks/model_sizes.py [--check] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.models.dit import DiTConfig, LetsTalkDiT
from pipeline.models.sizes import SIZES

FRAMES, CHANNELS, LATENT, PATCH, AUDIO_DIM, AUDIO_TOKENS = 16, 4, 32, 2, 768, 10


def measure(size: str, check: bool) -> dict:
    config = DiTConfig(size=size, latent_channels=CHANNELS, patch_size=PATCH, audio_dim=AUDIO_DIM,
                       audio_tokens=AUDIO_TOKENS, attention_backend="math")
    with torch.device("meta"):
        params = sum(p.numel() for p in LetsTalkDiT(config).parameters())
    row = {"size": size, **{k: v for k, v in vars(SIZES[size]).items()}, "params_M": params / 1e6}
    net = LetsTalkDiT(config) if check else None
    flops = (net or _meta(config)).flops_per_clip(FRAMES, LATENT, LATENT)
    row["GFLOPs_fwd_per_clip"] = flops / 1e9
    row["TFLOPs_train_step_per_clip"] = 3 * flops / 1e12  # forward + backward (2x forward)
    if check:
        x = torch.randn(1, FRAMES, CHANNELS, LATENT, LATENT)
        ref = torch.randn(1, 1, CHANNELS, LATENT, LATENT)
        audio = torch.randn(1, FRAMES, AUDIO_TOKENS, AUDIO_DIM)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net(x, torch.tensor([500.0]), ref, audio)
        row["GFLOPs_torch_counter"] = counter.get_total_flops() / 1e9
        row["counter_ratio"] = flops / counter.get_total_flops()
    return row


def _meta(config: DiTConfig) -> LetsTalkDiT:
    with torch.device("meta"):
        return LetsTalkDiT(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="also count with torch.utils.flop_counter")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = [measure(size, args.check) for size in SIZES]
    cols = ["size", "hidden", "depth", "heads", "params_M", "GFLOPs_fwd_per_clip", "TFLOPs_train_step_per_clip"]
    cols += ["GFLOPs_torch_counter", "counter_ratio"] if args.check else []
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in cols))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

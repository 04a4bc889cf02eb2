"""VAE encode throughput of the prepare path (`pipeline.vae.load_vae` + `encode_frames`), fp32 vs bf16.

Builds an SD-VAE-size `AutoencoderKL` (the architecture of stabilityai/sd-vae-ft-mse, random
weights; pass `--vae PATH` for real ones), saves it with `save_pretrained`, loads it back in each
dtype the way `letstalk prepare --dtype` does and encodes a stream of `--size`² frames. Issue 4's
target: on a GPU, bf16 at least 1.5× the plain fp32 rate measured in the same run.

    python benchmarks/vae_encode.py [--device cuda] [--size 512] [--frames 256] [--batch 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from pipeline.vae import encode_frames, load_vae

SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
              block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, scaling_factor=0.18215)


def rate(vae_path: Path, dtype: torch.dtype, device: str, frames: np.ndarray, batch: int) -> float:
    """Frames per second of `encode_frames` after one warm-up batch."""
    vae = load_vae(vae_path, device=device, dtype=dtype)
    encode_frames(vae, frames[:batch], batch_size=batch)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    encode_frames(vae, frames, batch_size=batch)  # returns host arrays, so the GPU work is finished
    return len(frames) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vae", type=Path, help="a diffusers VAE folder (default: random SD-VAE-size weights)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    frames = np.random.default_rng(0).integers(0, 256, (args.frames, args.size, args.size, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.vae
        if path is None:
            path = Path(tmp) / "vae"
            AutoencoderKL(**SD_VAE).save_pretrained(path)
        rows = {name: rate(path, dtype, args.device, frames, args.batch)
                for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"VAE encode, {args.size}² frames, batch {args.batch}, {device}")
    print(f"{'dtype':6} {'frames/s':>9} {'vs fp32':>8}")
    for name, fps in rows.items():
        print(f"{name:6} {fps:9.1f} {fps / rows['fp32']:7.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "size": args.size, "batch": args.batch,
                                         "frames_per_s": rows}, indent=2))


if __name__ == "__main__":
    main()

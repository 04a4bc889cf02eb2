"""Hashes a refactor must not change: a fixed-seed, demo-sized run (the fast demo's data and VAE, the demo's network
with motion frames and a memory bank, 20 training steps) and a generation from it.

    python benchmarks/bit_identity.py --out /tmp/bits [--json bits.json]

Prints the sha256 of the trained network's live weights, of its EMA weights and of the generated frames (two
chained clips, no provenance marks: the watermark depends on the checkpoint file's bytes, which name the run's
folder). Run it on the commits before and after a change, on the same machine: equal hashes mean the change kept
training and sampling bit for bit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from pipeline import media
from pipeline.checkpoints import read_weights
from pipeline.cli.demo import run_demo
from pipeline.generate import generate_frames, load_network, read_portrait
from pipeline.vae import load_vae


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="work folder (the run goes to OUT/demo)")
    parser.add_argument("--json", type=Path, default=None, help="also write the hashes here")
    args = parser.parse_args()
    torch.manual_seed(0)
    run_demo(args.out / "demo", fast=True, plan={"fit_steps": 20})
    checkpoint = args.out / "demo" / "train" / "checkpoints" / "last.ckpt"
    hashes = {name: tensors_sha256(read_weights(checkpoint, ema=ema)[1]) for name, ema in (("live", False),
                                                                                           ("ema", True))}
    gen = load_network(checkpoint)
    clip = sorted((args.out / "demo" / "heldout").glob("*.mp4"))[0]
    portrait = read_portrait(clip, int(gen.data_info["size"]), crop="center")  # [1, H, W, 3]
    waveform = media.read_audio(clip)[: 2 * int(gen.data_info["clip_frames"]) * media.SAMPLE_RATE // 25]
    frames = generate_frames(gen, portrait, waveform, load_vae(gen.data_info["vae"]["path"]), seed=3)
    hashes["frames"] = hashlib.sha256(np.ascontiguousarray(frames).tobytes()).hexdigest()
    hashes["frames_shape"] = list(frames.shape)
    print(f"{'what':8} sha256")
    for name, value in hashes.items():
        print(f"{name:8} {value}")
    if args.json:
        args.json.write_text(json.dumps(hashes, indent=2) + "\n")


if __name__ == "__main__":
    main()

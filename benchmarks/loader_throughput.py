"""Training loader throughput: clips/s of `LetsTalkDataModule.train_dataloader()` with 0, 1 and 2 workers.

The clip shape is the paper's: 16 frames of 256² video as SD-VAE latents (4×32×32) with
wav2vec2-size audio (K=2 vectors of D=768 per frame; audio_radius 2 gives 10 vectors per frame).
Without `--shards`, a dataset of `--segments` random segments of `--segment-frames` frames (4 s at
25 fps, as `letstalk prepare` cuts them) is written here first. The first batch of each run (worker
start-up, shuffle-buffer fill) is timed separately from the steady state; the dataset must hold many
more segments than the shuffle buffer, since each worker refills its buffer at every epoch start.
With 0 workers the main process's CPU time is measured too: clips per CPU-second is what one worker
does on a core of its own, a figure that holds on a shared machine where wall-clock rates depend on
the other load.

    python benchmarks/loader_throughput.py [--shards DATASET_DIR] [--batches 48] [--batch-size 16]
        [--workers 0 1 2] [--shuffle-buffer 256] [--profile] [--out loader.json]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datamodules.letstalk import LetsTalkDataModule
from pipeline import media
from pipeline.shards import AtomicShardWriter, Manifest, Segment, sample_key

CLIP_FRAMES, AUDIO_RADIUS, LATENT, CHANNELS, K, D = 16, 2, 32, 4, 2, 768


def build_dataset(root: Path, segments: int, frames: int, per_shard: int) -> None:
    """`segments` random segments of `frames` frames (one per video id) in shards of `per_shard`."""
    rng = np.random.default_rng(0)
    flac = media.flac_bytes(np.zeros(frames * media.SAMPLE_RATE // media.FPS, np.float32), media.SAMPLE_RATE)
    vae = {"id": "random", "type": "kl", "scaling_factor": 0.18215, "shift_factor": 0.0,
           "latent_channels": CHANNELS, "downsample": 8}
    with AtomicShardWriter(root, max_samples=per_shard) as writer:
        for i in range(segments):
            latents = rng.standard_normal((frames, CHANNELS, LATENT, LATENT), dtype=np.float32).astype(np.float16)
            audio = rng.standard_normal((frames, K, D), dtype=np.float32).astype(np.float16)
            meta = {"fps": float(media.FPS), "sample_rate": media.SAMPLE_RATE, "frames": frames}
            writer.write(Segment(sample_key(f"video{i:05d}", 0), latents, audio, flac, meta))
    manifest = Manifest(shards=writer.shards, vae=vae, size=LATENT * 8,
                        audio_encoder={"id": "random", "K": K, "D": D, "sample_rate": media.SAMPLE_RATE})
    manifest.save(root)


def run(root: Path, workers: int, batches: int, batch_size: int, shuffle_buffer: int) -> dict[str, Any]:
    """Time `batches` batches after the first one, re-iterating the loader (next epoch) when an epoch ends."""
    data = LetsTalkDataModule(str(root), clip_frames=CLIP_FRAMES, audio_radius=AUDIO_RADIUS, batch_size=batch_size,
                              num_workers=workers, val_percent=0.0, shuffle_buffer=shuffle_buffer)
    loader = data.train_dataloader()
    start = time.perf_counter()
    stream = iter(loader)
    batch = next(stream)
    first = time.perf_counter() - start
    shapes = {k: list(v.shape) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    got, start, cpu = 0, time.perf_counter(), time.process_time()
    while got < batches:
        for batch in stream:
            got += 1
            if got == batches:
                break
        else:
            stream = iter(loader)  # epoch over: the next one
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    clips = batches * batch_size
    per_worker = clips / seconds / max(workers, 1)
    return {"workers": workers, "first_batch_s": round(first, 2), "batches": batches, "clips": clips,
            "seconds": round(seconds, 2), "clips_per_s": round(clips / seconds, 1),
            "clips_per_s_per_worker": round(per_worker, 1), "main_cpu_s": round(cpu, 2),
            "clips_per_cpu_s": round(clips / cpu, 1) if workers == 0 else None, "shapes": shapes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default=None, help="a prepared dataset folder (manifest.json + shards)")
    parser.add_argument("--segments", type=int, default=1024,
                        help="segments to write (1.1 MB each); keep it well above --shuffle-buffer")
    parser.add_argument("--segment-frames", type=int, default=100)
    parser.add_argument("--per-shard", type=int, default=64)
    parser.add_argument("--batches", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shuffle-buffer", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the main process (DataLoader workers always use 1)")
    parser.add_argument("--profile", action="store_true", help="also profile the 0-worker loader (main process)")
    parser.add_argument("--out", default=None, help="write the table as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.shards) if args.shards else Path(tmp)
        if not args.shards:
            start = time.perf_counter()
            build_dataset(root, args.segments, args.segment_frames, args.per_shard)
            size = sum(p.stat().st_size for p in root.glob("*.tar"))
            print(f"wrote {args.segments} segments of {args.segment_frames} frames, {size / 1e6:.0f} MB, "
                  f"in {time.perf_counter() - start:.1f} s")
        threads = torch.get_num_threads()
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, torch threads {threads}")
        print(f"{'workers':>7} {'first batch s':>13} {'clips/s':>9} {'clips/s/worker':>15} {'clips/CPU-s':>12}")
        for workers in args.workers:
            row = run(root, workers, args.batches, args.batch_size, args.shuffle_buffer)
            rows.append(row)
            print(f"{workers:>7} {row['first_batch_s']:>13} {row['clips_per_s']:>9} {row['clips_per_s_per_worker']:>15} "
                  f"{row['clips_per_cpu_s'] or '':>12}", flush=True)
        print(f"batch shapes: {rows[0]['shapes']}")
        if args.profile:
            profile = cProfile.Profile()
            profile.runcall(run, root, 0, args.batches, args.batch_size, args.shuffle_buffer)
            pstats.Stats(profile).sort_stats("tottime").print_stats(15)
    if args.out:
        Path(args.out).write_text(json.dumps({"load_average": os.getloadavg()[0], "cpus": os.cpu_count(),
                                              "batch_size": args.batch_size, "rows": rows}, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

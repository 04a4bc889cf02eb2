"""The data path at cluster scale: start-up over 10,000 shards, and how well batches mix speakers.

1. Start-up: what each rank does before its first step to list the dataset's samples. `walk` reads every
   shard's tar and `.npy` headers (`pipeline.shards.index_shards`, what training did before the index);
   `index` reads `index.npz` once and `stat`s each shard (`index_dataset`). The shards are hard links of one
   real 64-sample shard (so 10,000 of them cost no disk), read from the page cache: network storage only
   widens the gap, since the walk's cost is ~300 small reads per shard.
2. Speakers per batch: a corpus of `--speakers` speakers x 4 videos x 16 segments (a talk cut into 4-s
   segments) written in `prepare`'s order (a video's segments side by side, 64 per shard: one speaker a
   shard), read by `LetsTalkDataModule` with the README's shuffle buffer (256); distinct speakers in each
   batch of 16, over one epoch.

    python benchmarks/data_path.py [--shards 10000] [--speakers 200] [--out benchmarks/data_path.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from datamodules.letstalk import LetsTalkDataModule
from pipeline.shards import (INDEX_LOG, AtomicShardWriter, Manifest, Segment, index_dataset, index_shards, sample_key,
                             write_index)

VAE = {"id": "random", "scaling_factor": 1.0, "shift_factor": 0.0, "latent_channels": 4, "downsample": 8}
AUDIO = {"id": "random", "K": 2, "D": 8, "sample_rate": 16000}


def _segment(key: str, frames: int, rng: np.random.Generator) -> Segment:
    latents = rng.standard_normal((frames, 4, 4, 4)).astype(np.float16)
    audio = rng.standard_normal((frames, 2, 8)).astype(np.float16)
    return Segment(key, latents, audio, b"fLaC", {"fps": 25.0, "sample_rate": 16000, "frames": frames})


def startup(root: Path, shards: int) -> dict:
    """Seconds to list every sample by walking the shards vs reading the index, at `shards` shards of 64."""
    rng = np.random.default_rng(0)
    with AtomicShardWriter(root / "one", max_samples=64) as writer:
        for i in range(64):
            writer.write(_segment(sample_key(f"video{i // 8:03d}", i % 8), 100, rng))
    (entry,), source = writer.shards, root / "one" / writer.shards[0]["path"]
    rows = json.loads((root / "one" / INDEX_LOG).read_text())["rows"]
    entries = []
    with open(root / INDEX_LOG, "w") as log:
        for i in range(shards):
            name = f"shard-{i:06d}.tar"
            os.link(source, root / name)
            entries.append({**entry, "path": name})
            log.write(json.dumps({**entry, "path": name, "rows": rows}) + "\n")
    manifest = Manifest(shards=entries, vae=VAE, audio_encoder=AUDIO)
    manifest.save(root)
    t0 = time.perf_counter()
    write_index(root, manifest)
    compile_s = time.perf_counter() - t0
    paths = manifest.shard_paths(root)
    t0 = time.perf_counter()
    walked = index_shards(paths)
    walk_s = time.perf_counter() - t0
    (root / "index.npz").stat()
    t0 = time.perf_counter()
    indexed = index_dataset(root, manifest)
    index_s = time.perf_counter() - t0
    assert indexed == walked and len(indexed) == 64 * shards
    return {"shards": shards, "samples": len(walked), "walk_s": round(walk_s, 2), "index_s": round(index_s, 2),
            "index_mb": round((root / "index.npz").stat().st_size / 2**20, 1), "compile_s": round(compile_s, 2),
            "speedup": round(walk_s / index_s, 1)}


def speaker_mixing(root: Path, speakers: int, open_shards: list[int]) -> list[dict]:
    """Distinct speakers per batch of 16 over one epoch, on a corpus written in `prepare`'s order, for each number
    of shards a worker reads at once (1: one shard after the other, as before `open_shards`)."""
    rng = np.random.default_rng(1)
    inputs = []
    with AtomicShardWriter(root, max_samples=64) as writer:
        for s in range(speakers):
            for v in range(4):
                video = f"s{s:03d}_v{v}"
                for segment in range(16):
                    writer.write(_segment(sample_key(video, segment), 24, rng))
                inputs.append({"path": f"{video}.mp4", "id": video, "speaker": f"s{s:03d}", "split": "train",
                               "segments": 16, "frames": 16 * 24})
    Manifest(shards=writer.shards, vae=VAE, audio_encoder=AUDIO, inputs=inputs).save(root)
    rows = []
    for n in open_shards:
        data = LetsTalkDataModule(str(root), clip_frames=8, audio_radius=1, batch_size=16, num_workers=0,
                                  shuffle_buffer=256, open_shards=n)
        start = time.perf_counter()
        counts = [len({key.split("_")[0] for key in batch["key"]}) for batch in data.train_dataloader()]
        rows.append({"open_shards": n, "speakers": speakers, "samples": speakers * 64, "batches": len(counts),
                     "speakers_per_batch_mean": round(float(np.mean(counts)), 2),
                     "speakers_per_batch_min": int(min(counts)), "epoch_s": round(time.perf_counter() - start, 1)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=10000)
    parser.add_argument("--speakers", type=int, default=200)
    parser.add_argument("--open-shards", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "startup").mkdir()
        start = startup(Path(tmp) / "startup", args.shards)
        mixing = speaker_mixing(Path(tmp) / "mixing", args.speakers, args.open_shards)
    print(f"| start-up, {start['shards']} shards ({start['samples']} samples) | walk headers | read index.npz |")
    print("|---|---|---|")
    print(f"| seconds per rank | {start['walk_s']} | {start['index_s']} ({start['speedup']}x; "
          f"index {start['index_mb']} MB, compiled in {start['compile_s']} s) |")
    print()
    print(f"| data.open_shards | speakers per batch of 16, mean | min | ({args.speakers} speakers, one a shard; "
          f"{mixing[0]['batches']} batches) |")
    print("|---|---|---|---|")
    for row in mixing:
        print(f"| {row['open_shards']} | {row['speakers_per_batch_mean']} | {row['speakers_per_batch_min']} | |")
    if args.out:
        Path(args.out).write_text(json.dumps({"startup": start, "speaker_mixing": mixing}, indent=2) + "\n")


if __name__ == "__main__":
    main()

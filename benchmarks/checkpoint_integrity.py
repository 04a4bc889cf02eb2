"""What a checkpoint's integrity manifest costs: the save with and without it, the hashing, the verification.

For each model size (default: tiny and S, `configs/model/tiny.yaml`, `s.yaml`) a real `LetsTalkModule` is trained
for one step by `LetsTalkTrainer` (CPU, fp32, one process) on small synthetic shards (4-channel 8x8 latents, 8-d
audio features: the transformer blocks, which hold nearly all parameters, are the production ones), so the
checkpoint holds what `letstalk fit` saves: network, EMA and AdamW state (fp32: ~16 bytes per parameter), configs.
Then, `--repeats` times each, median reported:

- `lightning_save_s`: Lightning's own `Trainer.save_checkpoint` (what `letstalk fit` did before manifests);
- `save_s`: `LetsTalkTrainer.save_checkpoint`: the same write into `<name>.partial`, the manifest (sha256 of the
  file, read back from the page cache), the rename;
- `hash_s`: `pipeline.checkpoints.make_manifest` alone, and `hash_mb_s` its rate (bytes / hash_s);
- `verify_s`: `pipeline.checkpoints.verify_checkpoint` (size, then sha256), what resume, export and generate pay.

Lightning's save overwrites the previous file in place, as ModelCheckpoint did with `last.ckpt`; ours writes a new
file and renames it over the old one, which on ext4 was no slower (the old file's blocks are freed at the unlink),
so `save_s` can come out below `lightning_save_s`: the manifest's cost is `hash_s`.

Measured 2026-12-07 (`checkpoint_integrity.json`), AMD EPYC, 2 cores shared with other jobs (load average ~6),
ext4, torch 2.11, Lightning 2.6.6, medians of 3: tiny (1.4 M params, 28.7 MB) hash 0.03 s, verify 0.03 s; S (36.2 M
params, 724 MB) save 4.7 s with the manifest (Lightning's own 5.8 s), hash 0.84 s (~0.9 GB/s), verify 0.80 s. Runs
minutes apart on the same busy machine moved these by up to ~40 % (S hash 0.70-0.84 s).

Files are read back from the page cache (just written): a cold read from a network file system adds its own
read time. The machine's load average is recorded: on a shared machine the figures move with it.

    python benchmarks/checkpoint_integrity.py [--sizes tiny S] [--repeats 3] [--dir DIR]
                                              [--json benchmarks/checkpoint_integrity.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import soundfile as sf
import torch
from lightning.pytorch import Trainer

from datamodules import LetsTalkDataModule
from lightning_modules.letstalk import LetsTalkModule
from lightning_modules.trainer import LetsTalkTrainer
from pipeline.checkpoints import make_manifest, verify_checkpoint
from pipeline.shards import AtomicShardWriter, Manifest, Segment, sample_key

C, HW, K, D, FRAMES = 4, 8, 2, 8, 12


def write_shards(root: Path) -> Path:
    """8 videos x 2 segments of random latents and audio features (the shape tests/test_training.py trains on)."""
    rng = np.random.default_rng(0)
    flac = io.BytesIO()
    sf.write(flac, np.zeros(640 * FRAMES, np.float32), 16000, format="FLAC")
    with AtomicShardWriter(root, max_samples=8) as writer:
        for v in range(8):
            for s in range(2):
                writer.write(Segment(sample_key(f"v{v}", s), rng.normal(size=(FRAMES, C, HW, HW)).astype(np.float16),
                                     rng.normal(size=(FRAMES, K, D)).astype(np.float16), flac.getvalue(),
                                     {"frames": FRAMES, "fps": 25.0}))
    Manifest(shards=writer.shards, size=32,
             vae={"id": "none", "scaling_factor": 1.0, "shift_factor": 0.0, "latent_channels": C, "downsample": 4},
             audio_encoder={"id": "mel-8", "name": "mel", "K": K, "D": D, "sample_rate": 16000}).save(root)
    return root


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(size: str, shards: Path, folder: Path, repeats: int) -> dict:
    L.seed_everything(0, verbose=False)
    module = LetsTalkModule(net={"size": size}, optim={"lr": 1e-4, "warmup_steps": 1})
    data = LetsTalkDataModule(str(shards), clip_frames=4, audio_radius=1, batch_size=2, num_workers=0, val_percent=20)
    trainer = LetsTalkTrainer(accelerator="cpu", max_steps=1, default_root_dir=folder, logger=False,
                              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                              num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, data)
    plain, ours = folder / f"{size}-lightning.ckpt", folder / f"{size}.ckpt"
    times: dict[str, list[float]] = {"lightning_save_s": [], "save_s": [], "hash_s": [], "verify_s": []}
    for _ in range(repeats):
        times["lightning_save_s"].append(timed(lambda: Trainer.save_checkpoint(trainer, plain, weights_only=False)))
        times["save_s"].append(timed(lambda: trainer.save_checkpoint(ours, weights_only=False)))
        times["hash_s"].append(timed(lambda: make_manifest(ours, trainer.global_step, 1)))
        times["verify_s"].append(timed(lambda: verify_checkpoint(ours)))
    row = {"size": size, "params": sum(p.numel() for p in module.net.parameters()), "bytes": ours.stat().st_size,
           **{key: statistics.median(values) for key, values in times.items()}}
    row["hash_mb_s"] = row["bytes"] / row["hash_s"] / 1e6
    row["hash_share_of_save"] = row["hash_s"] / row["save_s"]
    for path in (plain, ours):
        path.unlink()
    return row


def environment(folder: Path) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    fs = next((line.split()[2] for line in reversed(Path("/proc/mounts").read_text().splitlines())
               if str(folder.resolve()).startswith(line.split()[1])), "?")
    return {"date": time.strftime("%Y-%m-%d"), "cpu": cpu, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "load_average": round(os.getloadavg()[0], 1), "filesystem": fs, "python": platform.python_version(),
            "torch": torch.__version__, "lightning": L.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "S"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", help="where the checkpoints are written (default: a temporary folder)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        shards = write_shards(folder / "shards")
        env = environment(folder)
        rows = [measure(size, shards, folder, args.repeats) for size in args.sizes]
    env["load_average_end"] = round(os.getloadavg()[0], 1)
    print(f"{env['date']}, {env['cpu']} ({env['cpus']} cores, {env['threads']} torch threads), {env['filesystem']}, "
          f"load average {env['load_average']} -> {env['load_average_end']}; torch {env['torch']}, "
          f"lightning {env['lightning']}")
    print(f"{'size':<6}{'params':>12}{'MB':>9}{'Lightning save s':>18}{'save+manifest s':>17}{'hash s':>9}"
          f"{'hash MB/s':>11}{'verify s':>10}")
    for r in rows:
        print(f"{r['size']:<6}{r['params']:>12,}{r['bytes'] / 1e6:>9.1f}{r['lightning_save_s']:>18.3f}"
              f"{r['save_s']:>17.3f}{r['hash_s']:>9.3f}{r['hash_mb_s']:>11.0f}{r['verify_s']:>10.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "repeats": args.repeats, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

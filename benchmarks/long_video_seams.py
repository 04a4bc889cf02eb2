"""Long-video chaining on the demo's synthetic data: seam ratio of generated multi-clip videos.

Trains LetsTalk-tiny with motion frames and a memory bank (`configs/demo.yaml` +
`configs/long_video.yaml`) on the demo's shards (or takes `--checkpoint`, e.g. the demo's own,
which has them too), then generates `--clips`-clip videos for the demo's held-out faces (first
frame as portrait, their own audio) and reports the seam ratio (`pipeline.metrics.seams`): frame
difference at clip boundaries / inside clips. For comparison: the same model with chaining off
(every clip starts afresh from the null motion and memory) and the real held-out videos cut at
the same places. Needs a finished `make demo` (its `runs/demo`).

    python benchmarks/long_video_seams.py [--demo runs/demo] [--steps 1000 | --checkpoint CKPT] [--clips 3]
        [--json seams.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from pipeline import media
from pipeline.cli.demo import CONFIGS
from pipeline.cli.train import run_lightning_cli
from pipeline.generate import generate_frames, load_network, read_portrait
from pipeline.metrics.seams import seam_ratio
from pipeline.vae import load_vae


def train(demo: Path, out: Path, steps: int, max_time: str) -> Path:
    run_lightning_cli([
        "fit", "--config", str(CONFIGS / "demo.yaml"), "--config", str(CONFIGS / "long_video.yaml"),
        "--data.root", str(demo / "shards"), "--trainer.default_root_dir", str(out),
        "--trainer.max_steps", str(steps), "--trainer.max_time", max_time,
    ])
    return out / "checkpoints" / "last.ckpt"


def measure(checkpoint: Path, demo: Path, clips: int, seeds: int, chain: bool) -> dict:
    """Mean seam ratio over the held-out faces × seeds, and the same cut through the real videos."""
    gen = load_network(checkpoint)
    info, vae = gen.data_info, load_vae(demo / "vae")
    clip, fps = int(info["clip_frames"]), float(info["fps"])
    frames_wanted = clips * clip
    generated, real = [], []
    t0 = time.perf_counter()
    for video in sorted((demo / "heldout").glob("*.mp4")):
        waveform = media.read_audio(video)[: round(frames_wanted * media.SAMPLE_RATE / fps)]
        portrait = read_portrait(video, int(info["size"]))
        for seed in range(seeds):
            frames = generate_frames(gen, portrait, waveform, vae, seed=seed, chain=chain)
            generated.append(seam_ratio(frames, clip))
        real.append(seam_ratio(media.read_video(video, fps=fps)[:frames_wanted], clip))
    mean = lambda rows, key: float(np.mean([r[key] for r in rows]))  # noqa: E731
    return {"videos": len(generated), "seconds": time.perf_counter() - t0,
            **{key: mean(generated, key) for key in ("seam", "inside", "ratio")},
            "per_video_ratio": [r["ratio"] for r in generated], "real_ratio": mean(real, "ratio")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="output folder of `make demo`")
    parser.add_argument("--out", type=Path, default=Path("runs/long_video"), help="training run folder")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--max-time", default="00:00:12:00")
    parser.add_argument("--clips", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--checkpoint", type=Path, help="measure this long-video checkpoint instead of training one")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not (args.demo / "shards" / "manifest.json").exists():
        raise SystemExit(f"{args.demo}: no demo output; run `make demo` first")
    t0 = time.perf_counter()
    checkpoint = args.checkpoint or train(args.demo, args.out, args.steps, args.max_time)
    train_s = time.perf_counter() - t0
    rows = {"chained (motion + memory)": measure(checkpoint, args.demo, args.clips, args.seeds, chain=True),
            "same model, clips not chained": measure(checkpoint, args.demo, args.clips, args.seeds, chain=False)}
    print(f"\n{args.clips}-clip videos of {checkpoint}, {rows['chained (motion + memory)']['videos']} per row "
          f"(training {train_s:.0f} s)")
    print(f"{'generation':34} {'seam':>7} {'inside':>7} {'ratio':>6} {'real':>6}")
    for name, row in rows.items():
        print(f"{name:34} {row['seam']:7.2f} {row['inside']:7.2f} {row['ratio']:6.2f} {row['real_ratio']:6.2f}")
    if args.json:
        args.json.write_text(json.dumps({"clips": args.clips, "train_seconds": train_s, "models": rows}, indent=2))


if __name__ == "__main__":
    main()

"""Generation speed and quality per sampler, step count and guidance, on the demo's held-out clips.

    python benchmarks/generate_speed.py --demo runs/demo [--steps 25 12 8] [--samplers euler]
                                        [--guidance on off] [--clips-per-batch 1 16] [--threads N]
                                        [--device cpu] [--json out.json]

Each setting generates every held-out clip from its first frame and its own audio, as `letstalk demo`
does, and scores it the same way: lip sync (r with the true audio's loudness) and PSNR of the whole
frame and of the mouth box against the real clip. Time is split as `letstalk generate` records it:
encode (audio features and the portrait's latent), denoise, decode (VAE), watermark and mux. The
real-time factor (RTF) is the total over the video's duration, as `generate` prints it; the model and
VAE are loaded once, before timing (as the web app and `generate --batch` run). "guidance off" means
both scales 1: one network evaluation per step instead of a batch of three. `--clips-per-batch 1` is
clip-by-clip sampling (before batching; the video is the same up to float summation order).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from pipeline.cli.demo import score_clip
from pipeline.diffusion import AUDIO_SCALE, REF_SCALE, SAMPLERS
from pipeline.generate import generate, load_model
from pipeline.options import Framing, Sampling

PARTS = ("encode", "denoise", "decode", "watermark", "mux")
GUIDANCE = {"on": (AUDIO_SCALE, REF_SCALE), "off": (1.0, 1.0)}  # (audio_scale, ref_scale); "on" is generate's default


def measure(model, heldout: list[Path], fps: float, sampler: str, steps: int, guidance: str, clips_per_batch: int,
            out: Path) -> dict:
    """Seconds per video second of each part, RTF and mean scores over the held-out clips for one setting."""
    audio_scale, ref_scale = GUIDANCE[guidance]
    clip_frames = int(model.gen.data_info["clip_frames"])
    runs = []
    for i, path in enumerate(heldout):
        video = out / f"generated_{i}.mp4"
        sampling = Sampling(sampler=sampler, steps=steps, audio_scale=audio_scale, ref_scale=ref_scale)
        summary = generate(model, path, path, video, sampling, Framing(crop="center"), device=model.device,
                           clips_per_batch=clips_per_batch)
        scores = score_clip(video, path, heldout[(i + 1) % len(heldout)], model.vae, clip_frames, fps)
        runs.append({**{part: summary[part] for part in PARTS}, "seconds": summary["seconds"],
                     "sync": scores["sync_true"], "psnr_frame": scores["generated"]["frame"]["psnr"],
                     "psnr_mouth": scores["generated"]["mouth"]["psnr"]})
    video_seconds = sum(r["seconds"] for r in runs)
    row = {"sampler": sampler, "steps": steps, "guidance": guidance, "clips_per_batch": clips_per_batch,
           "video_s": video_seconds}
    row.update({part: sum(r[part] for r in runs) / video_seconds for part in PARTS})  # seconds per video second
    row["rtf"] = sum(row[part] for part in PARTS)
    row.update({key: float(np.mean([r[key] for r in runs])) for key in ("sync", "psnr_frame", "psnr_mouth")})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, required=True, help="a `letstalk demo --out` folder")
    parser.add_argument("--checkpoint", type=Path, help="default: DEMO/train/checkpoints/last.ckpt")
    parser.add_argument("--samplers", nargs="+", help="default: the objective's samplers")
    parser.add_argument("--steps", nargs="+", type=int, default=[25, 12, 8])
    parser.add_argument("--guidance", nargs="+", choices=list(GUIDANCE), default=["on", "off"])
    parser.add_argument("--clips-per-batch", nargs="+", type=int, default=[16])
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    heldout = sorted((args.demo / "heldout").glob("clip_*.mp4"))
    if not heldout:
        sys.exit(f"{args.demo / 'heldout'}: no held-out clips; run `letstalk demo --out {args.demo}` first")
    model = load_model(args.checkpoint or args.demo / "train" / "checkpoints" / "last.ckpt", device=args.device)
    fps = float(model.gen.data_info["fps"])
    samplers = args.samplers or list(SAMPLERS[model.gen.diffusion.config.objective])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        measure(model, heldout[:1], fps, samplers[0], 2, "on", 16, Path(tmp))  # warm-up: first-call costs
        for sampler, steps, guidance, batch in itertools.product(samplers, args.steps, args.guidance,
                                                                  args.clips_per_batch):
            rows.append(r := measure(model, heldout, fps, sampler, steps, guidance, batch, Path(tmp)))
            print(f"{sampler:>6} {steps:>3} steps, guidance {guidance:>3}, {batch:>2} clips/batch: RTF {r['rtf']:.2f}  "
                  f"sync {r['sync']:+.3f}  PSNR {r['psnr_frame']:.2f} / mouth {r['psnr_mouth']:.2f} dB", flush=True)
    env = {"device": args.device, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "torch": torch.__version__, "clips": len(heldout), "size": int(model.gen.data_info["size"]),
           "net": model.gen.net.config.size}
    print(f"\n{env}\n")
    print("| sampler | steps | guidance | clips/batch | " + " | ".join(f"{p} s/s" for p in PARTS)
          + " | RTF | lip sync | PSNR frame | PSNR mouth |")
    print("|---" * (len(PARTS) + 8) + "|")
    for r in rows:
        parts = " | ".join(f"{r[p]:.3f}" for p in PARTS)
        print(f"| {r['sampler']} | {r['steps']} | {r['guidance']} | {r['clips_per_batch']} | {parts}"
              f" | **{r['rtf']:.2f}** | {r['sync']:+.3f} | {r['psnr_frame']:.2f} | {r['psnr_mouth']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"env": env, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

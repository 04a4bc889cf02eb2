"""`letstalk demo`: the whole pipeline end to end on synthetic talking faces, on a CPU.

synth -> fit-vae -> prepare -> fit -> generate (held-out portrait and audio) -> lip sync.
The lip-sync score is the correlation between the mouth opening measured in the generated
frames and the loudness envelope of the driving audio; as a control, the same frames are
scored against another clip's audio, which should give about 0.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from pipeline import media
from pipeline.sync import loudness_envelope, mouth_opening, mouth_region, sync_score

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

FULL = dict(clips=24, seconds=4.0, heldout=3, vae_clips=128, vae_steps=1500, vae_time=150.0, fit_steps=1000,
            fit_time="00:00:08:00")
FAST = dict(clips=4, seconds=2.0, heldout=2, vae_clips=4, vae_steps=20, vae_time=30.0, fit_steps=6,
            fit_time="00:00:02:00")


def run_demo(out: str | Path = "runs/demo", fast: bool = False, size: int = 64, fps: float = 25.0) -> dict:
    from lightning_modules.vae import fit_vae
    from pipeline.cli.train import run_lightning_cli
    from pipeline.generate import generate
    from pipeline.prepare import prepare
    from pipeline.synth import synthesize

    plan = FAST if fast else FULL
    out = Path(out)
    times: dict[str, float] = {}

    def stage(name: str, fn, *args, **kwargs):
        print(f"\n=== {name} ===", flush=True)
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        times[name] = time.perf_counter() - t0
        return result

    def synth() -> list[Path]:
        synthesize(out / "videos", clips=plan["clips"], seconds=plan["seconds"], size=size, fps=fps, seed=0)
        # The VAE stands in for a pretrained, general-purpose one: it learns from its own, more varied
        # set of one-second faces, none of them a training or held-out identity.
        synthesize(out / "vae_videos", clips=plan["vae_clips"], seconds=1.0, size=size, fps=fps, seed=20_000)
        return synthesize(out / "heldout", clips=plan["heldout"], seconds=plan["seconds"], size=size, fps=fps,
                          seed=10_000)

    heldout = stage("synth", synth)
    stage("fit-vae", fit_vae, out / "vae_videos", out / "vae", size=size, max_steps=plan["vae_steps"],
          max_time_s=plan["vae_time"], seed=0)
    stage("prepare", prepare, out / "videos", out / "shards", vae_path=out / "vae", audio_encoder="mel",
          fps=fps, size=size, segment_seconds=plan["seconds"], progress=False)
    run = out / "train"
    cli = stage("fit", run_lightning_cli, [
        "fit", "--config", str(CONFIGS / "demo.yaml"), "--config", str(CONFIGS / "long_video.yaml"),
        "--data.root", str(out / "shards"),
        "--trainer.default_root_dir", str(run),
        "--trainer.max_steps", str(plan["fit_steps"]), "--trainer.max_time", plan["fit_time"],
    ] + (["--trainer.val_check_interval", "3", "--data.num_workers", "0"] if fast else []))
    checkpoint = run / "checkpoints" / "last.ckpt"
    final_loss = float(cli.trainer.callback_metrics.get("train/loss", float("nan")))

    true_scores, control_scores, videos = [], [], []
    t0 = time.perf_counter()
    for i, clip in enumerate(heldout):
        video = out / f"generated_{i}.mp4"
        generate(checkpoint, clip, clip, video)  # first frame of the held-out clip as portrait, its audio
        frames = media.read_video(video, fps=fps)
        side = json.loads(clip.with_suffix(".json").read_text())
        mouth = mouth_opening(frames, mouth_region(side, margin=2))
        other = heldout[(i + 1) % len(heldout)]
        true_scores.append(sync_score(mouth, _envelope(clip, fps, len(frames))))
        control_scores.append(sync_score(mouth, _envelope(other, fps, len(frames))))
        videos.append(video)
    times["generate+sync"] = time.perf_counter() - t0

    result = {"stage_seconds": times, "total_seconds": sum(times.values()), "final_loss": final_loss,
              "sync_true_audio": float(np.mean(true_scores)), "sync_mismatched_audio": float(np.mean(control_scores)),
              "sync_true_per_clip": true_scores, "sync_mismatched_per_clip": control_scores,
              "videos": [str(v) for v in videos], "checkpoint": str(checkpoint), "logs": str(run)}
    (out / "demo.json").write_text(json.dumps(result, indent=2))
    _print_table(result)
    return result


def _envelope(clip: Path, fps: float, num_frames: int) -> np.ndarray:
    return loudness_envelope(media.read_audio(clip), media.SAMPLE_RATE, fps, num_frames)


def _print_table(result: dict) -> None:
    rows = [(f"time: {name}", f"{seconds:8.1f} s") for name, seconds in result["stage_seconds"].items()]
    rows += [("time: total", f"{result['total_seconds']:8.1f} s"),
             ("final training loss", f"{result['final_loss']:.4f}"),
             ("lip sync, true audio (r)", f"{result['sync_true_audio']:+.3f}"),
             ("lip sync, mismatched audio (r)", f"{result['sync_mismatched_audio']:+.3f}"),
             ("generated video", result["videos"][0]),
             ("checkpoint", result["checkpoint"]),
             ("logs (CSV, W&B offline)", result["logs"])]
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in rows))

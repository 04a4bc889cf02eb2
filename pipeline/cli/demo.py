"""`letstalk demo`: the whole pipeline end to end on synthetic talking faces, on a CPU.

synth -> fit-vae -> prepare -> fit -> generate (held-out portrait and audio) -> score.
Each held-out face is generated from its clip's first frame and its own audio, so the real clip
is ground truth. Scores: lip sync, the correlation between the mouth opening measured in the
generated frames and the loudness envelope of the driving audio (as a control, the same frames
against another clip's audio, which should give about 0); and appearance
(`pipeline.metrics.appearance`): PSNR / SSIM against the real frames over the whole frame, outside
and inside the mouth, beside a static copy of the portrait, the still head (the true mouth on a head
that never moves or blinks: the best a model given only the portrait and the audio can be expected
to do) and the VAE's reconstruction, and the drift from the first to the last chained clip.
`TARGETS` are what the demo should reach; the still head's own margins show which of them any such
model can reach on this data.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from pipeline import media
from pipeline.metrics.appearance import comparison_sheet, fidelity, format_fidelity, psnr
from pipeline.options import Encoders, Frames, Framing, Sampling, Segments
from pipeline.shipped import CONFIGS
from pipeline.sync import loudness_envelope, mouth_opening, mouth_region, sync_score
from pipeline.synth import draw_clip, synthesize
from pipeline.vae import reconstruct

# The VAE's 3000 steps (~270 s) are what lifts the appearance ceiling most (benchmarks/fidelity.md); the time
# caps are safety stops that keep the demo under 15 minutes on a slow machine.
FULL = dict(clips=24, seconds=4.0, heldout=3, vae_clips=128, vae_steps=3000, vae_time=300.0, vae_channels=4,
            vae_blocks=(16, 16, 32), fit_steps=1000, fit_time="00:00:07:00")
FAST = dict(FULL, clips=4, seconds=2.0, heldout=2, vae_clips=4, vae_steps=20, vae_time=30.0, fit_steps=6,
            fit_time="00:00:02:00")


# name -> (what it asks, margin in dB of video `v` ("generated" or "still") in one clip's scores `c`: >= 0 when met):
# the appearance targets (benchmarks/fidelity.md)
TARGETS = {
    "outside_mouth": ("outside the mouth within 1 dB of the VAE ceiling (PSNR)",
                      lambda c, v: c[v]["outside_mouth"]["psnr"] - c["ceiling"]["outside_mouth"]["psnr"] + 1.0),
    "frame": ("whole frame at or above the static portrait (PSNR)",
              lambda c, v: c[v]["frame"]["psnr"] - c["static"]["frame"]["psnr"]),
    "mouth": ("mouth box at least 2 dB above the static portrait (PSNR)",
              lambda c, v: c[v]["mouth"]["psnr"] - c["static"]["mouth"]["psnr"] - 2.0),
    "drift": ("last chained clip within 0.5 dB of the first (PSNR, whole frame)",
              lambda c, v: c["drift"]["last"][v]["frame"]["psnr"] - c["drift"]["first"][v]["frame"]["psnr"] + 0.5),
}


def run_demo(out: str | Path = "runs/demo", fast: bool = False, size: int = 64, fps: float = 25.0,
             fit_args: list[str] | None = None, sampling: Sampling = Sampling(), plan: dict | None = None) -> dict:
    """Run every stage into `out` and return the scores (also written to `out`/demo.json).

    fit_args: extra `letstalk fit` arguments (after the demo's own); sampling: `generate`'s sampling options
    (steps, audio_scale, ...); plan: overrides of FULL / FAST. Ablations use these
    (benchmarks/fidelity_ablations.py); `letstalk demo` runs the defaults.
    """
    plan = {**(FAST if fast else FULL), **(plan or {})}
    out = Path(out)
    times: dict[str, float] = {}

    def stage(name: str, fn, *args, **kwargs):
        print(f"\n=== {name} ===", flush=True)
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        times[name] = time.perf_counter() - t0
        return result

    heldout = stage("synth", synth_data, out, plan, size, fps)
    stage("fit-vae", train_vae, out, plan, size)
    stage("prepare", prepare_shards, out, plan, size, fps)
    cli = stage("fit", fit_model, out / "shards", out / "train", plan, list(fit_args or []), fast)
    checkpoint = out / "train" / "checkpoints" / "last.ckpt"
    final_loss = float(cli.trainer.callback_metrics.get("train/loss", float("nan")))

    t0 = time.perf_counter()
    clips = score_heldout(out, checkpoint, heldout, fps, sampling)
    times["generate+score"] = time.perf_counter() - t0

    result = {"stage_seconds": times, "total_seconds": sum(times.values()), "final_loss": final_loss,
              **summarize(clips), "clips": clips, "videos": [c["video"] for c in clips], "checkpoint": str(checkpoint),
              "logs": str(out / "train")}
    (out / "demo.json").write_text(json.dumps(result, indent=2))
    _print_table(result)
    return result


def synth_data(out: Path, plan: dict, size: int, fps: float) -> list[Path]:
    """Training faces in `out`/videos, the VAE's own faces in `out`/vae_videos; returns the held-out clips."""
    synthesize(out / "videos", clips=plan["clips"], seconds=plan["seconds"], size=size, fps=fps, seed=0)
    # The VAE stands in for a pretrained, general-purpose one: it learns from its own, more varied
    # set of one-second faces, none of them a training or held-out identity.
    synthesize(out / "vae_videos", clips=plan["vae_clips"], seconds=1.0, size=size, fps=fps, seed=20_000)
    return synthesize(out / "heldout", clips=plan["heldout"], seconds=plan["seconds"], size=size, fps=fps, seed=10_000)


def train_vae(out: Path, plan: dict, size: int) -> Path:
    from lightning_modules.vae import fit_vae

    return fit_vae(out / "vae_videos", out / "vae", size=size, max_steps=plan["vae_steps"], max_time_s=plan["vae_time"],
                   latent_channels=plan["vae_channels"], block_out_channels=plan["vae_blocks"], seed=0)


def prepare_shards(out: Path, plan: dict, size: int, fps: float) -> None:
    from pipeline.prepare import prepare

    prepare(out / "videos", out / "shards", Encoders(vae=str(out / "vae")), Frames(fps=fps, size=size),
            Segments(segment_seconds=plan["seconds"]), progress=False)


def fit_model(shards: Path, run: Path, plan: dict, fit_args: list[str], fast: bool = False):
    """`letstalk fit` of the demo config (with long-video options) on `shards` into `run`; returns the CLI."""
    from pipeline.cli.train import run_lightning_cli

    return run_lightning_cli([
        "fit", "--config", str(CONFIGS / "demo.yaml"), "--config", str(CONFIGS / "long_video.yaml"),
        "--data.root", str(shards), "--trainer.default_root_dir", str(run),
        "--trainer.max_steps", str(plan["fit_steps"]), "--trainer.max_time", plan["fit_time"],
    ] + (["--trainer.val_check_interval", "3", "--data.num_workers", "0"] if fast else []) + fit_args)


def score_heldout(out: Path, checkpoint: Path, heldout: list[Path], fps: float,
                  sampling: Sampling = Sampling()) -> list[dict]:
    """Generate each held-out face from its first frame and its own audio into `out`, then `score_clip` it. The
    portrait is centre-cropped, as the training frames are."""
    from pipeline.generate import generate, load_model

    model = load_model(checkpoint, ema=sampling.ema)
    clip_frames = int(model.gen.data_info["clip_frames"])
    clips = []
    for i, path in enumerate(heldout):
        video = out / f"generated_{i}.mp4"
        generate(model, path, path, video, sampling, Framing(crop="center"))  # the clip's first frame, its audio
        clips.append(score_clip(video, path, heldout[(i + 1) % len(heldout)], model.vae, clip_frames, fps))
    return clips


def score_clip(video: Path, real_path: Path, other_path: Path, vae, clip_frames: int, fps: float) -> dict:
    """Lip sync (true audio and `other_path`'s as control) and appearance of a generated `video` against the real
    clip it was made from; writes `side_by_side_<i>.mp4` and `contact_sheet_<i>.png` (portrait | real | generated)
    beside `generated_<i>.mp4`."""
    frames = media.read_video(video, fps=fps)
    real = media.read_video(real_path, fps=fps)[: len(frames)]
    truth = json.loads(real_path.with_suffix(".json").read_text())
    box = mouth_region(truth, margin=2)
    still = draw_clip(truth["seed"], truth["frames"] / truth["fps"], truth["size"], truth["fps"], truth["sample_rate"],
                      still=True).frames[: len(frames)]
    if psnr(still[0], real[0]) < 25:  # H.264 alone keeps it at 32-37 dB; another face is far below
        raise ValueError(f"{real_path}: its first frame is not the face synth draws for seed {truth['seed']}, so the "
                         "still-head reference cannot be drawn (made by another version of pipeline.synth?)")
    mouth = mouth_opening(frames, box)
    portrait = np.broadcast_to(real[:1], real.shape)
    index = video.stem.rpartition("_")[2]
    media.write_video(video.with_name(f"side_by_side_{index}.mp4"), media.side_by_side(portrait, real, frames), fps,
                      audio=media.read_audio(real_path), sample_rate=media.SAMPLE_RATE)
    sheet = video.with_name(f"contact_sheet_{index}.png")
    media.write_image(sheet, comparison_sheet(real, frames))
    return {"video": str(video), "contact_sheet": str(sheet),
            "sync_true": sync_score(mouth, _envelope(real_path, fps, len(frames))),
            "sync_mismatched": sync_score(mouth, _envelope(other_path, fps, len(frames))),
            **fidelity(frames, real, box, clip_frames, reconstruct(vae, real), reconstruct(vae, still))}


def summarize(clips: list[dict]) -> dict:
    """Mean lip sync over the clips, and each target of `TARGETS` with its margin per clip, for the generated
    video ("targets") and for the still head ("still_targets")."""
    result = {"sync_true_audio": float(np.mean([c["sync_true"] for c in clips])),
              "sync_mismatched_audio": float(np.mean([c["sync_mismatched"] for c in clips]))}
    for key, video in (("targets", "generated"), ("still_targets", "still")):
        result[key] = {name: [float(check(c, video)) for c in clips] for name, (_, check) in TARGETS.items()}
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
             ("side by side, contact sheet", f"{Path(result['videos'][0]).parent}/side_by_side_*.mp4, contact_sheet_*.png"),
             ("checkpoint", result["checkpoint"]),
             ("logs (CSV, W&B offline)", result["logs"])]
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print("\n" + format_fidelity({f"clip {i}": clip for i, clip in enumerate(result["clips"])}))
    print("\ntargets (margin in dB per clip; met when >= 0)")
    for name, (text, _) in TARGETS.items():
        margins, still = result["targets"][name], result["still_targets"][name]
        verdict = "met" if min(margins) >= 0 else "missed"
        print(f"  {text}: {'  '.join(f'{m:+.2f}' for m in margins)}  {verdict}"
              f"  (still head: {'  '.join(f'{m:+.2f}' for m in still)})")

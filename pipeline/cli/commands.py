"""The `letstalk` commands other than LightningCLI's `fit` and `validate`: for each, its options and, right below,
the function that runs it. `COMMANDS` at the end maps each name to them; `pipeline.cli` builds the parser from it.

Handlers import the library lazily, so that `letstalk --help` stays fast. Each returns the exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NamedTuple


class Command(NamedTuple):
    help: str
    options: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def guidance_options(p: argparse.ArgumentParser) -> None:
    """--audio-scale / --ref-scale, left None so the defaults live in one place (pipeline.diffusion, not imported
    here: `letstalk --help` stays fast)."""
    p.add_argument("--audio-scale", type=float, default=None,
                   help="audio guidance (default: pipeline.diffusion.AUDIO_SCALE)")
    p.add_argument("--ref-scale", type=float, default=None,
                   help="portrait guidance (default: pipeline.diffusion.REF_SCALE)")


def guidance(args: argparse.Namespace) -> dict[str, float]:
    """The guidance scales given on the command line, else pipeline.diffusion's defaults."""
    from pipeline.diffusion import AUDIO_SCALE, REF_SCALE

    return {"audio_scale": AUDIO_SCALE if args.audio_scale is None else args.audio_scale,
            "ref_scale": REF_SCALE if args.ref_scale is None else args.ref_scale}


def encoder_options(p: argparse.ArgumentParser, title: str = "encoders (default: those the data was made with)") -> None:
    """--vae / --audio-encoder-path of a trained model: by default the ones its training data was made with."""
    g = p.add_argument_group(title)
    g.add_argument("--vae", default=None, help="VAE folder")
    g.add_argument("--audio-encoder-path", default=None, help="wav2vec2 or Whisper folder")


def sampling_options(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    g = p.add_argument_group("sampling")
    g.add_argument("--sampler", default=None, help="ddim or dpm++ (eps, v objectives), euler (flow); default: the "
                   "model's objective's first")
    g.add_argument("--steps", type=int, default=None,
                   help="sampler steps (default: the sampler's own, pipeline.diffusion.DEFAULT_STEPS)")
    guidance_options(g)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-ema", action="store_true", help="use the live weights instead of the EMA ones")
    g.add_argument("--device", default="cpu")
    return g


# ---------------------------------------------------------------------------------------------------------- synth
def synth_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True)
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--fps", type=float, default=25.0)
    p.add_argument("--seed", type=int, default=0)


def synth(args: argparse.Namespace) -> int:
    from pipeline.synth import synthesize

    paths = synthesize(args.out, clips=args.clips, seconds=args.seconds, size=args.size, fps=args.fps, seed=args.seed)
    print(f"wrote {len(paths)} clips to {args.out}")
    return 0


# -------------------------------------------------------------------------------------------------------- fit-vae
def fit_vae_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("videos")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--max-steps", type=int, default=600)
    p.add_argument("--max-time", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--seed", type=int, default=0)


def fit_vae(args: argparse.Namespace) -> int:
    from lightning_modules.vae import fit_vae as fit

    fit(args.videos, args.out, size=args.size, max_steps=args.max_steps, max_time_s=args.max_time, seed=args.seed)
    return 0


# -------------------------------------------------------------------------------------------------------- prepare
def prepare_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inputs and output")
    g.add_argument("inputs", nargs="?", help="a folder of videos, a text list of paths, or a CSV/JSONL list "
                   "with path, speaker and optional split (train|val) columns")
    g.add_argument("--out", help="dataset folder (shards + manifest)")
    g.add_argument("--val-percent", type=float, default=10.0,
                   help="percent of speakers (hashed) sent to val where the list gives no split")
    g = p.add_argument_group("encoders")
    g.add_argument("--vae", help="diffusers AutoencoderKL or AutoencoderDC folder (from_pretrained)")
    g.add_argument("--audio-encoder", default="mel", choices=["mel", "wav2vec2", "whisper"])
    g.add_argument("--audio-encoder-path", default=None, help="wav2vec2 or Whisper folder (from_pretrained)")
    g.add_argument("--audio-encoder-layers", default="-1",
                   help="hidden states to average, comma-separated (0 = input embedding, -1 = last layer)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="encoder weights; auto: bfloat16 on a GPU, float32 on the CPU")
    g.add_argument("--batch-size", type=int, default=16, help="frames per VAE encode call")
    g.add_argument("--device", default="cpu")
    g = p.add_argument_group("frames")
    g.add_argument("--fps", type=float, default=25.0, help="target frame rate; 16000 / fps must be an integer")
    g.add_argument("--size", type=int, default=64)
    g.add_argument("--crop", default="center", choices=["center", "face"])
    g.add_argument("--detect-every", type=int, default=1,
                   help="with --crop face: detect faces on every k-th frame, interpolate between (~k times faster)")
    g = p.add_argument_group("segments and shards")
    g.add_argument("--segment-seconds", type=float, default=4.0)
    g.add_argument("--min-segment-seconds", type=float, default=1.0)
    g.add_argument("--samples-per-shard", type=int, default=64)
    g = p.add_argument_group("array jobs and failures")
    g.add_argument("--task-index", type=int, default=None, help="default: $SLURM_ARRAY_TASK_ID (else 0)")
    g.add_argument("--num-tasks", type=int, default=None, help="default: $SLURM_ARRAY_TASK_COUNT (else 1)")
    g.add_argument("--merge", metavar="DIR", default=None,
                   help="join the task manifests in DIR into DIR/manifest.json (no other arguments)")
    g.add_argument("--retry-failed", action="store_true", help="retry inputs an earlier run recorded as failed")
    g.add_argument("--strict", action="store_true", help="exit non-zero if any input failed")


def prepare(args: argparse.Namespace) -> int:
    from pipeline.prepare import merge, prepare, slurm_task, summary

    if args.merge:
        manifest = merge(args.merge)
        print(summary(manifest))
    else:
        if not (args.inputs and args.out and args.vae):
            raise ValueError("needs INPUTS, --out and --vae (or --merge DIR)")
        env_index, env_count = slurm_task()
        manifest = prepare(args.inputs, args.out, vae_path=args.vae, audio_encoder=args.audio_encoder,
                           audio_encoder_path=args.audio_encoder_path,
                           audio_encoder_layers=[int(i) for i in args.audio_encoder_layers.split(",")],
                           dtype=args.dtype, fps=args.fps, size=args.size,
                           crop=args.crop, detect_every=args.detect_every, segment_seconds=args.segment_seconds,
                           min_segment_seconds=args.min_segment_seconds, samples_per_shard=args.samples_per_shard,
                           batch_size=args.batch_size, val_percent=args.val_percent,
                           task_index=env_index if args.task_index is None else args.task_index,
                           num_tasks=env_count if args.num_tasks is None else args.num_tasks,
                           retry_failed=args.retry_failed, device=args.device)
    nothing = bool(manifest.failed) and not manifest.inputs
    return 1 if nothing or (args.strict and manifest.failed) else 0


# ---------------------------------------------------------------------------------------------------------- check
def check_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="the dataset folder (manifest.json, index.npz, shards)")
    p.add_argument("--clip-frames", type=int, default=None, help="also count segments shorter than this")
    p.add_argument("--fast", action="store_true",
                   help="sizes and the index only: one stat per shard, no decoding, no hashing")
    p.add_argument("--workers", type=int, default=None, help="processes (default: min(8, CPU cores))")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the report as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (there is none without a terminal)")


def check(args: argparse.Namespace) -> int:
    from pipeline.check import check_dataset, format_report, write_report

    try:
        report = check_dataset(args.data, args.clip_frames, args.fast, args.workers, not args.no_progress)
    except FileNotFoundError as err:  # DATA has no manifest: a usage error
        print(f"letstalk check: error: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        write_report(report, args.json)
    return 0 if report["ok"] else 1


# ------------------------------------------------------------------------------------------------------- generate
def generate_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inputs and output")
    g.add_argument("--checkpoint", required=True, help="a .ckpt written by `letstalk fit`, or a `letstalk export`")
    g.add_argument("--portrait", help="image (png/jpg) or a video whose first frame is used")
    g.add_argument("--audio", help="wav, flac, mp3, m4a, or a video with an audio track; any rate and channels")
    g.add_argument("--out", help="output .mp4")
    g.add_argument("--batch", default=None, metavar="ROWS.csv",
                   help="generate every row of a CSV with columns portrait,audio,out[,seed]; report beside the CSV")
    g.add_argument("--size", type=int, default=None, help="frame size; must be the model's (checked)")
    g.add_argument("--crop", default=None, choices=["face", "center", "none"],
                   help="portrait crop (default: face when facenet-pytorch is installed, else center)")
    encoder_options(p)
    g = sampling_options(p)
    g.add_argument("--clips-per-batch", type=int, default=16,
                   help="independent clips sampled in one batched network call per step (fewer: less memory)")
    g = p.add_argument_group("provenance")
    g.add_argument("--no-provenance", action="store_true",
                   help="no watermark and no AI-generated metadata (not recommended)")
    g.add_argument("--consent", default=None, metavar="REF", help="consent reference for the portrait, kept in metadata")
    g.add_argument("--c2pa-cert", default=None, help="PEM certificate chain (signing cert first) for a C2PA manifest")
    g.add_argument("--c2pa-key", default=None, help="PEM private key of --c2pa-cert")


def generate(args: argparse.Namespace) -> int:
    from pipeline.generate import default_crop, generate, generate_batch

    options = dict(vae=args.vae, audio_encoder=args.audio_encoder_path, sampler=args.sampler, steps=args.steps,
                   **guidance(args), seed=args.seed, ema=not args.no_ema, device=args.device,
                   clips_per_batch=args.clips_per_batch, size=args.size, crop=args.crop or default_crop(),
                   provenance_marks=not args.no_provenance, consent=args.consent, c2pa_cert=args.c2pa_cert,
                   c2pa_key=args.c2pa_key)
    if args.batch:
        return 1 if generate_batch(args.batch, args.checkpoint, **options)["failed"] else 0
    if not (args.portrait and args.audio and args.out):
        raise ValueError("generate needs --portrait, --audio and --out (or --batch rows.csv)")
    generate(args.checkpoint, args.portrait, args.audio, args.out, **options)
    return 0


# --------------------------------------------------------------------------------------------------------- verify
def verify_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("video")
    p.add_argument("--trust-anchors", default=None, help="PEM root certificate(s) to trust for C2PA validation")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")


def verify(args: argparse.Namespace) -> int:
    from pipeline.provenance import print_verification, verify

    result = verify(args.video, args.trust_anchors)
    print_verification(result, as_json=args.json)
    return 0 if result["watermark"]["found"] else 1


# ------------------------------------------------------------------------------------------------------- evaluate
def evaluate_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model, data and output")
    g.add_argument("--checkpoint", required=True, help="a .ckpt written by `letstalk fit` or an exported .safetensors")
    g.add_argument("--data", required=True, help="dataset folder (manifest.json + shards), ideally held-out videos")
    g.add_argument("--num-clips", type=int, default=16, help="segments to generate, chosen by --seed")
    g.add_argument("--out", default=None, help="write the results as JSON here")
    g = p.add_argument_group("metric weights (a metric without its weights is skipped, naming the flag)")
    g.add_argument("--fid-weights", default=None, help="pt_inception-2015-12-05-6726825d.pth (pytorch-fid)")
    g.add_argument("--fvd-weights", default=None, help="i3d_pretrained_400.pt (piergiaj/pytorch-i3d layout)")
    g.add_argument("--syncnet-weights", default=None, help="syncnet_v2.model (syncnet_python)")
    g.add_argument("--fid-frames-per-clip", type=int, default=None,
                   help="evenly spaced frames per clip for FID (default: every frame)")
    encoder_options(p)
    sampling_options(p)


def evaluate(args: argparse.Namespace) -> int:
    from pipeline.evaluate import MetricsConfig, evaluate

    metrics = MetricsConfig(fid_weights=args.fid_weights, fvd_weights=args.fvd_weights,
                            syncnet_weights=args.syncnet_weights, fid_frames_per_clip=args.fid_frames_per_clip)
    evaluate(args.checkpoint, args.data, num_clips=args.num_clips, seed=args.seed, metrics=metrics, out=args.out,
             steps=args.steps, sampler=args.sampler, **guidance(args), ema=not args.no_ema, vae=args.vae,
             audio_encoder=args.audio_encoder_path, device=args.device)
    return 0


# --------------------------------------------------------------------------------------------------------- export
def export_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="output .safetensors; the config goes beside it as .json")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="export the EMA weights, as generate uses them (default); --no-ema: the live weights")
    encoder_options(p, "encoders to record instead of the checkpoint's (re-homing a moved model)")


def export(args: argparse.Namespace) -> int:
    from pipeline.checkpoints import export

    export(args.checkpoint, args.out, ema=args.ema, vae=args.vae, audio_encoder=args.audio_encoder_path)
    return 0


# ---------------------------------------------------------------------------------------------------------- sweep
def sweep_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grid", action="append", default=None, metavar="KEY=V1,V2",
                   help="a config key and its values; repeat for a product grid (default: model.net.size=S,B,L,XL)")
    p.add_argument("--runs", default="runs/sweep", help="parent folder of the runs")
    p.add_argument("--name", default="sweep", help="job-name prefix and W&B group")
    p.add_argument("--sbatch", default="", help="extra sbatch options, e.g. '--nodes=2 --time=24:00:00'")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch commands, submit nothing")
    p.add_argument("fit_args", nargs=argparse.REMAINDER, help="`letstalk fit` arguments after --")


def sweep(args: argparse.Namespace) -> int:
    import shlex

    from pipeline.cli.sweep import run_sweep

    fit_args = args.fit_args[1:] if args.fit_args[:1] == ["--"] else args.fit_args
    run_sweep(fit_args, args.grid, args.runs, args.name, shlex.split(args.sbatch), args.dry_run)
    return 0


# ---------------------------------------------------------------------------------------------------------- paths
def paths(args: argparse.Namespace) -> int:
    from pipeline.shipped import CONFIGS, SLURM

    print(f"configs {CONFIGS}\nslurm   {SLURM}")
    return 0


# ----------------------------------------------------------------------------------------------------------- demo
def demo_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--fast", action="store_true", help="a much shorter run (for tests); sync scores are not meaningful")


def demo(args: argparse.Namespace) -> int:
    from pipeline.cli.demo import run_demo

    run_demo(args.out, fast=args.fast)
    return 0


# ------------------------------------------------------------------------------------------------------------ app
def app_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", action="append", default=[], help="a checkpoint offered on the page; repeatable")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--out", default=None, help="folder for the generated videos (default: a temp folder)")
    p.add_argument("--device", default="cpu")


def app(args: argparse.Namespace) -> int:
    try:
        from pipeline.app import serve
    except ModuleNotFoundError as err:
        raise OSError(f"{err.name} is not installed: pip install 'letstalk[app]'") from err

    serve(args.checkpoint, host=args.host, port=args.port, out_dir=args.out, device=args.device)
    return 0


COMMANDS: dict[str, Command] = {
    "synth": Command("draw a synthetic talking-head dataset", synth_options, synth),
    "fit-vae": Command("train the small demo AutoencoderKL on a folder of videos", fit_vae_options, fit_vae),
    "prepare": Command("videos -> WebDataset shards + manifest.json (one task of an array job)", prepare_options,
                       prepare),
    "generate": Command("portrait + audio -> talking video (or --batch rows.csv)", generate_options, generate),
    "verify": Command("check a video for the watermark, AI-generated metadata and a C2PA manifest", verify_options,
                      verify),
    "evaluate": Command("generate a seeded subset of a dataset and score it (FID, FVD, Sync-C/D)", evaluate_options,
                        evaluate),
    "check": Command("verify a prepared dataset (sizes, hashes, members, arrays, audio alignment); exit 1 on a "
                     "problem, 0 with warnings only (a split no speaker went to)", check_options, check),
    "export": Command("checkpoint (a .ckpt or a DeepSpeed checkpoint folder) -> safetensors + config", export_options,
                      export),
    "sweep": Command("submit one SLURM job (slurm/train.sbatch) per grid point", sweep_options, sweep),
    "paths": Command("where the shipped configs and SLURM scripts are (for --config and sbatch)", lambda p: None,
                     paths),
    "demo": Command("synthesise, fit VAE, prepare, train, generate, measure lip sync", demo_options, demo),
    "app": Command("a web page to upload a portrait and audio and get the video (needs letstalk[app])", app_options,
                   app),
}

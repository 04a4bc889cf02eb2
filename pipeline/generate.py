"""`letstalk generate`: one portrait + one audio file -> a talking video (no Lightning needed).

Inputs: a portrait image (or a video's first frame), face-cropped (`pipeline.faces`), centre-cropped
or used whole; audio in any format ffmpeg or libsndfile reads (wav, flac, mp3, m4a, a video's audio
track), any rate and channel count, which the model gets resampled to 16 kHz mono. The video has
round(seconds × fps) frames (`frame_count`); its soundtrack is the user's audio at its own rate and
channels (more than two downmixed to stereo), trimmed or padded with silence to exactly the video's
length (at most half a frame). Every output carries provenance marks unless switched off
(`pipeline.provenance`). The model's encoders are found with `pipeline.locate` (overrides:
`encoders`).

Audio longer than one clip is covered by consecutive clips that share the portrait,
the seed stream and the guidance settings; the output's length matches the audio. A model with
long-video options chains the clips: each clip after the first is conditioned on the last
motion_frames latents generated so far and on a memory bank of earlier generated latents
(`pipeline.models.long_video`), both noised to cond_noise_infer.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from tqdm import tqdm

from pipeline import media, provenance
from pipeline.audio_encoders import AudioEncoder, audio_windows, build_audio_encoder
from pipeline.checkpoints import CheckpointError, read_weights, recorded_in
from pipeline.diffusion import AUDIO_SCALE, REF_SCALE, Diffusion, DiffusionConfig, guidance
from pipeline.locate import locate_encoders
from pipeline.models.dit import DiTConfig, LetsTalkDiT
from pipeline.models.long_video import noise_context
from pipeline.options import EncoderPaths, Framing, PortraitCrop, Provenance, Sampling
from pipeline.progress import ProgressLines
from pipeline.vae import decode_latents, encode_frames, load_vae, scale_latents, unscale_latents

CROPS = typing.get_args(PortraitCrop)
MIN_AUDIO_S = 0.2  # shorter audio is refused: not enough speech to drive a mouth
SILENCE_RMS = 1e-3  # -60 dBFS: quieter audio is refused as silent


class GenerationError(ValueError):
    """Generation refused: bad input or settings; the message names the file and what to do."""


@dataclass
class TrainedNetwork:
    """A trained model with everything generation needs: network, diffusion and data description."""

    net: LetsTalkDiT
    diffusion: Diffusion
    data_info: dict
    timings: dict[str, float] = field(default_factory=dict)
    _encoders: dict[str, AudioEncoder] = field(default_factory=dict, repr=False)

    def audio_encoder(self, device: str = "cpu") -> AudioEncoder:
        """The audio encoder the training data was made with (same weights and layers), built once per device."""
        if device not in self._encoders:
            spec, fps = self.data_info["audio_encoder"], float(self.data_info["fps"])
            self._encoders[device] = build_audio_encoder(spec["name"], spec.get("path"), fps=fps, device=device,
                                                         layers=spec.get("layers", -1))
        return self._encoders[device]


def load_network(checkpoint: str | Path, ema: bool = True, device: str = "cpu", vae: str | Path | None = None,
                   audio_encoder: str | Path | None = None) -> TrainedNetwork:
    """Build the network from a checkpoint's config and load its weights (`pipeline.checkpoints.read_weights`).

    The encoder folders are found once here (`pipeline.locate.locate_encoders`: the `vae` / `audio_encoder`
    overrides, else the recorded paths), and the network's `data_info` holds the folders found. On a GPU,
    float32 matmuls may use TF32 tensor cores (`set_float32_matmul_precision("high")`), as sampling does not need
    full fp32 products; benchmarks/gpu_check.sh times generation there."""
    if torch.device(device).type == "cuda":
        torch.set_float32_matmul_precision("high")
    config, state = read_weights(checkpoint, ema=ema)
    config["data_info"] = locate_encoders(config["data_info"], recorded_in(checkpoint), vae, audio_encoder)
    try:
        net = LetsTalkDiT.from_weights(DiTConfig(**config["net"]), state, device)
    except ValueError as err:
        raise CheckpointError(f"{checkpoint}: {err}") from None
    return TrainedNetwork(net, Diffusion(DiffusionConfig(**config["diffusion"])), config["data_info"])


def read_portrait(path: str | Path, size: int, crop: str = "center") -> np.ndarray:
    """A portrait image (or a video's first frame) as uint8 [1, size, size, 3].

    crop: "face" (detect the face and crop it as training data was, `pipeline.faces`; needs
    facenet-pytorch), "center" (centre square) or "none" (the whole image resized to a square).
    """
    path = Path(path)
    if crop not in CROPS:
        raise GenerationError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
    is_video = path.suffix.lower() in media.VIDEO_EXTENSIONS
    if crop == "center":
        return media.read_video(path, size=size)[:1] if is_video else media.read_image(path, size=size)[None]
    image = media.read_video(path)[0] if is_video else media.read_image(path)  # [H, W, 3]
    if crop == "none":
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()  # [1, 3, H, W]
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [1, size, size, 3]
    try:
        from pipeline import faces

        face, warnings = faces.crop_portrait(image, size, name=str(path))
    except ImportError as err:
        raise GenerationError(f"{path}: --crop face needs facenet-pytorch ({err}); install it or use --crop center") \
            from err
    except faces.NoFaceError as err:
        raise GenerationError(f"{err}; use a photo with a clearly visible face, or --crop center to use the image "
                              "as it is") from err
    for warning in warnings:
        print(f"warning: {warning}")
    return face[None]


def default_crop() -> str:
    """"face" when facenet-pytorch is installed, else "center" (with a note saying so)."""
    if importlib.util.find_spec("facenet_pytorch") is not None:
        return "face"
    print("note: facenet-pytorch is not installed, so the portrait is centre-cropped, not face-aligned "
          "(pip install facenet-pytorch for --crop face)")
    return "center"


def check_audio(waveform: np.ndarray, source: str | Path) -> None:
    """Refuse audio a talking video cannot be made from: shorter than MIN_AUDIO_S or silent (RMS below SILENCE_RMS)."""
    seconds = len(waveform) / media.SAMPLE_RATE
    if seconds < MIN_AUDIO_S:
        raise GenerationError(f"{source}: audio is too short ({seconds:.3f} s); "
                              f"give at least {MIN_AUDIO_S} s of speech")
    rms = float(np.sqrt(np.mean(np.square(waveform, dtype=np.float64))))
    if rms < SILENCE_RMS:
        raise GenerationError(f"{source}: audio is silent (RMS {rms:.2e}, below {SILENCE_RMS:.0e} = -60 dBFS); "
                              "check the file has speech and is not muted")


def frame_count(num_samples: int, fps: float) -> int:
    """Video frames for audio of `num_samples` at 16 kHz: round(seconds × fps), halves rounded up."""
    return int(math.floor(num_samples * fps / media.SAMPLE_RATE + 0.5))


def step_progress(total: int, label: str, detail: str = "", stream: TextIO | None = None,
                  clock: Callable[[], float] = time.monotonic) -> tqdm | ProgressLines:
    """Progress over `total` denoising steps on `stream` (default stderr): a tqdm bar (with ETA) where it is a
    terminal, else `ProgressLines`: every 10 % of the steps or 30 s of `clock`, whichever comes first."""
    stream = stream or sys.stderr
    if stream.isatty():
        return tqdm(total=total, desc=label, unit="step", file=stream)
    return ProgressLines(total, f"{label}: steps", detail, interval=30.0, fraction=0.1, clock=clock, stream=stream)


@torch.no_grad()
def sample_latents(gen: TrainedNetwork, ref: torch.Tensor, windows: torch.Tensor, sampler: str | None = None,
                   steps: int | None = None, audio_scale: float = AUDIO_SCALE, ref_scale: float = REF_SCALE,
                   seed: int = 0, on_step: Callable[[int], None] | None = None, chain: bool = True,
                   clips_per_batch: int = 16) -> torch.Tensor:
    """Scaled latents [T, C, h, w] for portrait latents ref [R, C, h, w] and audio windows [T, W, D], clip by clip.

    Clips of clip_frames follow each other (the last one is padded with the last audio window and
    cut); with motion frames / a memory bank, clip i is conditioned on the latents generated before it
    (`chain=False`, for ablations: every clip starts afresh from the null motion and memory). Clips that
    do not depend on each other are sampled `clips_per_batch` at a time, one batched network call per
    step (with guidance, one batch of 3 × the clips); their noise is drawn clip by clip from the seed,
    so the video equals clip-by-clip sampling up to float summation order. A `residual` model samples
    the change from the portrait; the portrait's latent is added back before anything reads it.
    `on_step(n)` is called after every network evaluation, with the n clips it advanced by one step.
    """
    cfg, clip = gen.net.config, int(gen.data_info["clip_frames"])
    num_frames = windows.shape[0]
    clips = math.ceil(num_frames / clip)
    pad = clips * clip - num_frames
    windows = torch.cat([windows, windows[-1:].expand(pad, -1, -1)]) if pad else windows
    audio = windows.view(clips, clip, *windows.shape[1:])  # [N, F, W, D]
    shape = (1, clip, *ref.shape[1:])
    rng = torch.Generator(device="cpu").manual_seed(seed)
    long_video = cfg.long_video
    chained = chain and long_video.active
    group = 1 if chained else max(1, clips_per_batch)
    latents: list[torch.Tensor] = []  # [k·F, C, h, w] per batch of k clips
    for first in range(0, clips, group):
        k = min(group, clips - first)
        context = {}
        if first and chained:
            history = torch.cat(latents)[None]  # [1, i·F, C, h, w]
            for key, index in long_video.indices(first * clip).items():
                context[key] = noise_context(gen.diffusion, history[:, index], long_video.cond_noise_infer, rng)

        def denoiser(x, t, drop_ref, drop_audio, a=audio[first:first + k], k=k, context=context):
            n = x.shape[0]  # k clips x the guidance branches, branch-major (Diffusion.guided)
            batch = {key: value.expand(n, -1, -1, -1, -1) for key, value in context.items()}
            out = gen.net(x, t, ref[None].expand(n, -1, -1, -1, -1), a.repeat(n // k, 1, 1, 1), drop_ref, drop_audio,
                          **batch)
            if on_step is not None:
                on_step(k)
            return out

        noise = torch.cat([torch.randn(shape, generator=rng) for _ in range(k)]).to(ref.device)  # [k, F, C, h, w]
        z = gen.diffusion.sample(denoiser, noise.shape, sampler, steps, audio_scale, ref_scale, noise=noise)
        latents.append((z + ref[None, :1] if cfg.residual else z).flatten(0, 1))  # residual: the portrait added back
    return torch.cat(latents)[:num_frames]


@torch.no_grad()
def generate_frames(gen: TrainedNetwork, portrait: np.ndarray, waveform: np.ndarray, vae, sampler: str | None = None,
                    steps: int | None = None, audio_scale: float = AUDIO_SCALE, ref_scale: float = REF_SCALE,
                    seed: int = 0, device: str = "cpu", on_step: Callable[[int], None] | None = None,
                    chain: bool = True, clips_per_batch: int = 16) -> np.ndarray:
    """Frames uint8 [T, H, W, 3] for `waveform` (16 kHz mono), T = `frame_count` (audio duration × fps, rounded)."""
    info = gen.data_info
    fps = float(info["fps"])
    num_frames = frame_count(len(waveform), fps)
    if num_frames < 1:
        raise GenerationError(f"audio of {len(waveform) / media.SAMPLE_RATE:.3f} s is shorter than one video frame")
    t0 = time.perf_counter()
    features = torch.from_numpy(gen.audio_encoder(device).encode(waveform, num_frames, fps))  # [T, K, D]
    windows = audio_windows(features, int(info["audio_radius"]))  # [T, W, D]
    ref = scale_latents(torch.from_numpy(encode_frames(vae, portrait)).float(), info["vae"]).to(device)  # [1, C, h, w]
    gen.timings["encode"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    z = sample_latents(gen, ref, windows.to(device), sampler, steps, audio_scale, ref_scale, seed, on_step, chain,
                       clips_per_batch)  # [T, C, h, w]
    gen.timings["denoise"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    frames = decode_latents(vae, unscale_latents(z.float().cpu(), info["vae"]))
    gen.timings["decode"] = time.perf_counter() - t0
    return frames


@dataclass
class LoadedModel:
    """A trained network with its VAE and the identity of the weights, loaded once for many videos."""

    gen: TrainedNetwork
    vae: object
    model_id: str
    checkpoint_sha256: str
    device: str


def load_model(checkpoint: str | Path, vae: str | Path | None = None, audio_encoder: str | Path | None = None,
               ema: bool = True, device: str = "cpu") -> LoadedModel:
    """Load network, VAE and checkpoint hash; refuse a VAE whose latent channels differ from the network's.
    `vae` / `audio_encoder`: folders to use instead of the recorded ones (`load_network`)."""
    gen = load_network(checkpoint, ema=ema, device=device, vae=vae, audio_encoder=audio_encoder)
    info = gen.data_info
    vae_path = info["vae"]["path"]
    vae = load_vae(vae_path, device=device)
    vae_channels, net_channels = int(vae.config.latent_channels), int(gen.net.config.latent_channels)
    if vae_channels != net_channels:
        raise CheckpointError(f"{vae_path}: the VAE has {vae_channels} latent channels but {checkpoint} was trained on "
                              f"{net_channels}; pass the VAE the training data was prepared with (--vae)")
    sha = provenance.checkpoint_sha256(checkpoint)
    model_id = f"letstalk-{gen.net.config.size}-{int(info['size'])}px:{Path(checkpoint).name}"
    return LoadedModel(gen, vae, model_id, sha, device)


def generate(checkpoint: str | Path | LoadedModel, portrait: str | Path, audio: str | Path, out: str | Path,
             sampling: Sampling = Sampling(), framing: Framing = Framing(), encoders: EncoderPaths = EncoderPaths(),
             marks: Provenance = Provenance(), clips_per_batch: int = 16, device: str = "cpu",
             progress: Callable[[float, str], None] | None = None) -> dict:
    """Write `out` (H.264 yuv420p + AAC mp4, faststart) and return a summary with timings and the real-time factor.

    `checkpoint` may be a path or an already loaded `LoadedModel` (batch mode, the app); `encoders` replace the encoder
    folders it records (`load_model`). The option groups (`pipeline.options`) say what each setting does; a
    setting left None takes its default here (sampler and steps from the model's objective, guidance from
    `pipeline.diffusion`, crop from `default_crop`). With `marks.marks` (default) the frames carry an invisible
    watermark and the container says the video is AI-generated (`pipeline.provenance`); `marks.c2pa_cert` +
    `marks.c2pa_key` add a signed C2PA manifest. The soundtrack is `audio` as given (its rate and channels,
    `media.read_audio_native`). Bad input raises a ValueError subclass naming the file; `out` is written only
    complete (temporary file + rename). `progress(fraction, message)` is called as work proceeds; the denoising
    steps show as a bar on a terminal and as plain lines in a log (`step_progress`).
    """
    steps, seed, size = sampling.steps, sampling.seed, framing.size
    audio_scale, ref_scale = guidance(sampling.audio_scale, sampling.ref_scale)
    crop = framing.crop or default_crop()
    consent, c2pa_cert, c2pa_key = marks.consent, marks.c2pa_cert, marks.c2pa_key
    report = progress or (lambda fraction, message: None)
    if (steps is not None and steps < 1) or clips_per_batch < 1:
        raise GenerationError(f"steps and clips_per_batch must be at least 1, got {steps} and {clips_per_batch}")
    if (c2pa_cert is None) != (c2pa_key is None):
        raise GenerationError("C2PA signing needs both a certificate chain (--c2pa-cert) and its key (--c2pa-key)")
    if c2pa_cert is not None:
        provenance.check_c2pa_signer(c2pa_cert, c2pa_key)
    out = Path(out)
    report(0.0, "loading model")
    try:
        model = checkpoint if isinstance(checkpoint, LoadedModel) else load_model(
            checkpoint, encoders.vae, encoders.audio_encoder_path, sampling.ema, device)
    except torch.cuda.OutOfMemoryError as err:
        raise _out_of_memory(out, err) from err
    gen, info = model.gen, model.gen.data_info
    sampler, steps = gen.diffusion.sampling(sampling.sampler, steps)
    model_size = int(info["size"])
    if size is not None and size != model_size:
        raise GenerationError(f"--size {size} does not match the model, which makes {model_size}x{model_size} videos; "
                              f"omit --size or use a checkpoint trained at {size}")
    report(0.02, "reading inputs")
    image = read_portrait(portrait, model_size, crop)
    waveform = media.read_audio(audio)  # the model's input: 16 kHz mono
    check_audio(waveform, audio)
    soundtrack, soundtrack_rate = media.read_audio_native(audio)  # the video's: as the user gave it
    fps = float(info["fps"])
    clips = math.ceil(frame_count(len(waveform), fps) / int(info["clip_frames"]))
    total = clips * steps
    bar = step_progress(total, f"generating {out.name}", f" ({clips} clips x {steps} steps)")
    done = 0

    def on_step(clips_advanced: int) -> None:
        nonlocal done
        done += clips_advanced
        bar.update(clips_advanced)
        report(0.05 + 0.85 * done / total, f"denoising: step {done} of {total} ({clips} clips x {steps} steps)")

    try:
        frames = generate_frames(gen, image, waveform, model.vae, sampler, steps, audio_scale, ref_scale, seed,
                                 model.device, on_step, clips_per_batch=clips_per_batch)
    except torch.cuda.OutOfMemoryError as err:
        raise _out_of_memory(out, err) from err
    finally:
        bar.close()
    t0 = time.perf_counter()
    tags = None
    if marks.marks:
        report(0.92, "watermarking")
        payload = provenance.payload_id(model.checkpoint_sha256, seed)
        frames = provenance.embed_watermark(frames, payload)
        tags = provenance.provenance_metadata(model.model_id, model.checkpoint_sha256, seed, payload, consent)
    else:
        print(f"warning: {out} carries no provenance marks (no watermark, no AI-generated metadata)")
    gen.timings["watermark"] = time.perf_counter() - t0
    report(0.95, "writing video")
    t0 = time.perf_counter()
    _write(out, frames, fps, soundtrack, soundtrack_rate, tags, c2pa_cert, c2pa_key)  # audio fitted to the frames
    gen.timings["mux"] = time.perf_counter() - t0
    seconds = len(frames) / fps
    summary = {"out": str(out), "frames": len(frames), "seconds": seconds, "seed": seed, "sampler": sampler,
               "steps": steps,
               "checkpoint_sha256": model.checkpoint_sha256, "watermark_payload": tags and tags["watermark_payload"],
               "c2pa": c2pa_cert is not None, **gen.timings,
               "real_time_factor": sum(gen.timings.values()) / seconds}
    report(1.0, "done")
    print(f"wrote {out}: {len(frames)} frames, {seconds:.2f} s, real-time factor {summary['real_time_factor']:.2f}")
    return summary


def _out_of_memory(out: Path, err: torch.cuda.OutOfMemoryError) -> GenerationError:
    return GenerationError(f"{out}: out of GPU memory ({str(err).splitlines()[0]}); try "
                           "--clips-per-batch 1, shorter audio, a smaller model, or --device cpu")


def _write(out: Path, frames: np.ndarray, fps: float, audio: np.ndarray, sample_rate: int,
           tags: dict[str, str] | None, c2pa_cert: str | Path | None, c2pa_key: str | Path | None) -> None:
    """Encode, then sign into a temporary file renamed onto `out`: a failing step leaves no `out`."""
    if c2pa_cert is None:
        media.write_video(out, frames, fps, audio=audio, sample_rate=sample_rate, metadata=tags)
        return
    unsigned = out.with_name(f".{out.stem}.unsigned{out.suffix or '.mp4'}")
    signed = out.with_name(f".{out.stem}.signed{out.suffix or '.mp4'}")
    try:
        media.write_video(unsigned, frames, fps, audio=audio, sample_rate=sample_rate, metadata=tags)
        provenance.sign_c2pa(unsigned, signed, c2pa_cert, c2pa_key, tags)
        os.replace(signed, out)
    finally:
        unsigned.unlink(missing_ok=True)
        signed.unlink(missing_ok=True)


def generate_batch(rows_csv: str | Path, checkpoint: str | Path, report_path: str | Path | None = None,
                   sampling: Sampling = Sampling(), encoders: EncoderPaths = EncoderPaths(), device: str = "cpu",
                   **options) -> dict:
    """Generate every row of a CSV (columns portrait, audio, out, optional seed) with one loaded model; `options`
    are `generate`'s other keywords.

    Relative paths are relative to the CSV's folder. A failing row is recorded with its reason and
    the rest go on. The report (rows with status, reason, seconds) is written as JSON to
    `report_path` (default: <csv stem>.report.json beside the CSV) and returned.
    """
    rows_csv = Path(rows_csv)
    if not rows_csv.is_file():
        raise GenerationError(f"{rows_csv}: batch CSV not found")
    with open(rows_csv, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"portrait", "audio", "out"} - set(reader.fieldnames or [])
        if missing:
            raise GenerationError(f"{rows_csv}: missing column(s) {', '.join(sorted(missing))}; "
                                  "expected portrait,audio,out[,seed]")
        rows = list(reader)
    model = load_model(checkpoint, encoders.vae, encoders.audio_encoder_path, sampling.ema, device)
    base, results = rows_csv.parent, []
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        result = {"line": number, **{key: row.get(key) for key in ("portrait", "audio", "out", "seed")}}
        t0 = time.perf_counter()
        try:
            seed = int(row["seed"]) if row.get("seed") not in (None, "") else sampling.seed
            paths = [base / (row.get(key) or "") for key in ("portrait", "audio", "out")]
            if not all(row.get(key) for key in ("portrait", "audio", "out")):
                raise GenerationError(f"{rows_csv}:{number}: empty portrait, audio or out")
            generate(model, *paths, replace(sampling, seed=seed), device=device, **options)
            result.update(status="ok", reason=None)
        except (ValueError, OSError) as err:  # bad input: our errors are ValueErrors naming the file
            result.update(status="failed", reason=str(err))
        result["seconds"] = round(time.perf_counter() - t0, 3)
        results.append(result)
    failed = [r for r in results if r["status"] == "failed"]
    summary = {"csv": str(rows_csv), "checkpoint": str(checkpoint), "rows": len(results),
               "ok": len(results) - len(failed), "failed": len(failed), "results": results}
    report_path = Path(report_path) if report_path else rows_csv.with_name(f"{rows_csv.stem}.report.json")
    tmp = report_path.with_name(report_path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, report_path)
    print(f"batch: {summary['ok']} of {len(results)} rows ok; report {report_path}")
    for row in failed:
        print(f"  line {row['line']} failed: {row['reason']}")
    return summary

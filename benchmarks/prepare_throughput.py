"""Throughput of each `letstalk prepare` stage, in video frames per second, on one clip.

Stages: decode (decord, source resolution, constant 25 fps), face detection (MTCNN, every frame
and every `--detect-stride`-th frame), face track + crop to `--size`², VAE encode of the crops,
audio encode (log-mel, and wav2vec2 with `--audio-encoder-path`), shard write (WebDataset tar).

The default clip is made here: scikit-image's `astronaut` photo (a real face) moving over a
background at `--source` resolution with a speech-like voice, encoded to H.264 + AAC by ffmpeg.
`--video` takes a real clip instead. Each stage also reports its process CPU time: frames per
CPU-second is what one core does on its own, which holds on a shared machine where wall-clock
rates depend on the other load (it counts all threads of this process, decord's decoder included).
`--vae demo` is the tiny random demo VAE (f4), `--vae sd`
an SD-VAE-architecture AutoencoderKL with random weights (the real model's compute, no download),
anything else a diffusers VAE folder.

    python benchmarks/prepare_throughput.py [--video clip.mp4] [--size 256|512] [--vae demo|sd|PATH]
        [--audio-encoder-path wav2vec2-dir] [--seconds 8] [--threads 2] [--out prepare.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from diffusers import AutoencoderKL

from pipeline import media
from pipeline.audio_encoders import MelEncoder, Wav2Vec2Encoder
from pipeline.faces import FaceDetector, crop_track, face_tracks
from pipeline.shards import AtomicShardWriter, Segment, sample_key
from pipeline.synth import speech_audio
from pipeline.vae import demo_vae_config, encode_frames, load_vae


def write_test_video(path: Path, width: int, height: int, seconds: float, fps: float) -> None:
    """The astronaut's head and shoulders (2/3 of the frame height: a talking-head framing) drifting
    over a gradient, with a voice."""
    from skimage.data import astronaut

    side = (2 * height // 3) // 2 * 2
    head = media.square_resize(astronaut()[20:240, 115:335][None], side)[0]
    count = int(seconds * fps)
    ramp = np.linspace(40, 200, width, dtype=np.float32)
    background = np.broadcast_to(np.stack([ramp, ramp[::-1], np.full(width, 120.0)], -1), (height, width, 3))
    frames = np.repeat(background.astype(np.uint8)[None], count, axis=0)
    for t in range(count):
        x = int((width - side) * (0.5 + 0.3 * np.sin(2 * np.pi * t / (4 * fps))))
        y = int((height - side) * (0.5 + 0.2 * np.cos(2 * np.pi * t / (3 * fps))))
        frames[t, y : y + side, x : x + side] = head
    audio, _ = speech_audio(np.random.default_rng(0), seconds)
    media.write_video(path, frames, fps, audio)


def build_vae(spec: str) -> torch.nn.Module:
    if spec == "demo":
        return AutoencoderKL(**demo_vae_config()).eval()
    if spec == "sd":  # SD-VAE architecture (128-256-512-512, 2 resnets, mid attention), random weights
        return AutoencoderKL(
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, sample_size=512,
        ).eval()
    return load_vae(spec)


def timed(rows: list[dict[str, Any]], stage: str, frames: int | None, fn: Callable[[], Any], note: str = "") -> Any:
    """Run `fn` once, append and print its row; `frames` None: the result's length."""
    start, cpu = time.perf_counter(), time.process_time()
    result = fn()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    frames, cpu = len(result) if frames is None else frames, max(cpu, 1e-6)
    rows.append({"stage": stage, "frames": frames, "seconds": round(seconds, 3),
                 "frames_per_s": round(frames / seconds, 1),
                 "cpu_s": round(cpu, 3), "frames_per_cpu_s": round(frames / cpu, 1), "note": note})
    print(f"  {stage:<28} {frames:>6} {seconds:8.2f} {frames / seconds:9.1f} {cpu:8.2f} {frames / cpu:9.1f}  {note}",
          flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", default=None, help="a real clip with audio (default: a synthetic one made here)")
    parser.add_argument("--source", default="1280x720", help="WxH of the synthetic clip")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of the synthetic clip")
    parser.add_argument("--size", type=int, default=256, choices=(256, 512), help="crop size")
    parser.add_argument("--detect-stride", type=int, default=3, help="also time detection on every k-th frame")
    parser.add_argument("--detect-side", type=int, default=256, help="FaceDetector detect_side")
    parser.add_argument("--min-face-size", type=int, default=24, help="FaceDetector min_face_size")
    parser.add_argument("--vae", default="demo", help="demo, sd, or a diffusers VAE folder")
    parser.add_argument("--vae-frames", type=int, default=0, help="encode only this many frames (0: all)")
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--audio-encoder-path", default=None, help="a wav2vec2 folder: also time wav2vec2")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (besides detection)")
    parser.add_argument("--detect-threads", type=int, default=1, help="torch threads during face detection")
    parser.add_argument("--out", default=None, help="write the table as JSON here")
    args = parser.parse_args()
    fps = float(media.FPS)
    rows: list[dict[str, Any]] = []
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.video) if args.video else Path(tmp) / "clip.mp4"
        if not args.video:
            width, height = (int(v) for v in args.source.split("x"))
            write_test_video(path, width, height, args.seconds, fps)
        print(f"{path}: {args.size}² crops, torch threads {args.threads} (detection {args.detect_threads}), "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print(f"  {'stage':<28} {'frames':>6} {'wall s':>8} {'frames/s':>9} {'CPU s':>8} {'/CPU-s':>9}")

        frames = timed(rows, "decode (decord)", None, lambda: media.read_video(path, fps=fps), "source resolution")
        audio = media.read_audio(path)
        count, height, width, _ = frames.shape

        detector = FaceDetector(detect_side=args.detect_side, min_face_size=args.min_face_size)
        torch.set_num_threads(args.detect_threads)
        detector.detect(frames[:2])  # warm-up
        detections = timed(rows, "face detect (every frame)", count, lambda: detector.detect(frames))
        if args.detect_stride > 1:
            timed(rows, f"face detect (stride {args.detect_stride})", count,
                  lambda: detector.detect(frames, stride=args.detect_stride))
        torch.set_num_threads(args.threads)
        tracks, cut = timed(rows, "face track", count, lambda: face_tracks(detections, width, height, fps))
        if not tracks:
            raise SystemExit(f"{path}: no face track found (cut out: {cut})")
        crops = timed(rows, f"face crop to {args.size}²", sum(t.end - t.start for t in tracks),
                      lambda: np.concatenate([crop_track(frames, t, args.size) for t in tracks]))

        vae = build_vae(args.vae)
        subset = crops[: args.vae_frames] if args.vae_frames else crops
        latents = timed(rows, f"VAE encode ({args.vae})", None, lambda: encode_frames(vae, subset, args.vae_batch))
        latents = np.resize(latents, (len(crops),) + latents.shape[1:])  # as many as crops, for the shard write

        mel = MelEncoder(fps=fps)
        features = timed(rows, "audio encode (mel)", count, lambda: mel.encode(audio, count, fps))
        if args.audio_encoder_path:
            w2v = Wav2Vec2Encoder(args.audio_encoder_path, fps=fps)
            features = timed(rows, "audio encode (wav2vec2)", count, lambda: w2v.encode(audio, count, fps),
                             note=f"K={w2v.K} D={w2v.D}")

        def write() -> int:
            """Crops' latents and audio as 4 s segments (FLAC included), the way prepare writes them."""
            length, sr = int(4 * fps), media.SAMPLE_RATE
            with AtomicShardWriter(Path(tmp) / "shards", max_samples=64) as writer:
                for index, start in enumerate(range(0, len(crops), length)):
                    end = min(start + length, len(crops))
                    wave = audio[round(start * sr / fps) : round(end * sr / fps)]
                    writer.write(Segment(sample_key("clip", index), latents[start:end],
                                         features[start:end].astype(np.float16), media.flac_bytes(wave, sr),
                                         {"fps": fps, "sample_rate": sr, "frames": end - start}))
            return sum(s["bytes"] for s in writer.shards)

        size = timed(rows, "shard write", len(crops), write)
        rows[-1]["note"] = f"{size / len(crops) / 1e3:.1f} kB/frame"

    result = {"video": str(args.video or f"synthetic {args.source} astronaut"), "size": args.size, "vae": args.vae,
              "detect_side": args.detect_side, "min_face_size": args.min_face_size, "threads": args.threads,
              "detect_threads": args.detect_threads, "cpus": os.cpu_count(),
              "load_average": os.getloadavg()[0], "cut": cut, "stages": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""`letstalk prepare`: raw talking-head videos -> WebDataset shards + manifest.json.

Each input video is decoded at a constant fps (centre square crop, resized), its audio at
16 kHz mono; the video is cut into segments of at most `segment_seconds`; each segment's
frames are VAE-encoded and its audio encoded into per-frame features, and the segment is
written as one sample (schema in `pipeline.shards`). An input that cannot be used is
recorded in `manifest.failed` with a short reason and the run goes on.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from pipeline import media
from pipeline.audio_encoders import AudioEncoder, build_audio_encoder
from pipeline.shards import AtomicShardWriter, Manifest, Segment, sample_key, video_id
from pipeline.vae import VAE, encode_frames, load_vae, vae_info


class InputError(ValueError):
    """One input that cannot be turned into segments; its message is the manifest's reason."""


def list_inputs(inputs: str | Path) -> list[Path]:
    """Video files under a folder (recursive, sorted), or the paths in a list file, in its order.

    A list file holds one path per line; blank lines and lines starting with '#' are skipped,
    relative paths are taken relative to the list file's folder, repeats are dropped.
    """
    root = Path(inputs)
    if root.is_dir():
        found = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in media.VIDEO_EXTENSIONS)
        if not found:
            raise ValueError(f"{root}: no video files ({' '.join(sorted(media.VIDEO_EXTENSIONS))}) in this folder")
        return found
    if not root.is_file():
        raise FileNotFoundError(f"{root}: no such folder or list file")
    try:
        lines = root.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{root}: not a text list of video paths ({err.reason})") from err
    paths = [Path(line.strip()) for line in lines if line.strip() and not line.strip().startswith("#")]
    paths = list(dict.fromkeys(p if p.is_absolute() else root.parent / p for p in paths))
    if not paths:
        raise ValueError(f"{root}: list file names no video paths")
    return paths


def unique_ids(paths: list[Path]) -> list[str]:
    """`video_id` of each path, with `_2`, `_3`, ... appended where two paths share a stem."""
    used: set[str] = set()
    ids = []
    for path in paths:
        base = candidate = video_id(path)
        n = 1
        while candidate in used:
            n += 1
            candidate = f"{base}_{n}"
        used.add(candidate)
        ids.append(candidate)
    return ids


def segment_bounds(num_frames: int, fps: float, segment_seconds: float, min_segment_seconds: float) -> list[tuple[int, int]]:
    """[start, end) frame ranges of at most `segment_seconds`; a trailing rest under `min_segment_seconds` is dropped."""
    length = int(segment_seconds * fps + 1e-9)
    if length < 1:
        raise ValueError(f"segment_seconds {segment_seconds} is shorter than one frame at {fps} fps")
    bounds = [(s, min(s + length, num_frames)) for s in range(0, num_frames, length)]
    return [(s, e) for s, e in bounds if (e - s) >= min_segment_seconds * fps - 1e-9]


def crop_box(width: int, height: int) -> list[int]:
    """[x0, y0, x1, y1] in source pixels of the centre square crop `media.read_video` takes."""
    side = min(width, height)
    x0, y0 = (width - side) // 2, (height - side) // 2
    return [x0, y0, x0 + side, y0 + side]


def _decode(path: Path, fps: float, size: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Frames uint8 [T, size, size, 3], audio float32 [N] and the crop box, or InputError with a reason."""
    if path.suffix.lower() not in media.VIDEO_EXTENSIONS:
        raise InputError(f"not a video file (extension {path.suffix or 'none'})")
    try:
        info = media.probe_video(path)
        if not info.has_audio:
            raise InputError("no audio stream")
        audio = media.read_audio(path, sample_rate=media.SAMPLE_RATE)
        frames = media.read_video(path, fps=fps, size=size)
    except media.MediaError as err:
        reason = str(err)  # "<path>: <problem>"; the manifest keeps the path separately
        raise InputError(reason.removeprefix(f"{path}: ")) from err
    expected = len(frames) * media.SAMPLE_RATE / fps
    if len(audio) < 0.5 * expected:
        raise InputError(
            f"audio much shorter than video ({len(audio) / media.SAMPLE_RATE:.2f} s vs {len(frames) / fps:.2f} s)"
        )
    return frames, audio, crop_box(info.width, info.height)


def _segments(
    path: Path,
    vid: str,
    frames: np.ndarray,
    audio: np.ndarray,
    box: list[int],
    bounds: list[tuple[int, int]],
    vae: VAE,
    vae_id: str,
    encoder: AudioEncoder,
    fps: float,
    batch_size: int,
) -> Iterator[Segment]:
    """Encode one decoded video's segments, one at a time. Audio features are computed from the
    FLAC-decoded waveform stored in the sample, so re-encoding `audio.flac` reproduces `audio.npy`."""
    sr = media.SAMPLE_RATE
    for index, (start, end) in enumerate(bounds):
        lo, hi = round(start * sr / fps), round(end * sr / fps)
        wave = np.zeros(hi - lo, np.float32)
        piece = audio[lo:hi]
        wave[: len(piece)] = piece  # zero-pad a slightly short audio stream
        flac = media.flac_bytes(wave, sr)
        wave = media.decode_flac(flac)[0]
        yield Segment(
            key=sample_key(vid, index),
            latents=encode_frames(vae, frames[start:end], batch_size=batch_size),  # [T, C, h, w]
            audio=encoder.encode(wave, end - start, fps).astype(np.float16),  # [T, K, D]
            waveform_flac=flac,
            meta={
                "fps": fps,
                "sample_rate": sr,
                "frames": end - start,
                "face_box": box,
                "source": str(path),
                "segment": index,
                "start_frame": start,
                "vae": vae_id,
                "audio_encoder": encoder.id,
            },
        )


def prepare(
    inputs: str | Path,
    out: str | Path,
    vae_path: str | Path,
    audio_encoder: str = "mel",
    audio_encoder_path: str | None = None,
    fps: float = media.FPS,
    size: int = 64,
    segment_seconds: float = 4.0,
    min_segment_seconds: float = 1.0,
    samples_per_shard: int = 64,
    batch_size: int = 16,
    device: str = "cpu",
    progress: bool = True,
) -> Manifest:
    """Turn videos into shards under `out` and write `out/manifest.json`; returns the manifest.

    `inputs` is a folder (searched recursively for video files) or a text file listing paths.
    `vae_path` is a diffusers `AutoencoderKL` or `AutoencoderDC` folder (`pipeline.vae.load_vae`);
    the manifest's `vae` entry records which latent space ("type") the shards hold.
    Failed inputs are listed in `manifest.failed` as {path, reason}. With `progress`, shows a
    bar over inputs and prints a one-line summary.
    """
    if min_segment_seconds > segment_seconds:
        raise ValueError(f"min_segment_seconds {min_segment_seconds} exceeds segment_seconds {segment_seconds}")
    paths = list_inputs(inputs)
    vae = load_vae(vae_path, device=device)
    vae_id = Path(vae_path).resolve().name
    info = {**vae_info(vae, vae_id), "path": str(Path(vae_path).resolve())}  # generation finds the decoder here
    if size % info["downsample"]:
        raise ValueError(f"size {size} is not divisible by the VAE downsampling factor {info['downsample']} ({vae_path})")
    encoder = build_audio_encoder(audio_encoder, audio_encoder_path, fps=fps, device=device)

    failed: list[dict[str, str]] = []
    ok = 0
    with AtomicShardWriter(out, max_samples=samples_per_shard) as writer:
        for path, vid in tqdm(list(zip(paths, unique_ids(paths))), desc="prepare", unit="video", disable=not progress):
            try:
                frames, audio, box = _decode(path, fps, size)
                bounds = segment_bounds(len(frames), fps, segment_seconds, min_segment_seconds)
                if not bounds:
                    raise InputError(f"shorter than min_segment_seconds ({len(frames) / fps:.2f} s)")
            except InputError as err:
                failed.append({"path": str(path), "reason": str(err)})
                if progress:
                    tqdm.write(f"skipped {path}: {err}", file=sys.stderr)
                continue
            for segment in _segments(path, vid, frames, audio, box, bounds, vae, vae_id, encoder, fps, batch_size):
                writer.write(segment)
            ok += 1
    manifest = Manifest(
        shards=writer.shards,
        vae=info,
        audio_encoder={
            "id": encoder.id, "name": audio_encoder, "path": str(audio_encoder_path) if audio_encoder_path else None,
            "K": encoder.K, "D": encoder.D, "sample_rate": media.SAMPLE_RATE,
        },
        fps=fps,
        sample_rate=media.SAMPLE_RATE,
        size=size,
        failed=failed,
    )
    manifest.save(out)
    if progress:
        print(summary(manifest, ok))
    return manifest


def summary(manifest: Manifest, ok: int) -> str:
    """One line: videos ok / failed, segments, frames, bytes written."""
    size = sum(int(s["bytes"]) for s in manifest.shards)
    return (
        f"prepare: {ok} ok, {len(manifest.failed)} failed, {manifest.num_samples} segments, "
        f"{manifest.num_frames} frames, {len(manifest.shards)} shards, {size} bytes"
    )

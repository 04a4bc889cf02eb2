"""Video, audio and image reading and writing: the only module that touches decord, ffmpeg and soundfile.

Everything downstream sees plain numpy: video as uint8 ``[T, H, W, 3]`` RGB at a constant frame
rate, audio as float32 ``[N]`` mono in [-1, 1] (`read_audio`; `read_audio_native` keeps a file's own
rate and channels, ``[N, C]``, for a soundtrack). Any file that cannot be read raises `MediaError`
whose message starts with the path, so batch jobs can record the bad input and carry on.
"""

from __future__ import annotations

import io
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import decord
import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
import torchaudio.functional as AF
from decord._ffi.base import DECORDError
from PIL import Image, ImageOps, UnidentifiedImageError

FPS = 25
SAMPLE_RATE = 16000

VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".mpg", ".mpeg", ".ts"})

_SOUNDFILE_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".mp3", ".aif", ".aiff", ".au", ".caf", ".w64"}
_MP4_SUFFIXES = {".mp4", ".m4v", ".mov"}
_BATCH = 64  # frames decoded per decord call: bounds memory to one batch at source resolution
_STREAM_LINE = re.compile(r"Stream #\d+:\d+\S*: (Video|Audio): (\w+)(.*)")
_DECORD_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")
_DURATION_LINE = re.compile(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?)")
_ROTATION_LINE = re.compile(r"[Dd]isplay ?[Mm]atrix: rotation of (-?\d+(?:\.\d+)?) degrees")
_SIZE = re.compile(r", (\d+)x(\d+)[ ,]")


class MediaError(ValueError):
    """A media file that cannot be read or written; the message names the file and the problem."""


@dataclass
class VideoInfo:
    num_frames: int
    fps: float
    width: int
    height: int
    duration_s: float
    has_audio: bool
    rotation: int = 0  # degrees (0, 90, 180, 270) of the container's display matrix; width/height are as displayed


def ffmpeg_exe() -> str:
    """The ffmpeg binary bundled with imageio-ffmpeg, else one on PATH (a GPU image without the 68 MB wheel)."""
    try:
        import imageio_ffmpeg
    except ImportError:
        found = shutil.which("ffmpeg")
        if found is None:
            raise RuntimeError("no ffmpeg: pip install imageio-ffmpeg, or put an ffmpeg binary on PATH") from None
        return found
    return imageio_ffmpeg.get_ffmpeg_exe()


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise MediaError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise MediaError(f"{path}: empty file (0 bytes)")
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except PermissionError as err:
        raise MediaError(f"{path}: permission denied (file not readable)") from err


def _open_video(path: Path) -> decord.VideoReader:
    _check_file(path)
    try:
        reader = decord.VideoReader(str(path), num_threads=1)
    except (RuntimeError, DECORDError) as err:
        raise MediaError(f"{path}: unreadable or corrupt video ({_first_line(err)})") from err
    if len(reader) == 0:
        raise MediaError(f"{path}: no video frames")
    return reader


def _first_line(err: BaseException) -> str:
    """The decoder's message without decord's "[hh:mm:ss] source.cc:123: " prefix."""
    text = str(err).strip().splitlines()
    return _DECORD_PREFIX.sub("", text[0])[:200] if text else type(err).__name__


def _frame_starts(reader: decord.VideoReader, path: Path) -> tuple[np.ndarray, float]:
    """Presentation start time of every frame (seconds from the first) and the stream duration.

    Uses the container timestamps, so variable frame rate video is timed correctly; falls back to
    index / average fps when the timestamps are missing or not increasing.
    """
    n = len(reader)
    stamps = np.asarray(reader.get_frame_timestamp(np.arange(n)), dtype=np.float64)  # [n, 2] start, end
    starts = stamps[:, 0] - stamps[0, 0]
    duration = float(stamps[-1, 1] - stamps[0, 0])
    if np.all(np.diff(starts) > 0) and duration > starts[-1]:
        return starts, duration
    fps = float(reader.get_avg_fps())
    if not fps > 0:
        raise MediaError(f"{path}: no usable frame timestamps or frame rate")
    return np.arange(n) / fps, n / fps


def _nearest_frames(starts: np.ndarray, duration: float, fps: float) -> np.ndarray:
    """Source frame index for each output time k / fps, k < floor(duration * fps): the nearest start."""
    times = np.arange(int(math.floor(duration * fps + 1e-6))) / fps
    if len(starts) == 1:
        return np.zeros(len(times), dtype=np.int64)
    right = np.clip(np.searchsorted(starts, times), 1, len(starts) - 1)
    left = right - 1
    return np.where(times - starts[left] <= starts[right] - times, left, right)


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Frame count, average fps, displayed size, duration and rotation of a video, and whether it has audio.

    A file whose container holds audio but no video stream raises "no video stream".
    """
    path = Path(path)
    _check_file(path)
    streams = _ffmpeg_header(path)
    if streams["video_streams"] == 0 and streams["audio_streams"] > 0:
        raise MediaError(f"{path}: no video stream (audio only)")
    reader = _open_video(path)
    _, duration = _frame_starts(reader, path)
    rotation = streams["rotation"]
    try:
        width, height = streams["video_size"] or reader[0].shape[1::-1]
    except (RuntimeError, DECORDError) as err:  # e.g. a text file decord "opened" as raw video
        raise MediaError(f"{path}: unreadable or corrupt video ({_first_line(err)})") from err
    if rotation in (90, 270):
        width, height = height, width
    return VideoInfo(
        num_frames=len(reader),
        fps=float(reader.get_avg_fps()),
        width=int(width),
        height=int(height),
        duration_s=duration,
        has_audio=streams["audio_streams"] > 0,
        rotation=rotation,
    )


def square_resize(frames: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop uint8 [T, H, W, 3] to a square and resize it to [T, size, size, 3]."""
    _, height, width, _ = frames.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    frames = frames[:, top : top + side, left : left + side]
    if side == size:
        return np.ascontiguousarray(frames)
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # [T, 3, side, side]
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [T, size, size, 3]


def read_video(path: str | os.PathLike, fps: float = FPS, size: int | None = None) -> np.ndarray:
    """Decode a video to uint8 [T, H, W, 3] RGB at a constant `fps`, T = floor(duration * fps).

    Output frame k is the source frame whose timestamp is nearest to k / fps, using the
    container's timestamps, so variable frame rate sources are timed correctly. Frames are
    decoded in increasing order in batches (sequential, no random access). A video with a
    display-matrix rotation is decoded by the ffmpeg CLI, which turns it upright (decord
    ignores the rotation and fails on it). With `size`, each frame is centre-cropped to a
    square and resized to size x size.
    """
    return np.concatenate(list(iter_video(path, fps, size)))


def iter_video(path: str | os.PathLike, fps: float = FPS, size: int | None = None,
               chunk: int = _BATCH) -> Iterator[np.ndarray]:
    """`read_video` in consecutive chunks of at most `chunk` frames (uint8 [n, H, W, 3] each), so a
    long video at source resolution never has to fit in memory at once."""
    path = Path(path)
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    reader = _open_video(path)
    starts, duration = _frame_starts(reader, path)
    indices = _nearest_frames(starts, duration, fps)
    if len(indices) == 0:
        raise MediaError(f"{path}: video shorter than one frame at {fps} fps ({duration:.3f} s)")
    header = _ffmpeg_header(path)
    if header["rotation"]:
        yield from _ffmpeg_frames(path, indices, header["video_size"], header["rotation"], size, chunk)
        return
    for begin in range(0, len(indices), chunk):
        try:
            batch = reader.get_batch(indices[begin : begin + chunk]).asnumpy()  # [b, H, W, 3]
        except (RuntimeError, DECORDError) as err:
            raise MediaError(f"{path}: unreadable or corrupt video ({_first_line(err)})") from err
        yield _resized(batch, size)


def _ffmpeg_frames(
    path: Path, indices: np.ndarray, coded_size: tuple[int, int] | None, rotation: int, size: int | None,
    chunk: int,
) -> Iterator[np.ndarray]:
    """Source frames `indices` (non-decreasing) as upright uint8 [n, H, W, 3] chunks, streamed from the ffmpeg CLI."""
    if coded_size is None:
        raise MediaError(f"{path}: rotated video without a readable frame size")
    width, height = coded_size if rotation in (0, 180) else coded_size[::-1]
    frame_bytes = width * height * 3
    command = [ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(path), "-map", "0:v:0", "-fps_mode", "passthrough"]
    command += ["-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]
    wanted = np.bincount(indices, minlength=int(indices[-1]) + 1)  # times each source frame is used
    got, batch = 0, []
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a chatty decoder cannot block on it
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log)
        try:
            for source in range(len(wanted)):
                data = process.stdout.read(frame_bytes)
                if len(data) < frame_bytes:
                    break
                if wanted[source]:
                    frame = np.frombuffer(data, np.uint8).reshape(height, width, 3)
                    batch.extend([frame] * int(wanted[source]))
                while len(batch) >= chunk:
                    got += chunk
                    yield _resized(np.stack(batch[:chunk]), size)
                    batch = batch[chunk:]
        finally:
            process.stdout.close()
            process.kill()
            process.wait()
        log.seek(0)
        stderr = log.read().decode("utf-8", "replace").strip()
    got += len(batch)
    if got < len(indices):
        detail = "; ".join([f"decoded {got} of {len(indices)} frames", *stderr.splitlines()[:2]])[:300]
        raise MediaError(f"{path}: unreadable or corrupt video ({detail})")
    if batch:
        yield _resized(np.stack(batch), size)


def _resized(frames: np.ndarray, size: int | None) -> np.ndarray:
    return frames if size is None else square_resize(frames, size)


def read_image(path: str | os.PathLike, size: int | None = None) -> np.ndarray:
    """An image file (png, jpg, ...) as uint8 [H, W, 3] RGB, upright per its EXIF orientation.

    With `size`, centre-cropped to a square and resized to size x size exactly as `read_video` does.
    """
    path = Path(path)
    _check_file(path)
    try:
        with Image.open(path) as image:
            pixels = np.array(ImageOps.exif_transpose(image).convert("RGB"))  # [H, W, 3], writable for torch
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise MediaError(f"{path}: unreadable or corrupt image ({_first_line(err)})") from err
    return pixels if size is None else square_resize(pixels[None], size)[0]


def write_image(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write uint8 [H, W, 3] as PNG through a temporary file renamed into place (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _tile(arrays: list[np.ndarray], axis: int, gap: int) -> np.ndarray:
    """uint8 arrays of one shape joined along `axis` with `gap`-pixel white stripes between them."""
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"cannot tile arrays of shapes {sorted({a.shape for a in arrays})}")
    stripe_shape = list(arrays[0].shape)
    stripe_shape[axis] = gap
    stripe = np.full(stripe_shape, 255, dtype=np.uint8)
    return np.concatenate([part for a in arrays for part in (stripe, a)][1:], axis=axis)


def side_by_side(*videos: np.ndarray, gap: int = 2) -> np.ndarray:
    """uint8 frames [T, H, W, 3] of one shape placed left to right, white stripes between: [T, H, W', 3]."""
    if videos[0].ndim != 4:
        raise ValueError(f"side_by_side needs frames [T, H, W, 3], got shape {videos[0].shape}")
    return _tile(list(videos), axis=2, gap=gap)


def contact_sheet(rows: list[np.ndarray], every: int = 10, gap: int = 2) -> np.ndarray:
    """uint8 [H', W', 3]: frames 0, every, 2·every, ... of each video [T, H, W, 3] in a row, one row per video.

    E.g. rows = [portrait repeated, real, generated]: reading down a column compares one moment.
    """
    if every < 1 or not rows:
        raise ValueError(f"contact_sheet needs at least one video and every >= 1, got {len(rows)} and {every}")
    return _tile([_tile(list(row[::every]), axis=1, gap=gap) for row in rows], axis=0, gap=gap)


def _downmix_resample(waveform: np.ndarray, source_rate: int, sample_rate: int) -> np.ndarray:
    """float [N, C] -> mono float32 [M] at `sample_rate`, clipped to [-1, 1]."""
    mono = waveform.mean(axis=1, dtype=np.float32) if waveform.ndim == 2 else waveform.astype(np.float32)
    if source_rate != sample_rate:
        mono = AF.resample(torch.from_numpy(np.ascontiguousarray(mono)), source_rate, sample_rate).numpy()
    return np.clip(mono, -1.0, 1.0).astype(np.float32, copy=False)


def _ffmpeg_decode_audio(path: Path, output: list[str]) -> bytes:
    """Decode the first audio stream of `path` with the ffmpeg CLI to `output` (options and target); its stdout.

    ffmpeg applies the container's edit list (codec priming and trailing padding removed), so the
    result has the stream's true length. Any decoder complaint counts as corruption: a truncated
    stream otherwise decodes "successfully" to a shorter waveform.
    """
    command = [ffmpeg_exe(), "-nostdin", "-y", "-v", "error", "-i", str(path), "-map", "0:a:0", *output]
    result = subprocess.run(command, capture_output=True)
    message = result.stderr.decode("utf-8", "replace").strip()
    if "matches no streams" in message:
        raise MediaError(f"{path}: no audio stream")
    if result.returncode != 0 or message:
        detail = " | ".join(message.splitlines()[:2])[:300]
        raise MediaError(f"{path}: unreadable or corrupt audio stream ({detail or f'ffmpeg exit {result.returncode}'})")
    return result.stdout


def _ffmpeg_audio(path: Path, sample_rate: int) -> np.ndarray:
    """The first audio stream decoded by the ffmpeg CLI to mono float32 [N] at `sample_rate`."""
    data = _ffmpeg_decode_audio(path, ["-ac", "1", "-ar", str(int(sample_rate)), "-f", "f32le", "pipe:1"])
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


def read_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 [N] in [-1, 1] at `sample_rate`, from an audio file or a video's audio stream.

    Audio files (wav, flac, ogg, mp3, ...) are read with soundfile, downmixed and resampled with
    torchaudio. Anything else is decoded by the ffmpeg CLI rather than decord's AudioReader, which
    keeps the codec's trailing padding, reports only whole seconds of duration, and silently
    returns a shorter waveform from a truncated stream.
    """
    path = Path(path)
    _check_file(path)
    if path.suffix.lower() in _SOUNDFILE_SUFFIXES:
        return _downmix_resample(*_soundfile(path), sample_rate)
    return np.clip(_ffmpeg_audio(path, sample_rate), -1.0, 1.0)


def _soundfile(path: Path) -> tuple[np.ndarray, int]:
    """(float32 [N, C], sample rate) of an audio file soundfile reads, or MediaError naming it."""
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # [N, C]
    except (sf.LibsndfileError, RuntimeError) as err:
        raise MediaError(f"{path}: unreadable or corrupt audio file ({_first_line(err)})") from err
    return data, int(rate)


def read_audio_native(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """(float32 [N, C] in [-1, 1], sample rate): an audio file or a video's audio stream at its own rate and with
    its own channels, as a soundtrack that keeps what the user gave (`read_audio` is the models' input).

    Audio files soundfile reads are read with it; anything else is decoded by the ffmpeg CLI (as `read_audio`).
    """
    path = Path(path)
    _check_file(path)
    if path.suffix.lower() in _SOUNDFILE_SUFFIXES:
        data, rate = _soundfile(path)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            wav = Path(tmp) / "audio.wav"
            _ffmpeg_decode_audio(path, ["-c:a", "pcm_f32le", "-f", "wav", str(wav)])
            data, rate = sf.read(str(wav), dtype="float32", always_2d=True)  # [N, C]
    return np.clip(data, -1.0, 1.0), int(rate)


def _fit_audio(audio: np.ndarray, num_samples: int) -> np.ndarray:
    """Trim or zero-pad float32 [N] or [N, C] to exactly `num_samples` along the first axis."""
    if len(audio) >= num_samples:
        return audio[:num_samples]
    return np.pad(audio, [(0, num_samples - len(audio))] + [(0, 0)] * (audio.ndim - 1))


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray,
    fps: float,
    audio: np.ndarray | None = None,
    sample_rate: int = SAMPLE_RATE,
    crf: int = 18,
    metadata: dict[str, str] | None = None,
) -> None:
    """Encode uint8 [T, H, W, 3] RGB frames as H.264 (yuv420p) with optional AAC audio.

    yuv420p needs even dimensions: an odd height or width is padded by repeating the last row or
    column, so the file is at most one pixel larger than `frames`. `audio` is float [N] (mono) or
    [N, C] at `sample_rate`, kept at that rate; mono and stereo stay as they are, more channels
    are downmixed to stereo (ffmpeg's matrix for the layout). It is trimmed or zero-padded to
    exactly T / fps seconds before muxing. Writing goes to a temporary file in
    the same folder that is renamed at the end, so a failure leaves no partial file. mp4 output
    is "faststart" (index first, playable while downloading); `metadata` becomes container tags
    (in mp4 as `mdta` keys, so custom keys survive).
    """
    path = Path(path)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise MediaError(f"{path}: frames must be uint8 [T, H, W, 3] with T > 0, got {frames.dtype} {frames.shape}")
    if fps <= 0:
        raise MediaError(f"{path}: fps must be positive, got {fps}")
    num_frames, height, width, _ = frames.shape
    if height % 2 or width % 2:
        frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
        num_frames, height, width, _ = frames.shape
    rate = Fraction(fps).limit_denominator(1001)
    if audio is not None:
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim not in (1, 2) or audio.shape[-1] == 0 or sample_rate <= 0:
            raise MediaError(f"{path}: audio must be float [N] or [N, channels] at a positive rate, got shape "
                             f"{audio.shape} at {sample_rate} Hz")
        audio = _fit_audio(np.clip(audio, -1.0, 1.0), int(round(num_frames / float(rate) * sample_rate)))
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix or ".mp4", dir=path.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    wav = tmp.with_suffix(".wav")
    command = [
        ffmpeg_exe(), "-y", "-loglevel", "error",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", f"{rate.numerator}/{rate.denominator}",
        "-i", "pipe:0",
    ]  # fmt: skip
    if audio is not None:
        channels = 1 if audio.ndim == 1 else min(audio.shape[1], 2)
        bitrate = "192k" if channels == 2 else "128k"  # stereo at 128k: ffmpeg's AAC blurs two tones (r 0.99)
        command += ["-i", str(wav), "-map", "0:v:0", "-map", "1:a:0", "-c:a", "aac", "-ac", str(channels),
                    "-b:a", bitrate]
    command += ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", str(int(crf)), "-g", str(max(1, round(2 * fps)))]
    for key, value in (metadata or {}).items():
        command += ["-metadata", f"{key}={value}"]
    if tmp.suffix.lower() in _MP4_SUFFIXES:
        command += ["-movflags", "+faststart+use_metadata_tags" if metadata else "+faststart"]
    command.append(str(tmp))
    try:
        if audio is not None:
            sf.write(str(wav), audio, sample_rate, subtype="FLOAT")
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _, stderr = process.communicate(np.ascontiguousarray(frames).tobytes())
        except BrokenPipeError:
            _, stderr = process.communicate()
        if process.returncode != 0:
            message = stderr.decode("utf-8", "replace").strip().splitlines()
            raise MediaError(f"{path}: ffmpeg failed (exit {process.returncode}): {' | '.join(message[-3:])}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        wav.unlink(missing_ok=True)


def read_tags(path: str | os.PathLike) -> dict[str, str]:
    """Container metadata tags of a media file (what `write_video(metadata=...)` stored), via ffmetadata."""
    path = Path(path)
    _check_file(path)
    result = subprocess.run([ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(path), "-f", "ffmetadata", "pipe:1"],
                            capture_output=True)
    if result.returncode != 0:
        detail = " | ".join(result.stderr.decode("utf-8", "replace").strip().splitlines()[:2])[:300]
        raise MediaError(f"{path}: cannot read container metadata ({detail or f'ffmpeg exit {result.returncode}'})")
    tags: dict[str, str] = {}
    for line in result.stdout.decode("utf-8", "replace").splitlines():
        if line.startswith("["):  # stream or chapter sections follow the global tags
            break
        if line.startswith(";") or "=" not in line:
            continue
        key, _, value = re.split(r"(?<!\\)(=)", line, maxsplit=1)
        tags[_unescape(key)] = _unescape(value)
    return tags


def _unescape(text: str) -> str:
    """Undo ffmetadata escaping of '=', ';', '#' and '\\'."""
    return re.sub(r"\\(.)", r"\1", text)


def flac_bytes(waveform: np.ndarray, sample_rate: int) -> bytes:
    """Encode mono float [N] in [-1, 1] as 16-bit FLAC bytes (the shard's audio.flac member)."""
    waveform = np.asarray(waveform, dtype=np.float32)
    if waveform.ndim != 1:
        raise ValueError(f"waveform must be mono [N], got shape {waveform.shape}")
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(waveform, -1.0, 1.0), int(sample_rate), format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def decode_flac(data: bytes, source: str = "FLAC data") -> tuple[np.ndarray, int]:
    """Decode FLAC bytes to (mono float32 [N], sample rate); `source` names the data in errors."""
    try:
        waveform, sample_rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)  # [N, C]
    except (sf.LibsndfileError, RuntimeError) as err:
        raise MediaError(f"{source}: not decodable as FLAC ({_first_line(err)})") from err
    return waveform.mean(axis=1, dtype=np.float32), int(sample_rate)


def _ffmpeg_header(path: Path) -> dict[str, Any]:
    """Stream counts, codec names, audio sample rate and container duration from `ffmpeg -i`."""
    result = subprocess.run([ffmpeg_exe(), "-nostdin", "-hide_banner", "-i", str(path)], capture_output=True)
    info: dict[str, Any] = {
        "video_streams": 0, "audio_streams": 0, "video_codec": None, "audio_codec": None,
        "audio_sample_rate": None, "duration_s": None, "rotation": 0, "video_size": None,
    }  # fmt: skip
    for line in result.stderr.decode("utf-8", "replace").splitlines():
        stream = _STREAM_LINE.search(line)
        if stream:
            kind = stream.group(1).lower()
            info[f"{kind}_streams"] += 1
            if info[f"{kind}_codec"] is None:
                info[f"{kind}_codec"] = stream.group(2)
                rate = re.search(r"(\d+) Hz", stream.group(3))
                if kind == "audio" and rate:
                    info["audio_sample_rate"] = int(rate.group(1))
                dims = _SIZE.search(stream.group(3))
                if kind == "video" and dims:
                    info["video_size"] = (int(dims.group(1)), int(dims.group(2)))
        rotation = _ROTATION_LINE.search(line)
        if rotation and info["video_streams"] == 1 and not info["rotation"]:
            info["rotation"] = round(float(rotation.group(1)) / 90) % 4 * 90
        duration = _DURATION_LINE.search(line)
        if duration:
            hours, minutes, seconds = duration.groups()
            info["duration_s"] = int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    return info


def media_streams(path: str | os.PathLike) -> dict[str, Any]:
    """What a fresh decoder finds in a media file, for checking generated mp4s.

    Keys: video_streams, audio_streams, video_codec, audio_codec (ffmpeg names, e.g. "h264",
    "aac"), duration_s (container), num_frames, fps, width, height (decord; None without video),
    audio_sample_rate, audio_channels and audio_duration_s (decoded samples / rate; None without
    audio).
    """
    path = Path(path)
    _check_file(path)
    info = _ffmpeg_header(path)
    if info["video_streams"] == 0 and info["audio_streams"] == 0:
        raise MediaError(f"{path}: no video or audio stream (not a media file, or corrupt)")
    info.update(num_frames=None, fps=None, width=None, height=None, audio_channels=None, audio_duration_s=None)
    if info["video_streams"]:
        video = probe_video(path)
        info.update(num_frames=video.num_frames, fps=video.fps, width=video.width, height=video.height)
    if info["audio_streams"]:
        sound, rate = read_audio_native(path)  # [N, C]
        info.update(audio_channels=sound.shape[1], audio_duration_s=len(sound) / rate)
    return info

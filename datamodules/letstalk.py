"""Shards -> training batches: clip windows, a reference frame and per-frame audio windows.

Every sample of the stream is one clip cut from one segment (one WebDataset sample, see
`pipeline/shards.py`). A batch (after `torch.utils.data.default_collate`) is a dict:

    latents  float32 [B, F, C, h, w]  F = clip_frames consecutive frames, scaled by `pipeline.vae.scale_latents`
    ref      float32 [B, 1, C, h, w]  one reference frame of the same segment, scaled the same way
    audio    float32 [B, F, W, D]     W = (2 * audio_radius + 1) * K audio vectors around each clip frame
    key      list[str]                the segment's "<video id>/<segment index>"
    start    int64   [B]              index of the clip's first frame in the segment
    motion   float32 [B, M, C, h, w]  only if the model has motion frames: the M frames right before the clip
    memory   float32 [B, N, C, h, w]  only if the model has a memory bank: frames `DiTConfig.memory_indices(start)`

Long videos: the model's config is the one source of M, N and the memory stride; the
LetsTalkModule hands it over with `set_context` when it is set up (before any batch is made).
Clips then start at frame M or later, so segments need clip_frames + M frames; memory frames
that would fall before the segment's first frame are clamped to it, exactly as generation does
at the start of a video, so no segment is skipped for lack of memory history.

Training streams shards endlessly in a (seed, epoch)-seeded order, partitioned over ranks and
workers, and stops each rank after exactly `train_batches_per_epoch` batches, so ranks with
uneven data never hang. A run resumed in the middle of an epoch continues exactly where it
stopped: the loader reads and drops the batches the checkpoint had already trained on (it never
trains on them twice), so a resumed run sees the same batches as one that never stopped.
Validation is a fixed set of clips (first frames of the first
validation segments), identical on every run and every rank. Videos are split between train and
validation by a stable hash of their id, so no video is in both.
"""

from __future__ import annotations

import random
import tarfile
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

# TrainClips fast-forwards a mid-epoch resume itself (see `TrainClips`), so Lightning's warning
# that this loader "is not resumable" does not apply.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")

from pipeline.audio_encoders import audio_windows
from pipeline.models.dit import DiTConfig
from pipeline.shards import LATENTS, MANIFEST, MEMBERS, Manifest, Segment, ShardFormatError
from pipeline.vae import scale_latents

REF_MODES = ("outside", "any")


class DataWarning(UserWarning):
    """Data that was skipped (unreadable shard or sample) or a fallback that was taken."""


def is_val_video(key: str, val_percent: float) -> bool:
    """True if the sample's video (the key before "/") hashes into the first `val_percent` % (crc32, stable)."""
    bucket = zlib.crc32(key.split("/", 1)[0].encode("utf-8")) % 10000
    return bucket < round(val_percent * 100)


@dataclass(frozen=True)
class IndexedSample:
    """One complete sample found by `index_shards`: where it is, its frame count and latent channels."""

    shard: str
    key: str
    frames: int
    channels: int


def _npy_shape(fileobj: Any) -> tuple[int, ...]:
    """The shape in a `.npy` header, read without touching the array data."""
    version = np.lib.format.read_magic(fileobj)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return tuple(read(fileobj)[0])


def index_shards(paths: list[str]) -> list[IndexedSample]:
    """List every complete sample of every shard, in shard order, from tar headers and `.npy` headers only.

    Why: the manifest has per-shard counts, but the train/validation split is per video and clips
    need segments of at least `clip_frames` frames, so epoch lengths need per-sample keys and
    frame counts. Walking tar headers seeks past the payloads and reads ~100 bytes of each
    latents header: a few small reads per sample, no decoding. A missing or truncated shard is
    warned about and only its complete samples (all members present, data inside the file) count.
    """
    found: list[IndexedSample] = []
    for path in paths:
        members: dict[str, set[str]] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        order: list[str] = []
        try:
            size = Path(path).stat().st_size
            with tarfile.open(path, "r:") as tar:
                for member in tar:
                    if member.offset_data + member.size > size:
                        raise tarfile.ReadError(f"truncated inside {member.name}")
                    if not member.isreg():
                        continue
                    key, _, ext = member.name.partition(".")
                    if key not in members:
                        members[key] = set()
                        order.append(key)
                    members[key].add(ext)
                    if ext == LATENTS:
                        try:
                            shapes[key] = _npy_shape(tar.extractfile(member))
                        except ValueError as err:
                            message = f"{path}: sample {key}: unreadable {LATENTS} header ({err}); skipped"
                            warnings.warn(message, DataWarning)
                tar.fileobj.seek(tar.offset)
                if tar.fileobj.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
                    raise tarfile.ReadError("no end-of-archive block after the last member (truncated)")
        except (OSError, tarfile.TarError) as err:
            message = f"{path}: unreadable shard ({type(err).__name__}: {err}); using its complete samples only"
            warnings.warn(message, DataWarning)
        for key in order:
            shape = shapes.get(key)
            if members[key].issuperset(MEMBERS) and shape is not None and len(shape) == 4:
                found.append(IndexedSample(path, key, int(shape[0]), int(shape[1])))
    return found


def choose_window(rng: np.random.Generator, frames: int, clip_frames: int, ref_mode: str,
                  lead: int = 0) -> tuple[int, int]:
    """A random clip start (>= `lead`, room for motion frames) and reference frame index for a segment of `frames` frames.

    ref_mode "outside": the reference comes from outside [start, start + clip_frames) when the
    segment has such frames, else from inside it; "any": any frame of the segment.
    """
    start = int(rng.integers(lead, frames - clip_frames + 1))
    outside = [i for i in range(frames) if not start <= i < start + clip_frames]
    if ref_mode == "outside" and outside:
        return start, int(rng.choice(outside))
    return start, int(rng.integers(0, frames))


def make_clip(
    segment: Segment, start: int, ref: int, clip_frames: int, radius: int, context: DiTConfig | None = None,
) -> dict[str, Any]:
    """One training/validation sample: latents, reference frame and audio windows of one clip, plus the
    motion and memory frames `context` (the model config) asks for. Latents stay unscaled here:
    `scale_batch` scales a whole batch at once (one op per tensor instead of one per clip).

    The audio windows are `audio_windows` of the whole segment sliced to the clip; computing them
    on frames [start - radius, start + clip_frames + radius) clipped to the segment gives the
    same values, since edges are replicated only at the segment's real ends.
    """
    end = start + clip_frames
    latents = torch.from_numpy(segment.latents[start:end].astype(np.float32))  # [F, C, h, w]
    reference = torch.from_numpy(segment.latents[ref : ref + 1].astype(np.float32))  # [1, C, h, w]
    lo, hi = max(0, start - radius), min(len(segment.audio), end + radius)
    audio = torch.from_numpy(segment.audio[lo:hi].astype(np.float32))  # [hi - lo, K, D]
    windows = audio_windows(audio, radius)[start - lo : end - lo]  # [F, (2r+1)*K, D]
    clip = {
        "latents": latents,
        "ref": reference,
        "audio": windows,
        "key": segment.key,
        "start": start,
    }
    if context is not None and context.motion_frames:
        motion = segment.latents[start - context.motion_frames : start].astype(np.float32)  # [M, C, h, w]
        clip["motion"] = torch.from_numpy(motion)
    if context is not None and context.memory_frames:
        memory = segment.latents[context.memory_indices(start)].astype(np.float32)  # [N, C, h, w]
        clip["memory"] = torch.from_numpy(memory)
    return clip


LATENT_KEYS = ("latents", "ref", "motion", "memory")


def scale_batch(clips: list[dict[str, Any]], vae: dict[str, Any]) -> dict[str, Any]:
    """Collate clips from `make_clip` and scale their latents (`pipeline.vae.scale_latents`) in place."""
    batch = default_collate(clips)
    for key in LATENT_KEYS:
        if key in batch:
            batch[key] = scale_latents(batch[key], vae)
    return batch


class _SkipCounter:
    """A webdataset error handler that warns about each skipped item and counts them (per process)."""

    def __init__(self) -> None:
        self.skipped = 0

    def __call__(self, exn: Exception) -> bool:
        self.skipped += 1
        warnings.warn(f"skipped unreadable data ({self.skipped} so far in this process): {exn}", DataWarning)
        return True


def _decode(sample: dict[str, Any]) -> Segment:
    """Raw member bytes -> Segment; any decoding failure becomes a ShardFormatError naming shard and key."""
    try:
        return Segment.from_wds(sample)
    except ShardFormatError:
        raise
    except (ValueError, EOFError, OSError, UnicodeDecodeError) as err:
        raise ShardFormatError(f"{sample.get('__url__')}: sample {sample.get('__key__')}: {err}") from err


def _tar_samples(urls: Iterator[dict[str, Any]], handler: _SkipCounter) -> Iterator[dict[str, Any]]:
    """Shard urls -> raw samples {__key__, __url__, extension: bytes}, in tar order.

    Shards are local files, read with `tarfile` (one read per member; ~1.3x the clips/s of
    webdataset's streaming expander, which assembles members from 10 KB reads). An unreadable or
    truncated shard goes to `handler`: its complete samples before the damage are kept, the
    sample being read when it failed is dropped, and the stream goes on with the next shard.
    """
    for source in urls:
        url, sample = source["url"], None
        try:
            with tarfile.open(url, "r:") as tar:
                for member in tar:
                    if not member.isreg():
                        continue
                    key, _, ext = member.name.partition(".")
                    if sample is not None and sample["__key__"] != key:
                        yield sample
                        sample = None
                    sample = sample or {"__key__": key, "__url__": url}
                    sample[ext] = tar.extractfile(member).read()
            if sample is not None:
                yield sample
        except (OSError, tarfile.TarError) as err:
            handler(ShardFormatError(f"{url}: unreadable shard ({type(err).__name__}: {err})"))


def _segments(
    source: Any, handler: _SkipCounter, keep: Callable[[dict[str, Any]], bool] | None = None
) -> wds.DataPipeline:
    """Shard url source -> decoded Segments whose raw sample passes `keep` (checked before decoding).

    No webdataset auto-decoding: members are decoded by `Segment.from_wds`, nothing is unpickled.
    """
    return wds.DataPipeline(
        source,
        partial(_tar_samples, handler=handler),
        wds.select(keep) if keep is not None else None,
        wds.map(_decode, handler=handler),
    )


class TrainClips(IterableDataset):
    """Endless stream of random training clips, batched; each rank yields exactly `batches` batches per epoch.

    Shard order: one permutation of all training shards per (seed, epoch, cycle), the same on every
    rank, dealt round-robin to the world_size * num_workers loader slots, repeated forever. Clip
    windows and the shuffle buffer use RNGs seeded from (seed, epoch, rank, worker). The epoch is
    `epoch` plus the number of times this object was iterated (workers are persistent, so this
    advances each epoch in worker processes too).

    Batch k of an epoch comes from worker k % num_workers (the DataLoader's round robin). `skip`
    (a mid-epoch resume) drops the first `skip` batches of the first epoch: each worker reads and
    drops its share of them, and worker w plays the part of worker (w + skip) % num_workers, so the
    round robin continues with batch `skip` and the order equals an uninterrupted run's.
    """

    def __init__(
        self,
        shards: list[str],
        vae: dict[str, Any],
        clip_frames: int,
        audio_radius: int,
        batch_size: int,
        batches: int,
        val_percent: float,
        ref_mode: str,
        shuffle_buffer: int,
        seed: int,
        rank: int,
        world_size: int,
        epoch: int = 0,
        context: DiTConfig | None = None,
        skip: int = 0,
    ) -> None:
        super().__init__()
        self.context, self.skip = context, skip
        self.shards, self.vae = shards, vae
        self.clip_frames, self.audio_radius, self.ref_mode = clip_frames, audio_radius, ref_mode
        self.batch_size, self.batches = batch_size, batches
        self.val_percent, self.shuffle_buffer, self.seed = val_percent, shuffle_buffer, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = epoch
        self.iterations = 0
        self.handler = _SkipCounter()

    def __len__(self) -> int:
        return self.batches

    def _shard_urls(self, epoch: int, slot: int, slots: int, progress: Callable[[], int]) -> Iterator[dict[str, str]]:
        """This slot's shards, cycle after cycle; raises if a whole cycle produced no clip (all shards broken)."""
        cycle = 0
        while True:
            before = progress()
            order: list[str] = []
            while len(order) < slots or not order:  # fewer shards than slots: deal several permutations
                perm = np.random.default_rng([self.seed, epoch, cycle, len(order)]).permutation(len(self.shards))
                order.extend(self.shards[i] for i in perm)
            for url in order[slot::slots]:
                yield {"url": url}
            if progress() == before:
                raise RuntimeError(
                    f"no readable training clip in a full pass over {len(order[slot::slots])} shards "
                    f"(e.g. {order[slot]}); check the shards or rerun `letstalk prepare`"
                )
            cycle += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch + self.iterations
        skip = self.skip if self.iterations == 0 else 0
        self.iterations += 1
        worker = (worker + skip) % workers  # the worker whose batch comes next in the round robin goes first
        share = self.batches // workers + (worker < self.batches % workers)
        done = skip // workers + (worker < skip % workers)  # batches of this worker already trained on
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker])
        produced = [0]

        lead = self.context.motion_frames if self.context is not None else 0

        def to_clip(segment: Segment) -> dict[str, Any]:
            start, ref = choose_window(rng, len(segment.latents), self.clip_frames, self.ref_mode, lead)
            clip = make_clip(segment, start, ref, self.clip_frames, self.audio_radius, self.context)
            produced[0] += 1
            return clip

        urls = self._shard_urls(epoch, self.rank * workers + worker, self.world_size * workers, lambda: produced[0])
        segments = _segments(lambda: urls, self.handler, lambda s: not is_val_video(s["__key__"], self.val_percent))
        stages = [
            wds.select(lambda segment: len(segment.latents) >= self.clip_frames + lead),
            wds.map(to_clip, handler=self.handler),
        ]
        if self.shuffle_buffer > 1:
            shuffle_rng = random.Random(int(rng.integers(2**63)))
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=shuffle_rng))
        stages.append(wds.batched(self.batch_size, collation_fn=partial(scale_batch, vae=self.vae), partial=False))
        pipeline = wds.DataPipeline(segments, *stages)
        yield from islice(iter(pipeline), done, share)


class LetsTalkDataModule(L.LightningDataModule):
    """Training and validation batches of clips from a `letstalk prepare` dataset (see module docstring)."""

    def __init__(
        self,
        root: str,
        clip_frames: int = 8,
        audio_radius: int = 2,
        batch_size: int = 8,
        num_workers: int = 2,
        val_percent: float = 10.0,
        shuffle_buffer: int = 256,
        seed: int = 0,
        val_batches: int = 2,
        ref_mode: str = "outside",
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        """
        Args:
            root: dataset folder holding manifest.json and the shards (made by `letstalk prepare`).
            clip_frames: frames per training clip (F); segments shorter than this are skipped.
            audio_radius: neighbouring frames on each side whose audio vectors join a frame's window.
            batch_size: clips per batch, per rank.
            num_workers: DataLoader worker processes for training (0 = load in the main process).
            val_percent: percent of videos (by a stable hash of the video id) held out for validation.
            shuffle_buffer: clips held in the shuffle buffer of each worker (0 or 1: no shuffling).
            seed: seed of the shard order, clip windows and shuffling (with epoch, rank and worker).
            val_batches: number of fixed validation batches (first frames of the first validation segments).
            ref_mode: "outside" (reference frame outside the clip when possible) or "any" (any frame of the segment).
            rank: this process's rank, used only when no trainer is attached (tests, tools).
            world_size: number of processes, used only when no trainer is attached.
        """
        super().__init__()
        checks = {
            "clip_frames": (clip_frames, clip_frames >= 1),
            "audio_radius": (audio_radius, audio_radius >= 0),
            "batch_size": (batch_size, batch_size >= 1),
            "num_workers": (num_workers, num_workers >= 0),
            "val_percent": (val_percent, 0.0 <= val_percent < 100.0),
            "shuffle_buffer": (shuffle_buffer, shuffle_buffer >= 0),
            "seed": (seed, seed >= 0),
            "val_batches": (val_batches, val_batches >= 1),
            "ref_mode": (ref_mode, ref_mode in REF_MODES),
        }
        bad = ", ".join(f"{name}={value!r}" for name, (value, ok) in checks.items() if not ok)
        if bad:
            raise ValueError(
                f"invalid LetsTalkDataModule arguments: {bad} "
                f"(need clip_frames>=1, audio_radius>=0, batch_size>=1, num_workers>=0, 0<=val_percent<100, "
                f"shuffle_buffer>=0, seed>=0, val_batches>=1, ref_mode in {REF_MODES})"
            )
        self.root = root
        self.clip_frames, self.audio_radius, self.batch_size = clip_frames, audio_radius, batch_size
        self.num_workers, self.val_percent, self.shuffle_buffer = num_workers, val_percent, shuffle_buffer
        self.seed, self.val_batches, self.ref_mode = seed, val_batches, ref_mode
        self._rank, self._world_size = rank, world_size
        self._epoch = 0
        self.context: DiTConfig | None = None
        self.manifest: Manifest | None = None
        self.samples: list[IndexedSample] = []
        self.train_samples: list[IndexedSample] = []
        self.val_samples: list[IndexedSample] = []
        self._val_cache: list[dict[str, Any]] | None = None

    def setup(self, stage: str | None = None) -> None:
        """Read the manifest and index the shards (tar and .npy headers only); idempotent."""
        if self.manifest is not None:
            return
        root = Path(self.root)
        if not root.is_dir() or not (root / MANIFEST).is_file():
            problem = "does not exist" if not root.is_dir() else f"has no {MANIFEST}"
            raise FileNotFoundError(f"{root}: dataset folder {problem}; run `letstalk prepare` to create the dataset")
        manifest = Manifest.load(root)
        samples = index_shards(manifest.shard_paths(root))
        if not samples:
            raise ShardFormatError(f"{root / MANIFEST}: no readable samples in {len(manifest.shards)} shards")
        channels = int(manifest.vae["latent_channels"])
        wrong = next((s for s in samples if s.channels != channels), None)
        if wrong is not None:
            raise ShardFormatError(
                f"{wrong.shard}: sample {wrong.key} has {wrong.channels} latent channels, "
                f"the manifest's VAE has {channels}"
            )
        self.samples, self.manifest = samples, manifest
        self._split()

    @property
    def min_frames(self) -> int:
        """Frames a segment needs: clip_frames, plus the model's motion frames before the clip."""
        return self.clip_frames + (self.context.motion_frames if self.context is not None else 0)

    def _split(self) -> None:
        """Keep the segments long enough for a clip (and its motion frames), split by video into train/val."""
        longest = max(s.frames for s in self.samples)
        if longest < self.min_frames:
            motion = self.min_frames - self.clip_frames
            need = f"clip_frames={self.clip_frames}"
            if motion:
                need += f" + model.net.motion_frames={motion} = {self.min_frames} frames"
            raise ValueError(
                f"{self.root}: {need} is longer than every segment (longest: {longest} frames); "
                f"set clip_frames <= {longest - motion} or prepare the dataset with longer segments"
            )
        usable = [s for s in self.samples if s.frames >= self.min_frames]
        self.val_samples = [s for s in usable if is_val_video(s.key, self.val_percent)]
        self.train_samples = [s for s in usable if not is_val_video(s.key, self.val_percent)]

    def set_context(self, net: DiTConfig) -> None:
        """Take the model's long-video settings (motion_frames, memory_frames, memory_stride): batches then carry
        `motion` / `memory` and clips leave room for the motion frames. Called by LetsTalkModule.setup."""
        self.context = net if net.motion_frames or net.memory_frames else None
        self._val_cache = None
        if self.manifest is not None:
            self._split()

    def _dist(self) -> tuple[int, int]:
        """(rank, world_size): from the trainer, else the constructor overrides, else torch.distributed."""
        if self.trainer is not None:
            return int(self.trainer.global_rank), int(self.trainer.world_size)
        if self._rank is not None or self._world_size is not None:
            return int(self._rank or 0), int(self._world_size or 1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    @property
    def data_info(self) -> dict[str, Any]:
        """What the model and generation need to know about the data: sizes, encoders, fps, windows.

        Stored in checkpoints, so `letstalk generate` can rebuild the inputs the model was trained on.
        """
        self.setup()
        m = self.manifest
        k, d = int(m.audio_encoder["K"]), int(m.audio_encoder["D"])
        return {"latent_channels": int(m.vae["latent_channels"]), "audio_dim": d,
                "audio_tokens": (2 * self.audio_radius + 1) * k, "audio_radius": self.audio_radius,
                "clip_frames": self.clip_frames, "fps": float(m.fps), "sample_rate": int(m.sample_rate),
                "size": int(m.size), "vae": dict(m.vae), "audio_encoder": dict(m.audio_encoder)}

    @property
    def train_batches_per_epoch(self) -> int:
        """Batches each rank yields per epoch: usable training segments // (world_size * batch_size), at least 1."""
        self.setup("fit")
        if not self.train_samples:
            raise ValueError(
                f"{self.root}: no training segment of >= {self.min_frames} frames outside the validation split "
                f"(val_percent={self.val_percent}); lower val_percent or clip_frames"
            )
        return max(1, len(self.train_samples) // (self._dist()[1] * self.batch_size))

    def set_epoch(self, epoch: int) -> None:
        """Epoch the next `train_dataloader` starts from (used when no trainer is attached)."""
        self._epoch = int(epoch)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        rank, world_size = self._dist()
        # epochs and batches already trained, restored from a checkpoint before this is called
        # (`current_epoch` is not yet); `processed` counts a batch whose on_train_batch_end saved the checkpoint
        epoch, skip = self._epoch, 0
        if self.trainer is not None:
            epochs = self.trainer.fit_loop.epoch_progress.current
            epoch = epochs.processed
            if epochs.started > epochs.processed:  # stopped inside epoch `processed`
                skip = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        shards = list(dict.fromkeys(s.shard for s in self.train_samples))
        dataset = TrainClips(
            shards,
            self.manifest.vae,
            self.clip_frames,
            self.audio_radius,
            self.batch_size,
            self.train_batches_per_epoch,
            self.val_percent,
            self.ref_mode,
            self.shuffle_buffer,
            self.seed,
            rank,
            world_size,
            epoch,
            self.context,
            skip,
        )
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def _build_val_batches(self) -> list[dict[str, Any]]:
        """The fixed validation clips: start at frame M (0 without motion frames), reference = last frame,
        batched in index order."""
        wanted = self.val_samples[: self.val_batches * self.batch_size]
        if not wanted:
            warnings.warn(
                f"{self.root}: the validation split is empty (val_percent={self.val_percent}); "
                "validating on the first training segments",
                DataWarning,
            )
            wanted = self.train_samples[: self.val_batches * self.batch_size]
        keys = {s.key for s in wanted}
        shards = wds.SimpleShardList(list(dict.fromkeys(s.shard for s in wanted)))
        clips: dict[str, dict[str, Any]] = {}
        vae = self.manifest.vae
        start = self.context.motion_frames if self.context is not None else 0
        for segment in _segments(shards, _SkipCounter(), lambda sample: sample["__key__"] in keys):
            last = len(segment.latents) - 1
            clips[segment.key] = make_clip(segment, start, last, self.clip_frames, self.audio_radius, self.context)
        ordered = [clips[s.key] for s in wanted if s.key in clips]
        return [scale_batch(ordered[i : i + self.batch_size], vae) for i in range(0, len(ordered), self.batch_size)]

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        if self._val_cache is None:
            self._val_cache = self._build_val_batches()
        return DataLoader(self._val_cache, batch_size=None, num_workers=0)

"""Shards -> training batches: clip windows, a reference frame and per-frame audio windows. This module is the
LightningDataModule; `datamodules/clips.py` cuts one clip, `datamodules/stream.py` is the training stream.

Every sample of the stream is one clip cut from one segment (one WebDataset sample, see
`pipeline/shards/schema.py`). A batch (after `torch.utils.data.default_collate`) is a dict:

    latents  float32 [B, F, C, h, w]  F = clip_frames consecutive frames, scaled by `pipeline.vae.scale_latents`
    ref      float32 [B, 1, C, h, w]  one reference frame of the same segment, scaled the same way
    audio    float32 [B, F, W, D]     W = (2 * audio_radius + 1) * K audio vectors around each clip frame
    key      list[str]                the segment's "<video id>/<segment index>"
    start    int64   [B]              index of the clip's first frame in the segment
    motion   float32 [B, M, C, h, w]  only if the model has motion frames: the M frames right before the clip
    memory   float32 [B, N, C, h, w]  only if the model has a memory bank: frames `LongVideoContext.memory_indices`

Long videos: the model's config is the one source of M, N and the memory stride; the
LetsTalkModule hands it over with `set_context` when it is set up (before any batch is made).
Which frames a clip gets is `pipeline.models.long_video.LongVideoContext`'s, as in generation.
Clips start at frame M or later, so segments need clip_frames + M frames; memory frames
that would fall before the segment's first frame are clamped to it, exactly as generation does
at the start of a video, so no segment is skipped for lack of memory history.

Each epoch follows a plan (`datamodules.plan`) that every rank computes alike from the index,
reading no data: the usable training segments, in a (seed, epoch) permutation of their shards, cut
into one equal run per loader slot (rank x worker). So every rank yields exactly
`train_batches_per_epoch` batches (ranks never hang on uneven data) and no segment is used twice
in an epoch (a slot re-reads its run only if damaged samples left it short, or if the dataset
holds less than a batch per slot, as the fast demo's does). A run resumed in the middle of an epoch
continues exactly where it stopped: the loader draws the batches the checkpoint had already trained
on from headers alone and drops them (it never trains on them twice, and reads none of their
frames), so a resumed run sees the same batches as one that never stopped.
Validation is a fixed set of clips (first frames of the first
validation segments), identical on every run and every rank. Splits are by speaker: each video
follows the split `prepare` recorded for its speaker in the manifest (a list's `split` column
wins there); with `val_percent` set, speakers are split again by a stable hash at that percent.
Either way no speaker is in both splits.

Damaged data (`pipeline.shards.BadSamples`): a shard or sample that cannot be read is skipped,
named and counted wherever it is met (index, training stream, validation); each training batch
carries `bad_samples`, the damaged samples its worker first met since its previous batch (their keys), so
that the LetsTalkModule can count the distinct ones over workers, readers and ranks, log `data/bad_samples` and
stop the run past `max_bad_samples`. Training reads only what clips are cut from: no waveform, and of the latents and
audio features only the clip's rows (`pipeline.shards.NpyMember`, by offset), not whole segments.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from datamodules.clips import REF_MODES, cut_clip, scale_batch
from datamodules.plan import samples_per_slot
from datamodules.stream import TrainClips, ignore_sigterm
from pipeline.models.dit import DiTConfig
from pipeline.models.long_video import LongVideoContext
from pipeline.shards import (MANIFEST, TRAINING_MEMBERS, BadSamples, DataWarning, IndexedSample, Manifest,
                             ShardFormatError, index_dataset, read_segments, speaker_split)


class LetsTalkDataModule(L.LightningDataModule):
    """Training and validation batches of clips from a `letstalk prepare` dataset (see module docstring)."""

    def __init__(
        self,
        root: str,
        clip_frames: int = 8,
        audio_radius: int = 2,
        batch_size: int = 8,
        num_workers: int = 2,
        val_percent: float | None = None,
        shuffle_buffer: int = 256,
        open_shards: int = 32,
        seed: int = 0,
        val_batches: int = 2,
        ref_mode: str = "outside",
        max_bad_samples: float = 0.01,
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
            val_percent: None: the splits `prepare` recorded per speaker (manifest `inputs`; a video without a record
                is its own speaker, split at 10 %); a number: that percent of speakers (stable hash) for validation.
            shuffle_buffer: clips held in the shuffle buffer of each worker (0 or 1: no shuffling).
            open_shards: shards each worker reads at once, a segment from each in turn (mixes speakers).
            seed: seed of the shard order, clip windows and shuffling (with epoch, rank and worker).
            val_batches: number of fixed validation batches (first frames of the first validation segments).
            ref_mode: "outside" (reference frame outside the clip when possible) or "any" (any frame of the segment).
            max_bad_samples: damaged samples skipped before the run stops: >= 1 a count, < 1 a fraction of the
                dataset's samples, 0 none (`pipeline.shards.BadSamples`).
            rank: this process's rank, used only when no trainer is attached (tests, tools).
            world_size: number of processes, used only when no trainer is attached.
        """
        super().__init__()
        checks = {
            "clip_frames": (clip_frames, clip_frames >= 1),
            "audio_radius": (audio_radius, audio_radius >= 0),
            "batch_size": (batch_size, batch_size >= 1),
            "num_workers": (num_workers, num_workers >= 0),
            "val_percent": (val_percent, val_percent is None or 0.0 <= val_percent < 100.0),
            "shuffle_buffer": (shuffle_buffer, shuffle_buffer >= 0),
            "open_shards": (open_shards, open_shards >= 1),
            "seed": (seed, seed >= 0),
            "val_batches": (val_batches, val_batches >= 1),
            "ref_mode": (ref_mode, ref_mode in REF_MODES),
            "max_bad_samples": (max_bad_samples, max_bad_samples >= 0),
        }
        bad = ", ".join(f"{name}={value!r}" for name, (value, ok) in checks.items() if not ok)
        if bad:
            raise ValueError(
                f"invalid LetsTalkDataModule arguments: {bad} "
                f"(need clip_frames>=1, audio_radius>=0, batch_size>=1, num_workers>=0, 0<=val_percent<100, "
                f"shuffle_buffer>=0, open_shards>=1, seed>=0, val_batches>=1, ref_mode in {REF_MODES}, "
                "max_bad_samples>=0)"
            )
        self.root = root
        self.clip_frames, self.audio_radius, self.batch_size = clip_frames, audio_radius, batch_size
        self.num_workers, self.val_percent, self.shuffle_buffer = num_workers, val_percent, shuffle_buffer
        self.seed, self.val_batches, self.ref_mode = seed, val_batches, ref_mode
        self.max_bad_samples = max_bad_samples
        self.open_shards = open_shards
        self.faults = BadSamples(max_bad_samples)  # this process's skips (index, validation); `total` set at setup
        self._rank, self._world_size = rank, world_size
        self._epoch = 0
        self.context: LongVideoContext | None = None
        self.manifest: Manifest | None = None
        self.samples: list[IndexedSample] = []
        self.train_samples: list[IndexedSample] = []
        self.val_samples: list[IndexedSample] = []
        self._val_cache: list[dict[str, Any]] | None = None
        self._speakers: dict[str, tuple[str, str]] = {}  # video id -> (speaker, split) from the manifest

    def setup(self, stage: str | None = None) -> None:
        """Read the manifest and index the shards (tar and .npy headers only); idempotent."""
        if self.manifest is not None:
            return
        root = Path(self.root)
        if not root.is_dir() or not (root / MANIFEST).is_file():
            problem = "does not exist" if not root.is_dir() else f"has no {MANIFEST}"
            raise FileNotFoundError(f"{root}: dataset folder {problem}; run `letstalk prepare` to create the dataset")
        manifest = Manifest.load(root)
        self.faults = BadSamples(self.max_bad_samples, manifest.num_samples)
        samples = self._list_samples(root, manifest)
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

    def _list_samples(self, root: Path, manifest: Manifest) -> list[IndexedSample]:
        """The dataset's samples (`index_dataset`): read once by global rank 0 and broadcast when the job's ranks are
        up, so 64 GPUs cost one read of the index and the damage it finds is counted once; else read here."""
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1 or not torch.distributed.is_initialized():
            return index_dataset(root, manifest, self.faults)
        listing = None
        if trainer.is_global_zero:
            listing = (index_dataset(root, manifest, self.faults), sorted(self.faults.keys))
        samples, damaged = trainer.strategy.broadcast(listing, src=0)
        self.faults.keys.update(damaged)  # the stream skips them on every rank
        return samples

    @property
    def min_frames(self) -> int:
        """Frames a segment needs: clip_frames, plus the model's motion frames before the clip."""
        return self.clip_frames + (self.context.motion_frames if self.context is not None else 0)

    def split_of(self, key: str) -> str:
        """"train" or "val" for a sample key: its video's speaker's split (see `val_percent`)."""
        video = key.split("/", 1)[0]
        speaker, split = self._speakers.get(video, (video, None))
        if self.val_percent is not None or split is None:
            return speaker_split(speaker, 10.0 if self.val_percent is None else self.val_percent)
        return split

    def speaker_of(self, key: str) -> str:
        video = key.split("/", 1)[0]
        return self._speakers.get(video, (video, None))[0]

    def _split(self) -> None:
        """Keep the segments long enough for a clip (and its motion frames), split by speaker into train/val."""
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
        self._speakers = self.manifest.video_splits()
        self.val_samples = [s for s in usable if self.split_of(s.key) == "val"]
        self.train_samples = [s for s in usable if self.split_of(s.key) != "val"]

    def set_context(self, net: DiTConfig) -> None:
        """Take the model's long-video settings (`DiTConfig.long_video`): batches then carry `motion` / `memory` and
        clips leave room for the motion frames. Called by LetsTalkModule.setup; refuses more motion frames than a
        clip has (`LongVideoContext.check_clip_frames`)."""
        context = net.long_video
        context.check_clip_frames(self.clip_frames)
        self.context = context if context.active else None
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
        """Batches each rank yields per epoch: each of its loader workers (one without workers) makes the batches
        its share of the epoch plan holds (`datamodules.plan`: usable training segments // slots, batch_size a
        batch), the same on every rank."""
        self.setup("fit")
        if not self.train_samples:
            raise ValueError(
                f"{self.root}: no training segment of >= {self.min_frames} frames outside the validation split "
                f"(val_percent={self.val_percent}); lower val_percent or clip_frames"
            )
        workers = max(1, self.num_workers)
        slots = self._dist()[1] * workers
        per_slot = samples_per_slot(self._train_shards()[1], slots)
        if per_slot < 1:
            raise ValueError(
                f"{self.root}: {len(self.train_samples)} training segments are too few for {slots} loader slots "
                f"(ranks x data.num_workers); lower num_workers or use fewer ranks"
            )
        return workers * max(1, per_slot // self.batch_size)  # a slot with less than a batch repeats its run

    def _train_shards(self) -> tuple[list[str], list[int]]:
        """The shards holding usable training segments, and how many each holds (the epoch plan's input)."""
        counts = Counter(s.shard for s in self.train_samples)
        return list(counts), list(counts.values())

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
            batches = self.trainer.fit_loop.epoch_loop.batch_progress
            epoch = epochs.processed
            if epochs.started > epochs.processed:  # stopped inside epoch `processed`
                skip = batches.current.processed
            if skip and batches.is_last_batch:  # saved after the epoch's last batch: Lightning goes on with the next
                epoch, skip = epoch + 1, 0
        shards, counts = self._train_shards()
        dataset = TrainClips(
            shards,
            counts,
            self.manifest.vae,
            self.clip_frames,
            self.audio_radius,
            self.batch_size,
            self.train_batches_per_epoch,
            frozenset(s.key.split("/", 1)[0] for s in self.samples if self.split_of(s.key) == "val"),
            self.ref_mode,
            self.shuffle_buffer,
            self.seed,
            rank,
            world_size,
            epoch,
            self.context,
            skip,
            self.max_bad_samples,
            self.manifest.num_samples,
            frozenset(self.faults.keys),
            self.open_shards,
        )
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=ignore_sigterm,
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
        shards = list(dict.fromkeys(s.shard for s in wanted))
        clips: dict[str, dict[str, Any]] = {}
        vae = self.manifest.vae
        start = self.context.motion_frames if self.context is not None else 0
        for segment in read_segments(shards, self.faults, keys.__contains__, TRAINING_MEMBERS):
            last = len(segment.latents) - 1
            clips[segment.key] = cut_clip(segment, start, last, self.clip_frames, self.audio_radius, self.context)
        ordered = [clips[s.key] for s in wanted if s.key in clips]
        return [scale_batch(ordered[i : i + self.batch_size], vae) for i in range(0, len(ordered), self.batch_size)]

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        if self._val_cache is None:
            self._val_cache = self._build_val_batches()
        return DataLoader(self._val_cache, batch_size=None, num_workers=0)

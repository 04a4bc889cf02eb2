"""The training stream: each rank's and loader worker's share of an epoch's plan (`datamodules.plan`), as batches
of clips, resumable in the middle of an epoch."""

from __future__ import annotations

import random
import signal
import warnings
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import numpy as np
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from datamodules.clips import choose_window, cut_clip, scale_batch
from datamodules.plan import plan_slot, resumed_worker
from pipeline.models.long_video import LongVideoContext
from pipeline.shards import AUDIO, LATENTS, TRAINING_MEMBERS, BadSamples, Segment, read_segments


# TrainClips fast-forwards a mid-epoch resume itself (see `TrainClips`), so Lightning's warning
# that this loader "is not resumable" does not apply.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


def ignore_sigterm(worker_id: int) -> None:
    """A loader worker's init: SIGTERM ignored. SLURM's preemption signal reaches every process of a task, and a
    worker it ended would fail its rank before the rank could save (lightning_modules/requeue.py); the rank shuts
    its workers down when it leaves."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class TrainClips(IterableDataset):
    """Random training clips of the epoch plan, batched; each rank yields exactly `batches` batches per epoch.

    Each loader slot reads its run of the plan (`datamodules.plan.plan_slot`; `counts`: usable training
    segments per shard), `open_shards` of its shards at once, a segment from each in turn. Clip windows and the
    shuffle buffer (of windows: a segment's lazy arrays and a clip start; frames are read when the
    batch is made) use RNGs seeded from (seed, epoch, rank, worker). The epoch is
    `epoch` plus the number of times this object was iterated (workers are persistent, so this
    advances each epoch in worker processes too).

    Batch k of an epoch comes from worker k % num_workers (the DataLoader's round robin). `skip`
    (a mid-epoch resume) drops the first `skip` batches of the first epoch: each worker draws its
    share of them from headers and drops them unread, and worker w plays the part of worker
    (w + skip) % num_workers, so the round robin continues with batch `skip` and the order equals
    an uninterrupted run's (`datamodules.plan.resumed_worker`).
    """

    def __init__(
        self,
        shards: list[str],
        counts: list[int],
        vae: dict[str, Any],
        clip_frames: int,
        audio_radius: int,
        batch_size: int,
        batches: int,
        val_videos: frozenset[str],
        ref_mode: str,
        shuffle_buffer: int,
        seed: int,
        rank: int,
        world_size: int,
        epoch: int = 0,
        context: LongVideoContext | None = None,
        skip: int = 0,
        max_bad_samples: float = 0.01,
        total_samples: int = 0,
        exclude: frozenset[str] = frozenset(),
        open_shards: int = 32,
    ) -> None:
        super().__init__()
        self.context, self.skip = context, skip
        self.shards, self.counts, self.vae = shards, counts, vae  # counts: usable training samples per shard
        self.clip_frames, self.audio_radius, self.ref_mode = clip_frames, audio_radius, ref_mode
        self.batch_size, self.batches = batch_size, batches
        self.val_videos, self.shuffle_buffer, self.seed = val_videos, shuffle_buffer, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = epoch
        self.iterations = 0
        self.faults = BadSamples(max_bad_samples, total_samples)  # this process's (each worker has its own copy)
        self.exclude = exclude  # keys the index already found damaged (and counted): not read again
        self.open_shards = open_shards

    def __len__(self) -> int:
        return self.batches

    @staticmethod
    def _interleaved(one_pass: Callable[[], Iterator[Iterator[Segment]]], open_shards: int) -> Iterator[Segment]:
        """Read `open_shards` pieces (shards) at once, one usable segment from each in turn: a shard holds a few
        speakers (`prepare` writes a video's segments side by side), so this is what mixes speakers within a
        batch. `one_pass()` gives a pass's readers; a pass ends when all are read, and another begins only if
        the consumer wants more (damaged samples left the plan short). Raises if a whole pass gave nothing."""
        while True:
            waiting = one_pass()
            readers = list(islice(waiting, open_shards))
            gave = 0
            while readers:
                i = 0
                while i < len(readers):
                    segment = next(readers[i], None)
                    if segment is None:
                        readers[i : i + 1] = list(islice(waiting, 1))  # the pass's next piece, if any, takes its place
                        continue
                    gave += 1
                    yield segment
                    i += 1
            if not gave:
                raise RuntimeError("no readable training clip in a whole pass over this loader's share of the epoch; "
                                   "check the shards (`letstalk check`) or rerun `letstalk prepare`")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch + self.iterations
        skip = self.skip if self.iterations == 0 else 0
        self.iterations += 1
        worker, done, share = resumed_worker(self.batches, workers, worker, skip)
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker])
        lead = self.context.motion_frames if self.context is not None else 0

        def window(segment: Segment) -> tuple[Segment, int, int]:
            return segment, *choose_window(rng, len(segment.latents), self.clip_frames, self.ref_mode, lead)

        pieces = plan_slot(self.counts, self.world_size * workers, self.rank * workers + worker, self.seed, epoch)

        def training(key: str) -> bool:
            return key.split("/", 1)[0] not in self.val_videos and key not in self.exclude

        def usable(segment: Segment) -> bool:
            return len(segment.latents) >= self.clip_frames + lead

        def one_pass() -> Iterator[Iterator[Segment]]:
            """A reader of each of this slot's pieces, opened when the interleaving reaches it."""
            for piece in pieces:
                segments = read_segments([self.shards[piece.shard]], self.faults, training, TRAINING_MEMBERS,
                                         lazy=(LATENTS, AUDIO))
                yield islice(filter(usable, segments), piece.first, piece.stop)

        stages = [wds.map(window)]  # segments hold lazy arrays (headers only): windows are drawn, nothing read yet
        if self.shuffle_buffer > 1:
            shuffle_rng = random.Random(int(rng.integers(2**63)))
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=shuffle_rng))
        stages.append(wds.batched(self.batch_size, collation_fn=list, partial=False))
        open_shards = min(self.open_shards, len(pieces))
        # exactly these (the shuffle buffer reads ahead); a run of less than a batch is read again to fill one
        planned = max(sum(piece.stop - piece.first for piece in pieces), share * self.batch_size)
        windows = wds.DataPipeline(lambda: islice(self._interleaved(one_pass, open_shards), planned), *stages)
        for k, group in enumerate(islice(iter(windows), share)):
            bad = self.faults.take()  # damaged samples this worker first met since its previous batch
            if k < done:  # trained on before a mid-epoch resume: drawn and dropped, no frame read
                continue
            clips = [cut_clip(*item, self.clip_frames, self.audio_radius, self.context) for item in group]
            batch = scale_batch(clips, self.vae)  # the clips' frames and audio rows are read here, by offset
            batch["bad_samples"] = bad
            yield batch

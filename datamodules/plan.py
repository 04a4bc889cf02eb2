"""The epoch plan: which training samples each loader slot (rank x worker) reads in an epoch.

Every rank computes it alike from the per-shard counts of usable training samples (the index), reading no
data: the shards in a (seed, epoch) permutation, their samples laid end to end and cut into one run of
`total // slots` samples per slot. So every slot, and every rank, has the same number of samples (and of
batches), each sample is in at most one run (the last `total % slots` wait for another epoch's
permutation), and a run is a few whole shards plus parts of the two at its ends: reads stay sequential.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Piece:
    """Samples [first, stop) of shard `shard`, counted among that shard's usable training samples in tar order."""

    shard: int
    first: int
    stop: int


def samples_per_slot(counts: Sequence[int], slots: int) -> int:
    return sum(counts) // slots


def plan_slot(counts: Sequence[int], slots: int, slot: int, seed: int, epoch: int) -> list[Piece]:
    """The pieces slot `slot` of `slots` reads in `epoch` (module doc); `counts`: usable samples per shard."""
    order = np.random.default_rng([seed, epoch]).permutation(len(counts))
    ends = np.cumsum(np.asarray(counts, dtype=np.int64)[order])  # [shards] end of each shard in the laid-out run
    n = samples_per_slot(counts, slots)
    lo, hi = slot * n, (slot + 1) * n
    pieces = []
    for i in range(int(np.searchsorted(ends, lo, side="right")), len(order)):
        start = int(ends[i]) - int(counts[order[i]])
        if start >= hi:
            break
        first, stop = max(lo, start) - start, min(hi, int(ends[i])) - start
        if stop > first:
            pieces.append(Piece(int(order[i]), first, stop))
    return pieces


def resumed_worker(batches: int, workers: int, worker: int, skip: int) -> tuple[int, int, int]:
    """(plays, done, share) for loader worker `worker` when a rank's epoch of `batches` batches resumes after `skip`:
    batch k of an epoch comes from worker k % workers (the DataLoader's round robin), so the worker that yields
    first plays the part of worker skip % workers; of that part's `share` batches, `done` were trained on."""
    plays = (worker + skip) % workers
    share = batches // workers + (plays < batches % workers)
    done = skip // workers + (plays < skip % workers)
    return plays, done, share

"""The epoch plan at cluster scale, reading no data: 10,000 uneven shards for 512 ranks x 8 loader workers.
~10 s on 2 CPU cores (it prints the plan's time and memory, which docs/data.md quotes)."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest

from datamodules.plan import plan_slot, resumed_worker, samples_per_slot

SHARDS, RANKS, WORKERS, BATCH = 10_000, 512, 8, 4


@pytest.fixture(scope="module")
def counts() -> list[int]:
    """Usable training samples per shard: uneven (the split, short segments and damage take some of 64)."""
    return np.random.default_rng(0).integers(1, 65, SHARDS).tolist()


def test_every_sample_at_most_once_and_every_rank_the_same_batches(counts):
    slots = RANKS * WORKERS
    start = time.perf_counter()
    plan = [plan_slot(counts, slots, slot, seed=0, epoch=3) for slot in range(slots)]
    seconds = (time.perf_counter() - start) / slots  # what one loader worker computes at each epoch start
    tracemalloc.start()
    plan_slot(counts, slots, slots - 1, seed=0, epoch=3)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    n = samples_per_slot(counts, slots)
    assert n == sum(counts) // slots and n >= BATCH
    assert all(sum(p.stop - p.first for p in pieces) == n for pieces in plan)  # every slot (rank) alike
    used = np.zeros(SHARDS, dtype=np.int64)
    for pieces in plan:  # slot after slot, each shard's pieces in order and never overlapping
        for piece in pieces:
            assert 0 <= piece.first < piece.stop <= counts[piece.shard] and piece.first == used[piece.shard]
            used[piece.shard] = piece.stop
    assert sum(counts) - used.sum() == sum(counts) % slots < slots  # what is left waits for another epoch
    print(f"plan of {SHARDS} shards for {RANKS} x {WORKERS} slots: {seconds * 1e3:.2f} ms and {peak / 2**10:.0f} kB "
          "peak per loader worker")
    assert peak < 2**20  # the time is printed, not asserted: it measures the machine (benchmarks/data_path.py)


def test_the_next_epoch_is_another_permutation(counts):
    first = {p.shard for p in plan_slot(counts, 64, 5, seed=0, epoch=0)}
    assert first != {p.shard for p in plan_slot(counts, 64, 5, seed=0, epoch=1)}
    assert first == {p.shard for p in plan_slot(counts, 64, 5, seed=0, epoch=0)}  # and a restart recomputes it


@pytest.mark.parametrize("batches", [1, 7, 8, 50])
def test_a_mid_epoch_resume_repeats_and_misses_no_batch(batches):
    """The resumed loader's round robin (worker 0, 1, ... in turn) yields batches skip, skip + 1, ... of the epoch."""
    for skip in range(batches + 1):
        parts = [resumed_worker(batches, WORKERS, w, skip) for w in range(WORKERS)]
        queues = [[k * WORKERS + plays for k in range(done, share)] for plays, done, share in parts]
        order = [queue[turn] for turn in range(max(map(len, queues), default=0)) for queue in queues
                 if turn < len(queue)]
        assert order == list(range(skip, batches)), (batches, skip)


def test_fewer_shards_than_slots_still_share_samples_evenly():
    """Two shards of 5 and 3 samples, four slots: each slot two samples, every sample in exactly one slot."""
    plan = [plan_slot([5, 3], 4, slot, seed=1, epoch=0) for slot in range(4)]
    assert [sum(p.stop - p.first for p in pieces) for pieces in plan] == [2, 2, 2, 2]
    taken = sorted((p.shard, i) for pieces in plan for p in pieces for i in range(p.first, p.stop))
    assert taken == [(0, i) for i in range(5)] + [(1, i) for i in range(3)]

"""LetsTalkTrainer: the Trainer `letstalk fit` runs; every checkpoint it saves is complete or absent, and carries its
integrity manifest.

This is the one home of that mechanism: `Trainer.save_checkpoint` is the single call every save goes through
(ModelCheckpoint's periodic, top-k and `last` saves, SlurmRequeue's save on a SLURM signal, a user's own call), for
every strategy, whereas a CheckpointIO plugin misses DeepSpeed (its engine writes the folder itself) and a callback
misses direct calls. `pipeline.cli.train.LetsTalkCLI` makes it the CLI's `trainer_class`. For a save to `path`:

1. rank 0 removes a leftover `<path>.partial` (a save that was killed), checks the free space of the folder against
   the previous checkpoint's size (its manifest's), and all ranks take its answer: too little space ends the run
   with `CheckpointSpaceError` before anything is written;
2. every rank writes into `<path>.partial` (Lightning's own save; DeepSpeed: each rank its shards). A rank whose
   write fails (a full disk: OSError, or torch's RuntimeError) does not stop there: under DeepSpeed it first meets
   the barrier that ends DeepSpeed's save on the other ranks, then all ranks exchange what went wrong, so they all
   raise the same error instead of leaving some waiting in a collective. Rank 0 then removes the unfinished save;
3. rank 0 writes the manifest last (`pipeline.checkpoints.make_manifest`: relative paths, sizes, sha256, global step,
   world size) and puts the checkpoint in place: a DeepSpeed folder gets its manifest inside, then the old folder
   of that name (if any) is moved aside to `<path>.old`, the new one renamed in and the old one deleted; a file
   replaces the old one with one rename (`os.replace`), then its manifest, written before as
   `<path>.manifest.json.partial`, is renamed to `<path>.manifest.json` beside it (the old one's is removed first). A caller that names a `*.partial` path itself (SlurmRequeue) renames it into
   place itself: the save then writes there directly and the manifest describes the final name. Manifests whose
   checkpoint is gone (ModelCheckpoint's top-k removal, SlurmRequeue's removal of older requeue checkpoints) are
   deleted at each save and when fit ends.

A kill between the renames of step 3 (microseconds) leaves the new data in place under the old manifest or none: it
does not verify, so resume skips it; it never looks complete with other bytes than it was saved with.

Cost: step 3 reads the whole checkpoint once on rank 0 to hash it while the other ranks wait: ~0.9 GB/s (sha256 on
one core, from the page cache; `benchmarks/checkpoint_integrity.py`: 0.8 s for the S model's 724 MB, whose save
took 4.7 s), so seconds for a multi-GB checkpoint, next to the save itself, which writes the same bytes. Under DeepSpeed, a write that fails somewhere other than between the
start of its shard writes and its closing barrier (DeepSpeed raises on a failed `mkdir` only in its logs) could
still leave ranks waiting in different collectives until the process-group timeout.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy as LightningDeepSpeedStrategy

from pipeline.checkpoints import MANIFEST, SIDECAR, make_manifest, write_manifest

PARTIAL = ".partial"  # <path>.partial: a save in progress (or killed)
ASIDE = ".old"  # <path>.old: the previous DeepSpeed folder of that name, while the new one is renamed in


class CheckpointSpaceError(OSError):
    """A checkpoint that could not be saved for want of disk space; the checkpoints already saved are intact."""


def _raise(problem: str | None) -> None:
    """Raise the error all ranks agreed on, if any: CheckpointSpaceError for a full disk, else OSError."""
    if problem:
        raise CheckpointSpaceError(problem) if problem.startswith("no space") else OSError(problem)


def _mib(size: float) -> str:
    return f"{size / 2**20:.1f} MiB"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.is_file() else 0


def previous_checkpoint_bytes(folder: Path) -> tuple[int, Path] | None:
    """(size, manifest) of the newest checkpoint with a manifest in `folder`, from its manifest; None if none."""
    manifests = [*folder.glob(f"*{SIDECAR}"), *folder.glob(f"*/{MANIFEST}")]
    if not manifests:
        return None
    for newest in sorted(manifests, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            return int(json.loads(newest.read_text())["bytes"]), newest
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def remove_orphan_manifests(folder: Path) -> None:
    """Delete the manifests beside checkpoint files that no longer exist (nor are being written), and manifests staged
    by a save that was killed (called by rank 0 between saves)."""
    for side in folder.glob(f"*{SIDECAR}"):
        checkpoint = side.with_name(side.name[: -len(SIDECAR)])
        if not checkpoint.exists() and not checkpoint.with_name(checkpoint.name + PARTIAL).exists():
            side.unlink(missing_ok=True)
    for staged in folder.glob(f"*{SIDECAR}{PARTIAL}"):
        staged.unlink(missing_ok=True)


class LetsTalkTrainer(Trainer):
    """Lightning's Trainer whose `save_checkpoint` writes complete-or-absent checkpoints with an integrity manifest,
    and stops the run with a clear message when the disk is full (module docstring)."""

    _last_checkpoint_bytes: int | None = None

    def save_checkpoint(self, filepath, weights_only: bool | None = None, storage_options: Any = None) -> None:
        if self.model is None:
            return super().save_checkpoint(filepath, weights_only, storage_options)  # Lightning's error
        requested = Path(filepath)
        caller_renames = requested.name.endswith(PARTIAL)
        final = requested.with_name(requested.name[: -len(PARTIAL)]) if caller_renames else requested
        written = requested if caller_renames else requested.with_name(requested.name + PARTIAL)
        deepspeed = isinstance(self.strategy, LightningDeepSpeedStrategy)

        problem = self._prepare(final, written, deepspeed) if self.is_global_zero else None
        _raise(self.strategy.broadcast(problem))

        failure = None
        with self.profiler.profile("save_checkpoint"):
            checkpoint = self._checkpoint_connector.dump_checkpoint(weights_only)
            try:
                self.strategy.save_checkpoint(checkpoint, written, storage_options=storage_options)
            except (OSError, RuntimeError) as err:
                failure = self._failure(final, written, err)
                if deepspeed and torch.distributed.is_initialized():
                    torch.distributed.barrier()  # the one that ends DeepSpeed's save on the ranks that finished
        failure = self._first(failure)
        if failure and self.is_global_zero:
            _remove(written)
        _raise(failure)

        problem = None
        if self.is_global_zero:
            try:
                self._commit(final, written, caller_renames)
            except OSError as err:
                problem = self._failure(final, written, err)
                _remove(written)
        _raise(self.strategy.broadcast(problem))

    def fit(self, *args: Any, **kwargs: Any) -> None:
        try:
            return super().fit(*args, **kwargs)
        finally:
            if self.is_global_zero:  # ModelCheckpoint removes old top-k files after a save: their manifests too
                for folder in self._checkpoint_folders():
                    remove_orphan_manifests(folder)

    def _checkpoint_folders(self) -> list[Path]:
        folders = {Path(self.default_root_dir)}
        folders |= {Path(c.dirpath) for c in self.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath}
        return [f for f in folders if f.is_dir()]

    def _where(self, final: Path) -> str:
        return ("trainer.default_root_dir" if final.parent == Path(self.default_root_dir)
                else "the ModelCheckpoint's dirpath (or trainer.default_root_dir)")

    def _needed(self, folder: Path) -> tuple[int, str] | None:
        """About how many bytes the next checkpoint takes: the previous one's, from its manifest."""
        previous = previous_checkpoint_bytes(folder)
        if previous is not None:
            return previous[0], f"the size of the previous checkpoint, {previous[1].name}"
        if self._last_checkpoint_bytes:
            return self._last_checkpoint_bytes, "the size of this run's previous checkpoint"
        return None

    def _prepare(self, final: Path, written: Path, deepspeed: bool) -> str | None:
        """Rank 0, before the write: a clean temporary name, and enough free space for a checkpoint as large as the
        previous one (the old checkpoint of that name stays until the new one is complete)."""
        folder = final.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _remove(written)
            if deepspeed:  # made here: DeepSpeed only logs a failed mkdir, then its ranks part ways
                (written / "checkpoint").mkdir(parents=True)
        except OSError as err:
            return self._failure(final, written, err)
        needed = self._needed(folder)
        free = shutil.disk_usage(folder).free
        if needed is not None and free < needed[0]:
            _remove(written)
            return (f"no space to save checkpoint {final.name}: {folder} has {_mib(free)} free, about "
                    f"{_mib(needed[0])} needed ({needed[1]}); the checkpoints already there are intact. Free space "
                    f"there or point {self._where(final)} at a larger disk, then resume with --ckpt_path last")
        return None

    def _failure(self, final: Path, written: Path, err: BaseException) -> str:
        """What to say about a save that raised `err`: a full disk (ENOSPC, or a folder left with no free space:
        torch reports a failed write as a RuntimeError without errno), or another error, on this rank."""
        folder = final.parent
        try:
            usage = shutil.disk_usage(folder)
        except OSError:
            usage = None
        full = getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(err) or (
            usage is not None and usage.free < max(2**20, usage.total // 100))
        rank = f" (rank {self.global_rank})" if self.world_size > 1 else ""
        if not full:
            return (f"saving checkpoint {final} failed{rank}: {type(err).__name__}: {err}; the unfinished save "
                    f"{written.name} is removed, the checkpoints already there are intact")
        needed, unfinished = self._needed(folder), _size(written)
        need = (f"about {_mib(needed[0])} needed ({needed[1]}), more than the {_mib(unfinished)} written before it "
                "filled" if needed else f"more than the {_mib(unfinished)} written before it filled")
        free = _mib(usage.free + unfinished) if usage else "no"  # once the unfinished save is removed
        return (f"no space left on device while saving checkpoint {final.name}{rank}: {folder} has {free} free, "
                f"{need}; the unfinished save is removed and the checkpoints already there are intact. Free space "
                f"there or point {self._where(final)} at a larger disk, then resume with --ckpt_path last")

    def _first(self, failure: str | None) -> str | None:
        """The first rank's failure, on every rank (a save fails on some ranks only: each writes its own shard)."""
        if self.world_size == 1 or not torch.distributed.is_initialized():
            return failure
        gathered: list[str | None] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, failure)
        return next((f for f in gathered if f), None)

    def _commit(self, final: Path, written: Path, caller_renames: bool) -> None:
        """Rank 0, once every rank has written: the manifest last, and the checkpoint in place (module doc, step 3)."""
        manifest = make_manifest(written, self.global_step, self.world_size, name=final.name)
        side = final.with_name(final.name + SIDECAR)
        remove_orphan_manifests(final.parent)
        if written.is_dir():
            write_manifest(manifest, written / MANIFEST)  # the last write; a failure here leaves everything as it was
            if not caller_renames:
                if final.exists() or final.is_symlink():
                    aside = final.with_name(final.name + ASIDE)
                    _remove(aside)
                    os.replace(final, aside)
                    try:
                        os.replace(written, final)
                    except OSError:
                        os.replace(aside, final)
                        raise
                    _remove(aside)
                else:
                    os.replace(written, final)
                side.unlink(missing_ok=True)  # a file checkpoint's, if a file had this name before
        else:
            staged = write_manifest(manifest, side.with_name(side.name + PARTIAL))  # written before anything moves
            try:
                if not caller_renames:
                    side.unlink(missing_ok=True)
                    if final.is_dir() and not final.is_symlink():
                        shutil.rmtree(final)
                    os.replace(written, final)
                os.replace(staged, side)
            finally:
                staged.unlink(missing_ok=True)
        self._last_checkpoint_bytes = manifest["bytes"]

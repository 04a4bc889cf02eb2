"""The dataset index: one row per sample (key, frames, member offsets), compiled once by `write_index` and read at
start instead of every shard; `index_shards` is the one walk over tar headers."""

from __future__ import annotations

import json
import math
import os
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.shards.faults import BadSamples, DataWarning
from pipeline.shards.manifest import MANIFEST, Manifest
from pipeline.shards.npy import NpyMember
from pipeline.shards.schema import LATENTS, MEMBERS, ShardFormatError

INDEX = "index.npz"  # compiled by `write_index`: one row per sample, read once at start instead of every shard
INDEX_LOG = "index.jsonl"  # AtomicShardWriter's append-only log of finished shards' rows (`<prefix>index.jsonl`)
INDEX_COLUMNS = ("key", "frames", "channels", *(f"{m}:{part}" for m in MEMBERS for part in ("offset", "size")))


@dataclass(frozen=True)
class IndexedSample:
    """One complete sample found by `index_shards`: where it is, its frame count and latent channels."""

    shard: str
    key: str
    frames: int
    channels: int


def index_shards(paths: list[str], faults: BadSamples | None = None) -> list[IndexedSample]:
    """List every complete sample of every shard, in shard order, from tar headers and `.npy` headers only.

    Why: the manifest has per-shard counts, but the train/validation split is per speaker and clips
    need segments of at least `clip_frames` frames, so epoch lengths need per-sample keys and
    frame counts. Walking tar headers seeks past the payloads and reads ~100 bytes of each
    latents header: a few small reads per sample, no decoding. A sample that lacks a member, lies
    past the end of a truncated shard, or whose latents header is not float16 [T, C, h, w] (an
    object array, say) goes to `faults` (named, counted, its key remembered); so does a shard that
    cannot be read at all.
    """
    faults = faults if faults is not None else BadSamples(budget=math.inf)
    found: list[IndexedSample] = []
    for path in paths:
        members: dict[str, set[str]] = {}
        headers: dict[str, NpyMember | str] = {}  # key -> its latents header, or why it is unreadable
        order: list[str] = []
        damage = ""
        try:
            size = Path(path).stat().st_size
            with tarfile.open(path, "r:") as tar:
                for member in tar:
                    if not member.isreg():
                        continue
                    key, _, ext = member.name.partition(".")
                    if key not in members:
                        members[key] = set()
                        order.append(key)
                    if member.offset_data + member.size > size:
                        raise tarfile.ReadError(f"truncated inside {member.name}")
                    members[key].add(ext)
                    if ext == LATENTS:
                        try:
                            headers[key] = NpyMember.from_tar(path, member, tar.extractfile(member))
                        except ShardFormatError as err:
                            headers[key] = str(err)
                tar.fileobj.seek(tar.offset)
                if tar.fileobj.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
                    raise tarfile.ReadError("no end-of-archive block after the last member (truncated)")
        except (OSError, tarfile.TarError) as err:
            damage = f"unreadable shard ({type(err).__name__}: {err})"
        named = False
        for key in order:
            header = headers.get(key)
            lacks = [m for m in MEMBERS if m not in members[key]]
            if lacks:
                problem = f"{path}: sample {key}: lacks {lacks}" + (f"; {damage}" if damage else "")
            elif isinstance(header, str):
                problem = header
            elif header.dtype != np.float16 or header.ndim != 4:
                problem = f"{path}: sample {key}: {LATENTS} is {header.dtype} {header.shape}, not float16 [T, C, h, w]"
            else:
                found.append(IndexedSample(path, key, header.shape[0], header.shape[1]))
                continue
            named = named or bool(lacks and damage)
            faults.skip(ShardFormatError(problem), key)
        if damage and not named:
            faults.skip(ShardFormatError(f"{path}: {damage}; using its complete samples only"))
    return found


def write_index(root: str | os.PathLike, manifest: Manifest) -> Path:
    """Compile `root/index.npz` (atomically) from the writers' `*index.jsonl` logs, for the manifest's shards.

    Columns: `shards` (paths) and `shard_bytes`; per sample `shard` (its row in `shards`), `key` (ASCII),
    `frames`, `channels`, `offsets` and `sizes` [N, 4] of the members in MEMBERS order, and `speaker` (its row
    in `speakers`) and `split` (0 train, 1 val) from the manifest's inputs (-1 / -1 where it has none).
    Plain arrays only: `np.load(allow_pickle=False)` reads it.
    """
    root = Path(root)
    wanted = {s["path"]: s for s in manifest.shards}
    rows: dict[str, list[list[Any]]] = {}
    for log in sorted(root.glob(f"*{INDEX_LOG}")):
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # the torn last line of a killed writer
            shard = wanted.get(entry.get("path"))
            if shard is not None and (shard.get("bytes"), shard.get("sha256")) == (entry["bytes"], entry["sha256"]):
                rows[entry["path"]] = entry["rows"]
    missing = [path for path in wanted if path not in rows]
    if missing:
        raise ShardFormatError(f"{root}: no index rows for {len(missing)} of {len(wanted)} shards (e.g. {missing[0]}); "
                               f"written by an older `letstalk prepare`? Training walks the shards' headers instead")
    splits = manifest.video_splits()
    speakers = sorted({speaker for speaker, _ in splits.values()})
    speaker_row = {speaker: i for i, speaker in enumerate(speakers)}
    order = [(i, row) for i, path in enumerate(wanted) for row in rows[path]]
    video = [str(row[0]).split("/", 1)[0] for _, row in order]
    columns = {
        "shards": np.array(list(wanted), dtype=str),
        "shard_bytes": np.array([int(s["bytes"]) for s in wanted.values()], dtype=np.int64),
        "shard": np.array([i for i, _ in order], dtype=np.int32),
        "key": np.array([str(row[0]).encode("ascii") for _, row in order], dtype=bytes),
        "frames": np.array([row[1] for _, row in order], dtype=np.int32),
        "channels": np.array([row[2] for _, row in order], dtype=np.int32),
        "offsets": np.array([row[3::2] for _, row in order], dtype=np.int64).reshape(-1, len(MEMBERS)),
        "sizes": np.array([row[4::2] for _, row in order], dtype=np.int64).reshape(-1, len(MEMBERS)),
        "speakers": np.array(speakers, dtype=str),
        "speaker": np.array([speaker_row[splits[v][0]] if v in splits else -1 for v in video], dtype=np.int32),
        "split": np.array([("train", "val").index(splits[v][1]) if v in splits else -1 for v in video], dtype=np.int8),
    }
    path = root / INDEX
    if path.is_file():  # an unchanged index is left untouched (a rerun that prepares nothing writes nothing)
        with np.load(path, allow_pickle=False) as old:
            if set(old.files) == set(columns) and all(np.array_equal(old[k], v) for k, v in columns.items()):
                return path
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as file:
        np.savez(file, **columns)
    os.replace(tmp, path)
    return path


def index_dataset(root: str | os.PathLike, manifest: Manifest, faults: BadSamples | None = None
                  ) -> list[IndexedSample]:
    """The dataset's complete samples, in shard order: from `index.npz` when it lists the manifest's shards (one
    read, then one `stat` per shard; a shard whose size differs from the index's is walked by `index_shards`,
    so damage is found, named and counted as without an index), else by walking every shard's headers."""
    root = Path(root) if Path(root).is_dir() else Path(root).parent
    paths = manifest.shard_paths(root)
    if not (root / INDEX).is_file():
        return index_shards(paths, faults)
    with np.load(root / INDEX, allow_pickle=False) as index:
        columns = {name: index[name] for name in ("shards", "shard_bytes", "shard", "key", "frames", "channels")}
    if columns["shards"].tolist() != [s["path"] for s in manifest.shards]:
        warnings.warn(f"{root / INDEX}: lists other shards than {MANIFEST}; walking the shards' headers instead",
                      DataWarning, stacklevel=2)
        return index_shards(paths, faults)
    changed: dict[int, list[IndexedSample]] = {}
    for i, (path, size) in enumerate(zip(paths, columns["shard_bytes"].tolist())):
        try:
            intact = os.stat(path).st_size == size
        except OSError:
            intact = False
        if not intact:
            changed[i] = index_shards([path], faults)
    found: list[IndexedSample] = []
    shard, keys, frames, channels = (columns[c].tolist() for c in ("shard", "key", "frames", "channels"))
    for i in range(len(keys)):
        if shard[i] not in changed:
            found.append(IndexedSample(paths[shard[i]], keys[i].decode("ascii"), frames[i], channels[i]))
        elif shard[i] != (shard[i - 1] if i else -1):
            found.extend(changed[shard[i]])
    return found

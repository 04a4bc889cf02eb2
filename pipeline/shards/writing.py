"""`AtomicShardWriter`: shards that appear under their final name only when complete, with their index rows."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any


from pipeline.shards.index import INDEX_LOG
from pipeline.shards.schema import MEMBERS, SHARD_PATTERN, Segment

class _HashingFile:
    """A write-only file that hashes what passes through: a shard's sha256 and size without reading it back."""

    def __init__(self, file: Any):
        self.file, self.sha256, self.bytes = file, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.file.write(data)


class AtomicShardWriter:
    """Writes numbered tar shards under a temporary name and renames each when complete.

    A killed job leaves at most a `*.tar.tmp`, never a `.tar` that looks whole.
    `shards` lists the finished ones as manifest entries (with size and sha256, computed while
    writing). Each finished shard's sample rows (key, frames, channels, byte offset and size of
    every member) are appended to `<prefix>index.jsonl` (append-only: a killed job leaves at most a
    torn last line, which `write_index` ignores), from which `write_index` compiles `index.npz`.
    """

    def __init__(self, out_dir: str | os.PathLike, max_samples: int = 64, start_index: int = 0, prefix: str = ""):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_samples = max_samples
        self.index = start_index
        self.prefix = prefix
        self.shards: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None
        self._file = None
        self._hashing: _HashingFile | None = None
        self._count = 0
        self._frames = 0
        self._rows: list[list[Any]] = []  # the open shard's index rows (`INDEX_COLUMNS`)

    @property
    def _final(self) -> Path:
        return self.out_dir / (self.prefix + SHARD_PATTERN.format(index=self.index))

    def write(self, segment: Segment) -> None:
        if self._tar is None:
            self._file = open(self._final.with_name(self._final.name + ".tmp"), "wb")
            self._hashing = _HashingFile(self._file)
            self._tar = tarfile.open(fileobj=self._hashing, mode="w|")
        members = segment.to_wds()
        key = members.pop("__key__")
        row: list[Any] = [key, int(segment.latents.shape[0]), int(segment.latents.shape[1])]
        for name in MEMBERS:
            data = members[name]
            info = tarfile.TarInfo(f"{key}.{name}")
            info.size = len(data)
            info.mode = 0o444
            header = info.tobuf(self._tar.format, self._tar.encoding, self._tar.errors)
            row += [self._tar.offset + len(header), len(data)]  # where the member's data starts, its size
            self._tar.addfile(info, io.BytesIO(data))
        self._rows.append(row)
        self._count += 1
        self._frames += int(segment.latents.shape[0])
        if self._count >= self.max_samples:
            self.flush()

    def flush(self) -> None:
        """Finish the open shard (if any) and make it visible under its final name."""
        if self._tar is None:
            return
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        tmp = self._final.with_name(self._final.name + ".tmp")
        os.replace(tmp, self._final)
        entry = {"path": self._final.name, "samples": self._count, "frames": self._frames,
                 "bytes": self._hashing.bytes, "sha256": self._hashing.sha256.hexdigest()}
        self.shards.append(entry)
        with open(self.out_dir / f"{self.prefix}{INDEX_LOG}", "a", encoding="utf-8") as log:
            log.write(json.dumps({**entry, "rows": self._rows}) + "\n")
            log.flush()
            os.fsync(log.fileno())
        self._tar, self._file, self._hashing, self._count, self._frames, self._rows = None, None, None, 0, 0, []
        self.index += 1

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "AtomicShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.flush()
        elif self._tar is not None:  # leave no half shard behind on error
            self._tar.close()
            self._file.close()
            self._final.with_name(self._final.name + ".tmp").unlink(missing_ok=True)

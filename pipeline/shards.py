"""The shard format: the one contract between `letstalk prepare` and training.

One WebDataset sample is one segment of one source video (DESIGN.md section 2):

    __key__       "<video id>/<segment index>"
    latents.npy   float16 [T, C, h, w]  VAE posterior mean, unscaled, one per frame
    audio.npy     float16 [T, K, D]     audio features, K vectors per video frame
    audio.flac    the segment's 16 kHz mono waveform
    json          fps, sample_rate, frames, face_box, source (absolute path), encoder ids

Arrays are stored with ``numpy.save(allow_pickle=False)`` and read back the same
way, so nothing in a shard is ever unpickled. Writer, reader and tests all import
this module; nothing else knows the member names or opens a shard: `read_samples`
is the one tar reader (optionally only some members), `index_shards` the one walk
over headers, `read_segments` the one decoding stream, and `BadSamples` the one
fault policy every consumer applies (a damaged shard or sample is skipped, named
and counted; past a budget the run stops with a message).

Splits are by speaker (`speaker_split`; `prepare` records each input's speaker and
split in the manifest, a list's `split` column winning), so no speaker is in both.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import tarfile
import tokenize
import warnings
import zlib
from collections.abc import Callable, Collection, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

LATENTS = "latents.npy"
AUDIO = "audio.npy"
WAVEFORM = "audio.flac"
META = "json"
MEMBERS = (LATENTS, AUDIO, WAVEFORM, META)

TRAINING_MEMBERS = (LATENTS, AUDIO, META)  # what clips are cut from: training never reads the waveform

MANIFEST = "manifest.json"
INDEX = "index.npz"  # compiled by `write_index`: one row per sample, read once at start instead of every shard
INDEX_LOG = "index.jsonl"  # AtomicShardWriter's append-only log of finished shards' rows (`<prefix>index.jsonl`)
INDEX_COLUMNS = ("key", "frames", "channels", *(f"{m}:{part}" for m in MEMBERS for part in ("offset", "size")))
MANIFEST_VERSION = 1
SHARD_PATTERN = "shard-{index:06d}.tar"

_KEY_PART = re.compile(r"[^A-Za-z0-9_\-]")


class ShardFormatError(ValueError):
    """A sample or manifest that does not follow the shard format (`key`: the sample's, where one is at fault)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def video_id(path: str | os.PathLike) -> str:
    """A key-safe id for a source video: its stem with anything but [A-Za-z0-9_-] replaced.

    WebDataset splits a member name at the first dot of its base name, so ids carry no dots.
    """
    return _KEY_PART.sub("_", Path(path).stem) or "video"


def sample_key(vid: str, segment: int) -> str:
    return f"{vid}/{segment:04d}"


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npy_load(data: "bytes | NpyMember") -> "np.ndarray | NpyMember":
    """Decode a `.npy` member; refuses object arrays (never unpickles). A lazily read member stays as it is."""
    return data if isinstance(data, NpyMember) else np.load(io.BytesIO(data), allow_pickle=False)


# what numpy raises on a damaged `.npy` header: it parses the header's dict text with Python's tokenizer
NPY_HEADER_ERRORS = (ValueError, SyntaxError, tokenize.TokenError, UnicodeDecodeError)

_OPEN_FILES: dict[str, int] = {}  # path -> file descriptor, this process's few most recently read shards
_MAX_OPEN_FILES = 64


def _pread(path: str, size: int, offset: int) -> bytes:
    """`size` bytes at `offset` of `path`, through a small cache of open descriptors (positional reads)."""
    fd = _OPEN_FILES.pop(path, None)
    if fd is None:
        fd = os.open(path, os.O_RDONLY)
        if len(_OPEN_FILES) >= _MAX_OPEN_FILES:
            os.close(_OPEN_FILES.pop(next(iter(_OPEN_FILES))))
    _OPEN_FILES[path] = fd  # most recent last
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise ShardFormatError(f"{path}: {size} bytes wanted at offset {offset}, {len(data)} there (truncated?)")
    return data


@dataclass(frozen=True)
class NpyMember:
    """An uncompressed `.npy` member of a shard, read on demand: indexing the first axis (an int, a slice of step
    1, or a list of ints) reads only those rows, by offset. What training holds instead of whole arrays, so a clip
    of 16 frames reads 16 frames of a 100-frame segment, and a skipped batch reads nothing but headers."""

    path: str
    offset: int  # of the array data in the file
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def _rows(self, start: int, stop: int) -> np.ndarray:
        row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        data = _pread(self.path, (stop - start) * row, self.offset + start * row)
        return np.frombuffer(data, self.dtype).reshape(stop - start, *self.shape[1:])

    def __getitem__(self, index: int | slice | list[int] | np.ndarray) -> np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise IndexError("NpyMember reads contiguous rows only (slice step 1)")
            return self._rows(start, max(start, stop))
        if isinstance(index, (int, np.integer)):
            return self._rows(*slice(index, index + 1).indices(len(self))[:2])[0]
        rows = [int(i) for i in index]
        if rows and rows == list(range(rows[0], rows[0] + len(rows))) and 0 <= rows[0] and rows[-1] < len(self):
            return self._rows(rows[0], rows[-1] + 1)  # consecutive rows (a clip's motion frames): one read
        return np.stack([self[i] for i in rows])

    @classmethod
    def from_tar(cls, path: str, member: tarfile.TarInfo, fileobj: Any) -> "NpyMember":
        """Parse the member's `.npy` header (from `fileobj`, the member's data) and check that the data the header
        promises is exactly what the member holds: C-ordered, no objects, no missing or extra bytes."""
        try:
            version = np.lib.format.read_magic(fileobj)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(fileobj)
        except NPY_HEADER_ERRORS as err:
            raise ShardFormatError(f"{path}: {member.name}: unreadable .npy header ({err})") from err
        if dtype.hasobject or fortran:
            raise ShardFormatError(f"{path}: {member.name}: an {'object' if dtype.hasobject else 'F-ordered'} array "
                                   "(refused; nothing is unpickled)")
        header = fileobj.tell()
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if header + nbytes != member.size:
            raise ShardFormatError(f"{path}: {member.name}: {member.size - header} data bytes, its header "
                                   f"{dtype} {tuple(shape)} needs {nbytes}")
        return cls(path, member.offset_data + header, tuple(shape), dtype)


@dataclass
class Segment:
    """One decoded sample, as numpy arrays and its metadata."""

    key: str
    latents: "np.ndarray | NpyMember"  # float16 [T, C, h, w]
    audio: "np.ndarray | NpyMember"  # float16 [T, K, D]
    waveform_flac: bytes
    meta: dict[str, Any]

    def validate(self, where: str = "") -> None:
        where = f"{where}: " if where else ""
        if self.latents.dtype != np.float16 or self.latents.ndim != 4:
            raise ShardFormatError(
                f"{where}{self.key}: latents must be float16 [T, C, h, w], got {self.latents.dtype} {self.latents.shape}"
            )
        if self.audio.dtype != np.float16 or self.audio.ndim != 3:
            raise ShardFormatError(
                f"{where}{self.key}: audio must be float16 [T, K, D], got {self.audio.dtype} {self.audio.shape}"
            )
        if self.latents.shape[0] != self.audio.shape[0]:
            raise ShardFormatError(
                f"{where}{self.key}: {self.latents.shape[0]} latent frames but {self.audio.shape[0]} audio frames"
            )
        if self.meta.get("frames") != self.latents.shape[0]:
            raise ShardFormatError(f"{where}{self.key}: json frames={self.meta.get('frames')} != {self.latents.shape[0]}")

    def to_wds(self) -> dict[str, Any]:
        """The sample as WebDataset members (all bytes)."""
        self.validate()
        return {
            "__key__": self.key,
            LATENTS: npy_bytes(self.latents),
            AUDIO: npy_bytes(self.audio),
            WAVEFORM: self.waveform_flac,
            META: json.dumps(self.meta, sort_keys=True).encode("utf-8"),
        }

    @classmethod
    def from_wds(cls, sample: dict[str, Any]) -> "Segment":
        """Decode a raw WebDataset sample (member name -> bytes) safely."""
        where = sample.get("__url__", "")
        missing = [m for m in MEMBERS if m not in sample]
        if missing:
            raise ShardFormatError(f"{where}: sample {sample.get('__key__')} lacks {missing}")
        meta = json.loads(sample[META])
        if not isinstance(meta, dict):
            raise ShardFormatError(f"{where}: sample {sample.get('__key__')}: {META} is not a JSON object")
        segment = cls(
            key=sample["__key__"],
            latents=npy_load(sample[LATENTS]),
            audio=npy_load(sample[AUDIO]),
            waveform_flac=bytes(sample[WAVEFORM]),
            meta=meta,
        )
        segment.validate(where)
        return segment


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


class DataWarning(UserWarning):
    """Data that was skipped (unreadable shard or sample) or a fallback that was taken."""


class TooManyBadSamples(RuntimeError):
    """More damaged samples than the run's budget (`data.max_bad_samples`) allows."""


def speaker_split(speaker: str, val_percent: float) -> str:
    """"val" for the speakers whose crc32 falls in the first `val_percent` % (stable across runs), else "train"."""
    bucket = zlib.crc32(speaker.encode("utf-8")) % 10000
    return "val" if bucket < round(val_percent * 100) else "train"


def split_warning(speakers: dict[str, int], val_percent: float | None) -> str | None:
    """The warning for a dataset whose speakers all went to one split ({"train": n, "val": m} speakers), else None:
    training would have nothing held out to validate on, or nothing to train on."""
    train, val = speakers.get("train", 0), speakers.get("val", 0)
    if (train == 0) == (val == 0):
        return None
    count = train or val
    at = f" at --val-percent {val_percent:g}" if val_percent is not None else ""
    who = f"{count} speaker{'s' if count > 1 else ''}, all in {'train' if train else 'val'}{at}"
    if train:
        return (f"warning: the validation split is empty ({who}); give some speakers split=val in the list, "
                "or raise --val-percent")
    return (f"warning: the training split is empty ({who}); give some speakers split=train in the list, "
            "or lower --val-percent")


def read_samples(path: str | os.PathLike, members: Collection[str] | None = None,
                 keep: Callable[[str], bool] | None = None, lazy: Collection[str] = ()) -> Iterator[dict[str, Any]]:
    """The one tar reader: a shard's samples {__key__, __url__, member: bytes} in tar order.

    `members`: read only these (the others' payloads are seeked past, not read), e.g. training skips the FLAC;
    `keep`: read only the samples whose key passes it; `lazy`: `.npy` members given as `NpyMember` (header read
    and checked, data read on demand). A shard that cannot be opened or is damaged part-way
    yields its complete samples before the damage and then raises ShardFormatError naming the shard and the
    sample being read (its `key`; None when the damage lies outside every sample read).
    """
    url, sample = str(path), None
    try:
        with tarfile.open(url, "r:") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                key, _, ext = member.name.partition(".")
                if keep is not None and not keep(key):
                    continue
                if sample is not None and sample["__key__"] != key:
                    yield sample
                    sample = None
                sample = sample or {"__key__": key, "__url__": url}
                if ext in lazy:
                    try:
                        sample[ext] = NpyMember.from_tar(url, member, tar.extractfile(member))
                    except ShardFormatError as err:  # this sample is damaged, the shard reads on
                        sample["__error__"] = str(err)
                elif members is None or ext in members:
                    sample[ext] = tar.extractfile(member).read()
        if sample is not None:
            yield sample
    except (OSError, tarfile.TarError) as err:
        if sample is not None and set(members or MEMBERS) <= sample.keys():  # read whole: the damage comes after it
            yield sample
            sample = None
        key = sample["__key__"] if sample is not None else None
        at = f"sample {key}: " if key is not None else ""
        raise ShardFormatError(f"{url}: {at}unreadable shard ({type(err).__name__}: {err})", key) from err


def iter_tar(path: str | os.PathLike) -> Iterator[Segment]:
    """Every sample of a shard, decoded; the first damage raises (tools and tests; training uses `read_segments`)."""
    for sample in read_samples(path):
        yield decode(sample)


def decode(sample: dict[str, Any]) -> Segment:
    """Raw member bytes -> Segment; any decoding failure (an object array, a bad header, a wrong shape or dtype)
    becomes a ShardFormatError naming shard and key. Nothing is unpickled."""
    if "__error__" in sample:
        raise ShardFormatError(sample["__error__"], sample.get("__key__"))
    try:
        return Segment.from_wds(sample)
    except ShardFormatError:
        raise
    except (*NPY_HEADER_ERRORS, EOFError, OSError) as err:
        raise ShardFormatError(f"{sample.get('__url__')}: sample {sample.get('__key__')}: {err}") from err


class BadSamples:
    """The fault policy of every shard reader: skip a damaged shard or sample, name it and count it; stop the run
    (TooManyBadSamples) once the count passes the budget.

    The count is of distinct damaged samples (by sample key; a shard's damage without one by its message), however
    often they are met: every epoch re-reads them, and validation and evaluation read some of them too.
    budget (`data.max_bad_samples`): >= 1 an absolute count, in (0, 1) a fraction of `total` samples (the dataset's),
    0 none at all. Also a webdataset error handler (`handler=policy`): it returns True, i.e. "skip and go on".
    `take()` returns the damaged samples first met since its last call (the datamodule hands them on with each
    batch, so that the count crosses worker processes and ranks).
    """

    def __init__(self, budget: float = 0.01, total: int = 0, name: str = "data.max_bad_samples"):
        if budget < 0:
            raise ValueError(f"{name} must be >= 0 (a count, or a fraction < 1 of the samples), got {budget}")
        self.budget, self.total, self.name = budget, total, name
        self.allowed = budget if math.isinf(budget) else int(budget) if budget >= 1 or budget == 0 else \
            math.floor(budget * total)
        self.seen: dict[str, str] = {}  # each distinct damaged sample: its identity -> the first message naming it
        self._taken = 0
        self.keys: set[str] = set()  # keys of the skipped samples, where known (readers leave them out afterwards)

    @property
    def count(self) -> int:
        """Distinct damaged samples met in this process."""
        return len(self.seen)

    @property
    def records(self) -> list[str]:
        """"<shard>: sample <key>: <reason>" of each distinct damaged sample, in the order they were met."""
        return list(self.seen.values())

    def __call__(self, error: Exception) -> bool:
        self.skip(error)
        return True

    def skip(self, error: Exception, key: str | None = None) -> None:
        """Count `error` (a sample's, by its `key`, else by its message) unless that sample was met before."""
        if key is not None:
            self.keys.add(key)
        identity = key if key is not None else str(error)
        if identity in self.seen:
            return
        self.seen[identity] = str(error)
        warnings.warn(f"skipped ({self.count} distinct damaged sample{'s' if self.count > 1 else ''} so far in this "
                      f"process): {error}", DataWarning, stacklevel=2)
        self.check(self.count)

    def check(self, count: int) -> None:
        """Raise if `count` distinct bad samples (this process's, or a run's over processes) pass the budget."""
        if count > self.allowed:
            of = f" ({self.budget:g} of {self.total} samples)" if 0 < self.budget < 1 else ""
            raise TooManyBadSamples(
                f"{count} distinct damaged sample{'s' if count > 1 else ''}, more than {self.name}={self.allowed}{of} allows; the last: "
                f"{self.records[-1] if self.seen else '(met in other processes)'}. Run `letstalk check` on "
                f"the dataset, repair or re-prepare it, or raise {self.name}")

    def take(self) -> list[str]:
        """Identities of the damaged samples first met since the last call."""
        new = list(self.seen)[self._taken:]
        self._taken = self.count
        return new


def read_segments(paths: Iterable[str], faults: BadSamples, keep: Callable[[str], bool] | None = None,
                  members: Collection[str] | None = None, lazy: Collection[str] = ()) -> Iterator[Segment]:
    """Shards -> decoded Segments, under `faults`: each damaged shard or sample is skipped, named and counted.

    keep, members: see `read_samples`; without WAVEFORM among the members the Segment's `waveform_flac` is
    empty. With `keep`, damage outside every kept sample (what the index already found and counted, such as
    the rest of a truncated shard) is not counted again.
    """
    for path in paths:
        try:
            for sample in read_samples(path, members, keep, lazy):
                if members is not None and WAVEFORM not in members:
                    sample[WAVEFORM] = b""
                try:
                    yield decode(sample)
                except ShardFormatError as err:
                    faults.skip(err, err.key or sample.get("__key__"))
        except ShardFormatError as err:
            if keep is None or err.key is not None:
                faults.skip(err, err.key)


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


def log_path(manifest: Path) -> Path:
    """The change log beside a manifest: `manifest.json` -> `manifest.log.jsonl`."""
    return manifest.with_name(manifest.stem + ".log.jsonl")


@dataclass
class Manifest:
    """`manifest.json` at the dataset root: what training needs to know without scanning shards.

    `letstalk prepare` also writes one per task of an array job (`task-NNNN.json`, `task` set),
    rewritten after every finished shard (`complete` false until the task ends). Fields added
    after version 1 have defaults, so older manifests still load.
    """

    shards: list[dict[str, Any]] = field(default_factory=list)  # {path, samples, frames, bytes}
    # {id, path, sha1, type, scaling_factor, shift_factor, latent_channels, downsample}: the folder's name, absolute
    # path and `pipeline.locate.fingerprint` (older datasets: no sha1)
    vae: dict[str, Any] = field(default_factory=dict)
    # {name, id, path, sha1, layers, K, D, sample_rate}: path and sha1 as the VAE's, None for mel (older datasets: no
    # sha1, a path as given on the command line)
    audio_encoder: dict[str, Any] = field(default_factory=dict)
    fps: float = 25.0
    sample_rate: int = 16000
    size: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)  # {path, reason}
    version: int = MANIFEST_VERSION
    # done inputs {path, id, speaker, split, segments, frames}, path absolute (older datasets: as listed)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    partial: dict[str, list[int]] = field(default_factory=dict)  # input path -> segments in finished shards, not done
    settings: dict[str, Any] = field(default_factory=dict)  # prepare settings that must agree across tasks
    task: int | None = None  # task index, for a task manifest
    complete: bool = True
    logged: int = 0  # lines of the manifest's change log (`log_path`) already folded into this file

    @property
    def num_samples(self) -> int:
        return sum(int(s["samples"]) for s in self.shards)

    @property
    def num_frames(self) -> int:
        return sum(int(s["frames"]) for s in self.shards)

    def splits(self) -> dict[str, dict[str, Any]]:
        """Per split of the done inputs: sorted speakers, and counts of videos, segments and frames."""
        out: dict[str, dict[str, Any]] = {}
        for record in self.inputs:
            entry = out.setdefault(record["split"], {"speakers": set(), "videos": 0, "samples": 0, "frames": 0})
            entry["speakers"].add(record["speaker"])
            entry["videos"] += 1
            entry["samples"] += int(record["segments"])
            entry["frames"] += int(record["frames"])
        return {k: {**v, "speakers": sorted(v["speakers"])} for k, v in sorted(out.items())}

    def video_splits(self) -> dict[str, tuple[str, str]]:
        """Video id -> (speaker, split), as `prepare` recorded them for the done inputs."""
        return {str(r["id"]): (str(r["speaker"]), str(r["split"])) for r in self.inputs}

    def save(self, root: str | os.PathLike, name: str = MANIFEST) -> Path:
        """Write `root/name` atomically (temp file + rename); an unchanged file is left untouched."""
        path = Path(root) / name
        tmp = path.with_name(path.name + ".tmp")
        data = asdict(self)
        data["num_samples"], data["num_frames"], data["splits"] = self.num_samples, self.num_frames, self.splits()
        text = json.dumps(data, indent=2, sort_keys=True)
        if path.exists() and path.read_text() == text:
            return path
        tmp.write_text(text)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, root: str | os.PathLike) -> "Manifest":
        root = Path(root)
        path = root / MANIFEST if root.is_dir() else root
        if not path.exists():
            raise FileNotFoundError(f"{path}: no manifest; run `letstalk prepare` to create the dataset")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ShardFormatError(f"{path}: not valid JSON ({err})") from err
        if data.get("version") != MANIFEST_VERSION:
            raise ShardFormatError(f"{path}: manifest version {data.get('version')}, this code reads {MANIFEST_VERSION}")
        for key in ("latent_channels", "downsample", "scaling_factor"):
            if key not in data.get("vae", {}):
                raise ShardFormatError(f"{path}: vae.{key} missing")
        for key in ("K", "D"):
            if key not in data.get("audio_encoder", {}):
                raise ShardFormatError(f"{path}: audio_encoder.{key} missing")
        known = {f for f in cls.__dataclass_fields__}
        manifest = cls(**{k: v for k, v in data.items() if k in known})
        manifest._replay(log_path(path))
        return manifest

    def append(self, root: str | os.PathLike, name: str, change: dict[str, Any]) -> None:
        """Apply one change and append it to the manifest's log (`log_path`): a line per finished shard or input,
        not a rewrite of the whole manifest (which grows with the dataset) after each. Changes: {"shard": entry,
        "partial": {input: [segments]}}, {"done": input record}, {"failed": {path, reason}}."""
        self._apply(change)
        with open(log_path(Path(root) / name), "a", encoding="utf-8") as log:
            log.write(json.dumps(change) + "\n")
            log.flush()
            os.fsync(log.fileno())

    def fold(self, root: str | os.PathLike, name: str, keep_log: bool = True) -> Path:
        """Write the whole manifest (every logged change folded in); without `keep_log`, the log is removed."""
        log = log_path(Path(root) / name)
        self.logged = len(log.read_text(encoding="utf-8").splitlines()) if keep_log and log.is_file() else 0
        path = self.save(root, name)
        if not keep_log:
            log.unlink(missing_ok=True)
        return path

    def _replay(self, log: Path) -> None:
        if not log.is_file():
            return
        for line in log.read_text(encoding="utf-8").splitlines()[self.logged :]:
            try:
                change = json.loads(line)
            except json.JSONDecodeError:
                continue  # the torn last line of a killed run
            self._apply(change)

    def _apply(self, change: dict[str, Any]) -> None:
        if "shard" in change:
            self.shards.append(change["shard"])
            for path, segments in change.get("partial", {}).items():
                self.partial[path] = sorted(set(self.partial.get(path, [])) | set(segments))
        if "done" in change:
            self.partial.pop(change["done"]["path"], None)
            self.inputs.append(change["done"])
        if "failed" in change:
            self.failed.append(change["failed"])

    def shard_paths(self, root: str | os.PathLike) -> list[str]:
        base = Path(root) if Path(root).is_dir() else Path(root).parent
        return [str(base / s["path"]) for s in self.shards]


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

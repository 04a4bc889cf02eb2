"""The shard format: the one contract between `letstalk prepare` and training.

One WebDataset sample is one segment of one source video (DESIGN.md section 2):

    __key__       "<video id>/<segment index>"
    latents.npy   float16 [T, C, h, w]  VAE posterior mean, unscaled, one per frame
    audio.npy     float16 [T, K, D]     audio features, K vectors per video frame
    audio.flac    the segment's 16 kHz mono waveform
    json          fps, sample_rate, frames, face_box, source, encoder ids

Arrays are stored with ``numpy.save(allow_pickle=False)`` and read back the same
way, so nothing in a shard is ever unpickled. Writer, reader and tests all import
this module; nothing else knows the member names.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

LATENTS = "latents.npy"
AUDIO = "audio.npy"
WAVEFORM = "audio.flac"
META = "json"
MEMBERS = (LATENTS, AUDIO, WAVEFORM, META)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
SHARD_PATTERN = "shard-{index:06d}.tar"

_KEY_PART = re.compile(r"[^A-Za-z0-9_\-]")


class ShardFormatError(ValueError):
    """A sample or manifest that does not follow the shard format."""


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


def npy_load(data: bytes) -> np.ndarray:
    """Decode a `.npy` member; refuses object arrays (never unpickles)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


@dataclass
class Segment:
    """One decoded sample, as numpy arrays and its metadata."""

    key: str
    latents: np.ndarray  # float16 [T, C, h, w]
    audio: np.ndarray  # float16 [T, K, D]
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
        segment = cls(
            key=sample["__key__"],
            latents=npy_load(sample[LATENTS]),
            audio=npy_load(sample[AUDIO]),
            waveform_flac=bytes(sample[WAVEFORM]),
            meta=json.loads(sample[META]),
        )
        segment.validate(where)
        return segment


class AtomicShardWriter:
    """Writes numbered tar shards under a temporary name and renames each when complete.

    A killed job leaves at most a `*.tar.tmp`, never a `.tar` that looks whole.
    `shards` lists the finished ones as manifest entries.
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
        self._count = 0
        self._frames = 0

    @property
    def _final(self) -> Path:
        return self.out_dir / (self.prefix + SHARD_PATTERN.format(index=self.index))

    def write(self, segment: Segment) -> None:
        if self._tar is None:
            self._file = open(self._final.with_name(self._final.name + ".tmp"), "wb")
            self._tar = tarfile.open(fileobj=self._file, mode="w|")
        members = segment.to_wds()
        key = members.pop("__key__")
        for name, data in members.items():
            info = tarfile.TarInfo(f"{key}.{name}")
            info.size = len(data)
            info.mode = 0o444
            self._tar.addfile(info, io.BytesIO(data))
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
        self.shards.append(
            {"path": self._final.name, "samples": self._count, "frames": self._frames, "bytes": self._final.stat().st_size}
        )
        self._tar, self._file, self._count, self._frames = None, None, 0, 0
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


def iter_tar(path: str | os.PathLike) -> Iterator[Segment]:
    """Read a shard with the standard library only (used by tests and tools)."""
    groups: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    with tarfile.open(path, "r") as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            if key not in groups:
                groups[key] = {"__key__": key, "__url__": str(path)}
                order.append(key)
            groups[key][ext] = tar.extractfile(member).read()
    for key in order:
        yield Segment.from_wds(groups[key])


@dataclass
class Manifest:
    """`manifest.json` at the dataset root: what training needs to know without scanning shards.

    `letstalk prepare` also writes one per task of an array job (`task-NNNN.json`, `task` set),
    rewritten after every finished shard (`complete` false until the task ends). Fields added
    after version 1 have defaults, so older manifests still load.
    """

    shards: list[dict[str, Any]] = field(default_factory=list)  # {path, samples, frames, bytes}
    vae: dict[str, Any] = field(default_factory=dict)  # {id, scaling_factor, shift_factor, latent_channels, downsample}
    audio_encoder: dict[str, Any] = field(default_factory=dict)  # {id, K, D, sample_rate}
    fps: float = 25.0
    sample_rate: int = 16000
    size: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)  # {path, reason}
    version: int = MANIFEST_VERSION
    inputs: list[dict[str, Any]] = field(default_factory=list)  # done inputs {path, id, speaker, split, segments, frames}
    partial: dict[str, list[int]] = field(default_factory=dict)  # input path -> segments in finished shards, not done
    settings: dict[str, Any] = field(default_factory=dict)  # prepare settings that must agree across tasks
    task: int | None = None  # task index, for a task manifest
    complete: bool = True

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
        return cls(**{k: v for k, v in data.items() if k in known})

    def shard_paths(self, root: str | os.PathLike) -> list[str]:
        base = Path(root) if Path(root).is_dir() else Path(root).parent
        return [str(base / s["path"]) for s in self.shards]

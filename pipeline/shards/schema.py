"""The shard schema, which writer and reader both import: member names, sample keys, how arrays are encoded
(`.npy` without pickle) and `Segment`, one decoded sample with its checks."""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pipeline.shards.npy import NpyMember


LATENTS = "latents.npy"
AUDIO = "audio.npy"
WAVEFORM = "audio.flac"
META = "json"
MEMBERS = (LATENTS, AUDIO, WAVEFORM, META)
TRAINING_MEMBERS = (LATENTS, AUDIO, META)  # what clips are cut from: training never reads the waveform
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
    if not isinstance(data, (bytes, bytearray, memoryview)):  # an NpyMember, already parsed by its header
        return data
    return np.load(io.BytesIO(data), allow_pickle=False)


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

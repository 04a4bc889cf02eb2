"""The dataset manifest (`manifest.json`): encoders, frame rate, size, inputs, shards; splits by speaker."""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


from pipeline.shards.schema import ShardFormatError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


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

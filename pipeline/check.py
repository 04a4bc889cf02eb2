"""`letstalk check DATA`: verify a prepared dataset against its manifest and index before a launch.

A broken dataset should be found before 64 GPUs wait on it. Per shard (in parallel): the file exists, its
size (and, unless `fast`, its sha256) is the manifest's, the index lists it with that size. Unless `fast`,
every sample is read through `pipeline.shards` (nothing is unpickled): exactly the schema's members, arrays
of the schema's dtype and rank that decode, the manifest's latent channels and audio K x D, `json` frames
equal to the arrays', and a FLAC of exactly frames x sample_rate / fps samples. `fast` (sizes and the
index only, one `stat` per shard) is what training does at start (`index_dataset`).

The report: `ok`, `problems` [{shard, key, kind, detail}], a summary of samples, hours and speakers per
split, and segments shorter than `clip_frames`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline import media
from pipeline.shards import (INDEX, MANIFEST, MEMBERS, META, WAVEFORM, Manifest, ShardFormatError, decode,
                             read_samples)

def _problem(shard: str, key: str | None, kind: str, detail: str) -> dict[str, Any]:
    return {"shard": shard, "key": key, "kind": kind, "detail": detail}


def _check_sample(shard: str, sample: dict[str, Any], manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The problems of one raw sample (member name -> bytes)."""
    key = sample["__key__"]
    names = {name for name in sample if not name.startswith("__")}
    if missing := sorted(set(MEMBERS) - names):
        return [_problem(shard, key, "missing_member", f"lacks {missing}")]
    problems = [_problem(shard, key, "extra_member", f"has {name!r}, not in the schema {list(MEMBERS)}")
                for name in sorted(names - set(MEMBERS))]
    try:
        segment = decode({**sample, "__url__": shard})
    except ShardFormatError as err:
        return [*problems, _problem(shard, key, "bad_array", str(err))]
    channels, k, d = manifest["channels"], manifest["K"], manifest["D"]
    if segment.latents.shape[1] != channels or segment.audio.shape[1:] != (k, d):
        problems.append(_problem(shard, key, "channels_mismatch",
                                 f"latents {segment.latents.shape}, audio {segment.audio.shape}; the manifest says "
                                 f"{channels} latent channels and audio {k} x {d}"))
    frames = len(segment.latents)
    want = frames * manifest["sample_rate"] / manifest["fps"]
    try:
        waveform, rate = media.decode_flac(segment.waveform_flac, source=f"{key}.{WAVEFORM}")
        if rate != manifest["sample_rate"] or len(waveform) != want:
            problems.append(_problem(shard, key, "audio_misaligned", f"{len(waveform)} samples at {rate} Hz for "
                                     f"{frames} frames; {want:g} at {manifest['sample_rate']} Hz expected"))
    except (ValueError, OSError) as err:
        problems.append(_problem(shard, key, "audio_misaligned", f"undecodable FLAC ({err})"))
    return problems


def _check_shard(job: tuple[str, dict[str, Any], int | None, dict[str, Any], bool]) -> dict[str, Any]:
    """One shard: (path, manifest entry, the index's size for it or None, manifest facts, fast) -> its problems and
    the (key, frames) of its samples."""
    path, entry, indexed_bytes, manifest, fast = job
    name = entry["path"]
    if not os.path.isfile(path):
        return {"problems": [_problem(name, None, "missing_shard", f"{path} does not exist")], "samples": []}
    problems, size = [], os.stat(path).st_size
    if size != entry.get("bytes"):
        problems.append(_problem(name, None, "size_mismatch", f"{size} bytes, the manifest says {entry.get('bytes')}"))
    if indexed_bytes is not None and indexed_bytes != entry.get("bytes"):
        problems.append(_problem(name, None, "index_mismatch",
                                 f"{INDEX} says {indexed_bytes} bytes, the manifest {entry.get('bytes')}"))
    if fast:
        return {"problems": problems, "samples": []}
    if "sha256" in entry and not problems:
        with open(path, "rb") as file:
            digest = hashlib.file_digest(file, "sha256").hexdigest()
        if digest != entry["sha256"]:
            problems.append(_problem(name, None, "hash_mismatch", f"sha256 {digest[:16]}..., the manifest says "
                                     f"{entry['sha256'][:16]}... (same size: bytes changed in place)"))
    samples = []
    try:
        for sample in read_samples(path):
            problems += _check_sample(name, sample, manifest)
            if META in sample:
                try:
                    samples.append((sample["__key__"], int(json.loads(sample[META]).get("frames", 0))))
                except (ValueError, AttributeError):
                    pass  # reported by _check_sample
    except ShardFormatError as err:
        problems.append(_problem(name, err.key, "unreadable", str(err)))
    return {"problems": problems, "samples": samples}


def check_dataset(root: str | Path, clip_frames: int | None = None, fast: bool = False, workers: int | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Check the dataset at `root` (module doc); the report as a dict."""
    start = time.perf_counter()
    root = Path(root)
    if not (root / MANIFEST).is_file():
        raise FileNotFoundError(f"{root}: no {MANIFEST}; is this a dataset made by `letstalk prepare`?")
    manifest = Manifest.load(root)
    indexed: dict[str, int] = {}
    problems: list[dict[str, Any]] = []
    if (root / INDEX).is_file():
        with np.load(root / INDEX, allow_pickle=False) as index:
            indexed = dict(zip(index["shards"].tolist(), index["shard_bytes"].tolist()))
        listed = [s["path"] for s in manifest.shards]
        if sorted(indexed) != sorted(listed):
            problems.append(_problem(str(root / INDEX), None, "index_mismatch",
                                     f"lists {len(indexed)} shards, the manifest {len(listed)}"))
    facts = {"channels": int(manifest.vae["latent_channels"]), "K": int(manifest.audio_encoder["K"]),
             "D": int(manifest.audio_encoder["D"]), "sample_rate": int(manifest.sample_rate),
             "fps": float(manifest.fps)}
    jobs = [(path, entry, indexed.get(entry["path"]), facts, fast)
            for path, entry in zip(manifest.shard_paths(root), manifest.shards)]
    workers = workers or min(8, os.cpu_count() or 1)
    bar = tqdm(total=len(jobs), desc="check", unit="shard", disable=not progress)
    samples: list[tuple[str, int]] = []
    with ProcessPoolExecutor(workers) as pool:
        for result in pool.map(_check_shard, jobs, chunksize=max(1, len(jobs) // (8 * workers))):
            problems += result["problems"]
            samples += result["samples"]
            bar.update()
    bar.close()
    if fast:  # no sample was read: count what the manifest lists
        samples = [(r["id"], int(r["frames"])) for r in manifest.inputs]
    report = {"root": str(root), "ok": not problems, "fast": fast, "problems": problems,
              "summary": _summary(manifest, samples, fast), "seconds": round(time.perf_counter() - start, 2)}
    if clip_frames is not None and not fast:
        report["short_segments"] = sum(frames < clip_frames for _, frames in samples)
    return report


def _summary(manifest: Manifest, samples: list[tuple[str, int]], fast: bool) -> dict[str, dict[str, Any]]:
    """Samples (videos when `fast`), hours and distinct speakers per split; videos without a record: "unknown"."""
    splits = manifest.video_splits()
    out: dict[str, dict[str, Any]] = {}
    for key, frames in samples:
        speaker, split = splits.get(key.split("/", 1)[0], (None, "unknown"))
        entry = out.setdefault(split, {"samples": 0, "frames": 0, "speakers": set()})
        entry["samples"] += 1
        entry["frames"] += frames
        if speaker is not None:
            entry["speakers"].add(speaker)
    unit = "videos" if fast else "samples"
    return {split: {unit: v["samples"], "hours": round(v["frames"] / manifest.fps / 3600, 4),
                    "speakers": len(v["speakers"])} for split, v in sorted(out.items())}


def format_report(report: dict[str, Any], limit: int = 50) -> str:
    """The report as a short table and one line per problem (at most `limit`)."""
    verdict = "ok" if report["ok"] else f"{len(report['problems'])} problems"
    fast = " (fast: sizes and index only)" if report["fast"] else ""
    lines = [f"{report['root']}: {verdict}{fast}, {report['seconds']} s"]
    for split, entry in report["summary"].items():
        lines.append(f"  {split:>7}: " + ", ".join(f"{v} {k}" for k, v in entry.items()))
    if "short_segments" in report:
        lines.append(f"  segments shorter than --clip-frames (training skips them): {report['short_segments']}")
    for problem in report["problems"][:limit]:
        lines.append(f"  {problem['kind']}: {problem['shard']} {problem['key'] or ''}: {problem['detail']}")
    if len(report["problems"]) > limit:
        lines.append(f"  ... and {len(report['problems']) - limit} more")
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: str | Path) -> None:
    """The report as JSON at `path`, atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)

"""`letstalk check DATA`: verify a prepared dataset against its manifest and index before a launch.

A broken dataset should be found before a cluster waits on it. Per shard (in parallel): the file exists, its size
(and, unless `fast`, its sha256) is the manifest's, and the index lists it with that size. Unless `fast`, every
sample is read through `pipeline.shards` (nothing is unpickled): exactly the schema's members, `.npy` headers that
parse and match their members' sizes, arrays of the schema's dtype and rank, `json` frames equal to the arrays',
the manifest's latent channels and audio K x D, and a FLAC of exactly frames x sample_rate / fps samples. `fast`
(one `stat` per shard, no decoding, no hashing) is the check training can afford at start.

The report: `ok`, `problems` [{shard, key, kind, detail}], `summary` (samples, hours and speakers per split and in
total: of the sound samples; with `fast`, of those the index lists, else of the manifest's input records),
`warnings` (lines: a split no speaker went to, `pipeline.shards.split_warning`), `short_segments` (with
`clip_frames`: segments training skips; None where `fast` has no index to count them in) and `seconds`.
Warnings and short segments do not make the dataset fail (`ok` stays true, the command exits 0): the data is
sound and training can run on it; an empty validation split can be meant (evaluation on another dataset), so it
is said plainly but does not stop a launch script.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.media import decode_flac
from pipeline.shards import (AUDIO, INDEX, LATENTS, MANIFEST, MEMBERS, META, WAVEFORM, Manifest, ShardFormatError,
                             decode, read_samples, split_warning)

Problem = dict[str, Any]


def _problem(shard: str, key: str | None, kind: str, detail: str) -> Problem:
    return {"shard": shard, "key": key, "kind": kind, "detail": detail}


def _check_sample(shard: str, sample: dict[str, Any], facts: dict[str, Any]) -> tuple[list[Problem], int | None]:
    """One sample's problems (its first fault, and any extra members), and its frame count if it decodes.

    `sample` is read with lazy `.npy` members: their headers are parsed and checked against the members' sizes
    (an object array is refused there), their data left unread: the sha256 covers the bytes."""
    key = sample["__key__"]
    problems = [_problem(shard, key, "extra_member", f"{key}.{name} is not one of {list(MEMBERS)}")
                for name in sorted(set(sample) - set(MEMBERS)) if not name.startswith("__")]

    def fault(kind: str, detail: str) -> tuple[list[Problem], None]:
        return [*problems, _problem(shard, key, kind, detail)], None

    if "__error__" in sample:  # an .npy header that does not parse, an object array, data of the wrong size
        return fault("bad_array", sample["__error__"])
    if missing := [name for name in MEMBERS if name not in sample]:
        return fault("missing_member", f"lacks {missing}")
    try:
        meta = json.loads(sample[META])
    except ValueError as err:
        return fault("bad_array", f"{key}.{META}: not JSON ({err})")
    if not isinstance(meta, dict):
        return fault("bad_array", f"{key}.{META}: not a JSON object")
    latents = sample[LATENTS]
    if latents.ndim == 4 and meta.get("frames") != latents.shape[0]:  # other ranks: `decode` names them
        return fault("frames_mismatch", f"{key}.{META} says frames={meta.get('frames')}, {LATENTS} has "
                                        f"{latents.shape[0]}")
    try:
        segment = decode(sample)
    except ShardFormatError as err:
        return fault("bad_array", str(err))
    frames, channels, k, d = len(segment.latents), facts["channels"], facts["K"], facts["D"]
    if segment.latents.shape[1] != channels or segment.audio.shape[1:] != (k, d):
        return fault("channels_mismatch", f"{LATENTS} {segment.latents.shape}, {AUDIO} {segment.audio.shape}; the "
                                          f"manifest says {channels} latent channels and audio K x D = {k} x {d}")
    try:
        waveform, rate = decode_flac(segment.waveform_flac, source=f"{key}.{WAVEFORM}")
    except ValueError as err:
        return fault("bad_array", str(err))
    want = frames * facts["sample_rate"] / facts["fps"]
    if rate != facts["sample_rate"] or len(waveform) != want:
        return fault("audio_misaligned", f"{len(waveform)} samples at {rate} Hz for {frames} frames; "
                                         f"{want:g} at {facts['sample_rate']} Hz expected")
    return problems, frames


def _check_shard(job: tuple[str, dict[str, Any], dict[str, Any], bool]) -> dict[str, Any]:
    """One shard: (path, its manifest entry, manifest facts, fast) -> its problems and its samples' (key, frames)."""
    path, entry, facts, fast = job
    name, want = entry["path"], entry["bytes"]
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return {"problems": [_problem(name, None, "missing_shard", f"{path}: no such file")], "samples": []}
    problems = []
    if size != want:
        problems.append(_problem(name, None, "size_mismatch", f"{size} bytes, the manifest says {want}"))
    if fast:
        return {"problems": problems, "samples": []}
    samples = []
    try:
        if size == want and entry.get("sha256"):  # a size mismatch already says the bytes differ
            with open(path, "rb") as file:
                digest = hashlib.file_digest(file, "sha256").hexdigest()
            if digest != entry["sha256"]:
                problems.append(_problem(name, None, "hash_mismatch", f"sha256 {digest}, the manifest says "
                                                                      f"{entry['sha256']} (bytes changed in place)"))
        for sample in read_samples(path, lazy=(LATENTS, AUDIO)):
            found, frames = _check_sample(name, sample, facts)
            problems += found
            if frames is not None:
                samples.append((sample["__key__"], frames))
    except OSError as err:
        problems.append(_problem(name, None, "unreadable", f"{path}: {err}"))
    except ShardFormatError as err:  # the complete samples before the damage were checked
        problems.append(_problem(name, err.key, "truncated" if size < want else "unreadable", str(err)))
    return {"problems": problems, "samples": samples}


def _results(jobs: list[tuple], fast: bool, workers: int) -> Iterator[dict[str, Any]]:
    """`_check_shard` of each job, in order: in this process when `fast` (a `stat` each), else in `workers`."""
    if fast or len(jobs) < 2 or workers < 2:
        yield from map(_check_shard, jobs)
        return
    with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
        yield from pool.map(_check_shard, jobs)


def _read_index(root: Path, manifest: Manifest) -> tuple[list[Problem], list[tuple[str, int]] | None]:
    """Problems of `index.npz` against the manifest (it must list the same shards, in order, with the same sizes),
    and the samples' (key, frames) it lists when it is usable; no index: no problems, no samples."""
    if not (root / INDEX).is_file():
        return [], None
    try:
        with np.load(root / INDEX, allow_pickle=False) as index:
            shards, sizes, keys, frames = (index[c].tolist() for c in ("shards", "shard_bytes", "key", "frames"))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        return [_problem(INDEX, None, "index_mismatch", f"unreadable ({err})")], None
    listed = [s["path"] for s in manifest.shards]
    if shards != listed:
        return [_problem(INDEX, None, "index_mismatch", f"lists other shards than {MANIFEST} ({len(shards)}, it "
                                                        f"{len(listed)}): training would walk every shard")], None
    problems = [_problem(entry["path"], None, "index_mismatch", f"{INDEX} says {size} bytes, the manifest "
                                                                f"{entry['bytes']}")
                for entry, size in zip(manifest.shards, sizes) if size != entry["bytes"]]
    return problems, [(key.decode("ascii"), n) for key, n in zip(keys, frames)]


def check_dataset(root: str | os.PathLike, clip_frames: int | None = None, fast: bool = False,
                  workers: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Check the dataset at `root` (module doc) and return the report. FileNotFoundError: `root` has no manifest."""
    start = time.perf_counter()
    root = Path(root)
    if not (root / MANIFEST).is_file():
        raise FileNotFoundError(f"{root / MANIFEST}: no such file; DATA must be a folder made by `letstalk prepare`")
    manifest = Manifest.load(root)
    problems, indexed = _read_index(root, manifest)
    facts = {"channels": int(manifest.vae["latent_channels"]), "K": int(manifest.audio_encoder["K"]),
             "D": int(manifest.audio_encoder["D"]), "sample_rate": int(manifest.sample_rate),
             "fps": float(manifest.fps)}
    jobs = [(path, entry, facts, fast) for path, entry in zip(manifest.shard_paths(root), manifest.shards)]
    samples: list[tuple[str, int]] | None = []
    results = _results(jobs, fast, workers or min(8, os.cpu_count() or 1))
    for result in tqdm(results, total=len(jobs), desc="check", unit="shard", disable=None if progress else True):
        problems += result["problems"]
        samples += result["samples"]
    if fast:  # nothing was read: what the index lists, else the manifest's per-video counts
        samples = indexed
    summary = _summary(manifest, samples)
    warning = split_warning({name: summary[name]["speakers"] for name in ("train", "val")},
                            manifest.settings.get("val_percent"))
    report = {"root": str(root), "fast": fast, "ok": not problems, "problems": problems, "summary": summary,
              "warnings": [warning] if warning else []}
    if clip_frames is not None:
        report["short_segments"] = None if samples is None else sum(frames < clip_frames for _, frames in samples)
    report["seconds"] = time.perf_counter() - start
    return report


def _summary(manifest: Manifest, samples: list[tuple[str, int]] | None) -> dict[str, dict[str, Any]]:
    """Samples, hours and distinct speakers per split (a video without a manifest record: "unknown") and in total,
    from the samples' (key, frames); None: from the manifest's input records (per video: segments, frames)."""
    splits = manifest.video_splits()
    rows = ([(key.split("/", 1)[0], 1, frames) for key, frames in samples] if samples is not None else
            [(str(r["id"]), int(r["segments"]), int(r["frames"])) for r in manifest.inputs])
    totals = {name: {"samples": 0, "frames": 0, "speakers": set()} for name in ("train", "val")}
    for video, count, frames in rows:
        speaker, split = splits.get(video, (None, "unknown"))
        entry = totals.setdefault(split, {"samples": 0, "frames": 0, "speakers": set()})
        entry["samples"] += count
        entry["frames"] += frames
        entry["speakers"] |= {speaker} - {None}
    totals["total"] = {"samples": sum(e["samples"] for e in totals.values()),
                       "frames": sum(e["frames"] for e in totals.values()),
                       "speakers": set().union(*(e["speakers"] for e in totals.values()))}
    return {name: {"samples": e["samples"], "hours": e["frames"] / manifest.fps / 3600, "speakers": len(e["speakers"])}
            for name, e in totals.items()}


def format_report(report: dict[str, Any], limit: int = 50) -> str:
    """The report for a terminal: a table per split, the warnings, then one line per problem (at most `limit`)."""
    verdict = "ok" if report["ok"] else f"{len(report['problems'])} problems"
    warnings = len(report.get("warnings", []))
    verdict += f", {warnings} warning{'s' if warnings > 1 else ''}" if warnings else ""
    mode = " (fast: sizes and the index only)" if report["fast"] else ""
    lines = [f"{report['root']}: {verdict}{mode} in {report['seconds']:.1f} s",
             f"  {'split':<8} {'samples':>9} {'hours':>9} {'speakers':>9}"]
    lines += [f"  {name:<8} {row['samples']:>9} {row['hours']:>9.2f} {row['speakers']:>9}"
              for name, row in report["summary"].items()]
    if report.get("short_segments") is not None:
        lines.append(f"  segments shorter than --clip-frames (training skips them): {report['short_segments']}")
    lines += [f"  {warning}" for warning in report.get("warnings", [])]
    lines += [f"  {p['shard']}  {p['key'] or '-'}  {p['kind']}  {p['detail']}" for p in report["problems"][:limit]]
    if len(report["problems"]) > limit:
        lines.append(f"  ... and {len(report['problems']) - limit} more")
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: str | os.PathLike) -> None:
    """The report as JSON at `path`, atomically (a temp file, then a rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)

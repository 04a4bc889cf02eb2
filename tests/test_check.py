"""`letstalk check`: a good dataset passes with its summary; each kind of damage is found and named (shard, key,
kind) and only that; `--fast` looks at sizes and the index only. ~15 s on 2 CPU cores."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import pipeline.check
from pipeline.check import check_dataset, format_report
from pipeline.cli import main
from pipeline.shards import INDEX, LATENTS, MEMBERS, META, WAVEFORM, Manifest, npy_bytes, write_index
from test_training import FRAMES, write_shards

SHARD, KEY = "shard-000001.tar", "v5/0000"  # the sample each test damages
SPEAKERS = {"v0": ("s0", "train"), "v1": ("s0", "train"), "v2": ("s1", "train"), "v3": ("s1", "train"),
            "v4": ("s2", "train"), "v5": ("s2", "train"), "v6": ("s3", "val")}  # v7 has no record: "unknown"

Change = Callable[[str, bytes], list[tuple[str, bytes]]]  # a member (name, data) -> the members to write instead


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_shards(tmp_path_factory.mktemp("check") / "good")
    manifest = Manifest.load(root)
    manifest.inputs = [{"path": f"{video}.mp4", "id": video, "speaker": speaker, "split": split, "segments": 2,
                        "frames": 2 * FRAMES} for video, (speaker, split) in SPEAKERS.items()]
    manifest.save(root)
    write_index(root, manifest)
    return root


def _copy(good: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(good, tmp_path / "data"))


def _kinds(report: dict) -> list[tuple[str, str, str | None]]:
    return [(p["kind"], p["shard"], p["key"]) for p in report["problems"]]


def _member(root: Path, key: str, member: str) -> tuple[int, int]:
    """(offset, size) of a member's data in its shard, from the index."""
    with np.load(root / INDEX, allow_pickle=False) as index:
        row = index["key"].tolist().index(key.encode())
        return int(index["offsets"][row, MEMBERS.index(member)]), int(index["sizes"][row, MEMBERS.index(member)])


def _flip(root: Path, offset: int) -> None:
    data = bytearray((root / SHARD).read_bytes())
    data[offset] ^= 0xFF
    (root / SHARD).write_bytes(bytes(data))


def _record(root: Path) -> None:
    """Give the manifest SHARD's present size and sha256, so that only the damage done to its contents is left."""
    manifest = Manifest.load(root)
    entry = next(s for s in manifest.shards if s["path"] == SHARD)
    data = (root / SHARD).read_bytes()
    entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    manifest.save(root)


def _rewrite(root: Path, change: Change) -> None:
    """Rewrite SHARD with `change` applied to each member, record it in the manifest and drop the (stale) index."""
    with tarfile.open(root / SHARD) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(root / SHARD, "w") as tar:
        for name, data in members:
            for new_name, new_data in change(name, data):
                info = tarfile.TarInfo(new_name)
                info.size = len(new_data)
                tar.addfile(info, io.BytesIO(new_data))
    _record(root)
    (root / INDEX).unlink()


def _replace(member: str, data: bytes) -> Change:
    return lambda name, old: [(name, data if name == f"{KEY}.{member}" else old)]


def _flac(samples: int) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(samples, np.float32), 16000, format="FLAC")
    return buffer.getvalue()


class _Payload:
    """Unpickling this creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _object_npy(marker: Path) -> bytes:
    array = np.empty((FRAMES, 4, 8, 8), dtype=object)
    array.flat[0] = _Payload(marker)
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def test_a_good_dataset_passes_with_its_summary(good: Path, tmp_path: Path, capsys):
    out = tmp_path / "report.json"
    assert main(["check", str(good), "--no-progress", "--json", str(out)]) == 0
    assert "ok" in capsys.readouterr().out
    written, report = json.loads(out.read_text()), check_dataset(good, progress=False)
    assert written == {**report, "seconds": written["seconds"]}
    assert report["ok"] and report["problems"] == [] and report["warnings"] == []
    hours = lambda videos: videos * 2 * FRAMES / 25 / 3600  # noqa: E731
    assert report["summary"] == {"train": {"samples": 12, "hours": hours(6), "speakers": 3},
                                 "val": {"samples": 2, "hours": hours(1), "speakers": 1},
                                 "unknown": {"samples": 2, "hours": hours(1), "speakers": 0},
                                 "total": {"samples": 16, "hours": hours(8), "speakers": 4}}
    fast = check_dataset(good, fast=True, progress=False)
    assert fast["ok"] and fast["summary"] == report["summary"]


def test_a_split_no_speaker_went_to_is_a_warning_not_a_failure(good: Path, tmp_path: Path, capsys):
    """All speakers in train (or all in val): said in the printed report and the JSON, and the check still passes
    (exit 0): the data is sound, and a dataset for training only can be meant."""
    expected = {
        "val": "warning: the validation split is empty (4 speakers, all in train at --val-percent 10); give some "
               "speakers split=val in the list, or raise --val-percent",
        "train": "warning: the training split is empty (4 speakers, all in val at --val-percent 10); give some "
                 "speakers split=train in the list, or lower --val-percent",
    }
    for empty, kept in (("val", "train"), ("train", "val")):
        root = _copy(good, tmp_path / empty)
        manifest = Manifest.load(root)
        manifest.inputs = [{**record, "split": kept} for record in manifest.inputs]
        manifest.settings["val_percent"] = 10.0
        manifest.save(root)
        write_index(root, manifest)
        out = tmp_path / empty / "report.json"
        assert main(["check", str(root), "--no-progress", "--json", str(out)]) == 0
        printed = capsys.readouterr().out.splitlines()
        report = json.loads(out.read_text())
        assert report["ok"] and report["problems"] == [] and report["warnings"] == [expected[empty]]
        assert printed[0].startswith(f"{root}: ok, 1 warning in ") and f"  {expected[empty]}" in printed
        assert report["summary"][empty]["speakers"] == 0 and report["summary"][kept]["speakers"] == 4
        assert check_dataset(root, fast=True, progress=False)["warnings"] == [expected[empty]]


@pytest.mark.parametrize("change, kind", [
    (lambda name, data: [] if name == f"{KEY}.audio.npy" else [(name, data)], "missing_member"),
    (lambda name, data: [(name, data), *([(f"{KEY}.extra.txt", b"hi")] if name == f"{KEY}.{META}" else [])],
     "extra_member"),
    (_replace(LATENTS, npy_bytes(np.zeros((FRAMES, 4, 8), np.float16))), "bad_array"),  # 3-D
    (_replace(LATENTS, npy_bytes(np.zeros((FRAMES, 4, 8, 8), np.float32))), "bad_array"),  # float32
    (_replace(META, json.dumps({"frames": FRAMES + 1, "fps": 25.0}).encode()), "frames_mismatch"),
    (_replace(LATENTS, npy_bytes(np.zeros((FRAMES, 3, 8, 8), np.float16))), "channels_mismatch"),
    (_replace(WAVEFORM, _flac(640 * FRAMES - 1)), "audio_misaligned"),
], ids=["missing_member", "extra_member", "3-D", "float32", "frames_mismatch", "channels_mismatch", "audio"])
def test_each_kind_of_damage_is_named(good: Path, tmp_path: Path, change: Change, kind: str):
    root = _copy(good, tmp_path)
    _rewrite(root, change)
    report = check_dataset(root, progress=False)
    assert _kinds(report) == [(kind, SHARD, KEY)], report["problems"]
    assert main(["check", str(root), "--no-progress"]) == 1


def test_a_flipped_byte_in_a_header_is_a_bad_array(good: Path, tmp_path: Path):
    root = _copy(good, tmp_path)
    _flip(root, _member(root, KEY, LATENTS)[0])  # the first byte of the .npy magic
    _record(root)
    assert _kinds(check_dataset(root, progress=False)) == [("bad_array", SHARD, KEY)]


def test_an_object_array_is_refused_never_unpickled(good: Path, tmp_path: Path):
    root, marker, control = _copy(good, tmp_path), tmp_path / "unpickled", tmp_path / "control"
    np.load(io.BytesIO(_object_npy(control)), allow_pickle=True)  # what unpickling would do
    assert control.exists()
    _rewrite(root, _replace(LATENTS, _object_npy(marker)))
    report = check_dataset(root, progress=False)
    assert _kinds(report) == [("bad_array", SHARD, KEY)] and "object array" in report["problems"][0]["detail"]
    assert not marker.exists()


def test_a_truncated_shard_is_named_at_its_sample_and_fast_finds_it_by_size(good: Path, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch):
    root = _copy(good, tmp_path)
    data = (root / SHARD).read_bytes()
    cut = len(data) // 2
    (root / SHARD).write_bytes(data[:cut])
    with np.load(root / INDEX, allow_pickle=False) as index:  # the sample whose members the cut falls in
        ends = (index["offsets"] + index["sizes"]).max(axis=1)[index["shard"] == 1]
        cut_key = index["key"][index["shard"] == 1][np.argmax(ends > cut)].decode()
    expected = [("size_mismatch", SHARD, None), ("truncated", SHARD, cut_key)]
    assert _kinds(check_dataset(root, progress=False)) == expected
    monkeypatch.setattr(pipeline.check, "read_samples", None)  # --fast reads no shard
    assert _kinds(check_dataset(root, fast=True, progress=False)) == [("size_mismatch", SHARD, None)]
    assert main(["check", str(root), "--fast", "--no-progress"]) == 1


def test_a_missing_shard_and_an_index_that_disagrees(good: Path, tmp_path: Path):
    root = _copy(good, tmp_path)
    (root / "shard-000000.tar").unlink()
    with np.load(root / INDEX, allow_pickle=False) as index:
        columns = dict(index)
    np.savez(root / INDEX, **{**columns, "shard_bytes": columns["shard_bytes"] + [0, 1]})
    expected = [("index_mismatch", SHARD, None), ("missing_shard", "shard-000000.tar", None)]
    assert _kinds(check_dataset(root, progress=False)) == _kinds(check_dataset(root, fast=True, progress=False)) \
        == expected
    np.savez(root / INDEX, **{**columns, "shards": columns["shards"][::-1]})
    assert _kinds(check_dataset(root, fast=True, progress=False))[0] == ("index_mismatch", INDEX, None)


def test_a_changed_byte_is_a_hash_mismatch_that_fast_does_not_read(good: Path, tmp_path: Path):
    """A byte flipped inside a latent value keeps every size and header right: only the hash tells."""
    root = _copy(good, tmp_path)
    offset, size = _member(root, KEY, LATENTS)
    _flip(root, offset + size - 10)
    assert _kinds(check_dataset(root, progress=False)) == [("hash_mismatch", SHARD, None)]
    assert check_dataset(root, fast=True, progress=False)["ok"]


def test_a_grown_shard_is_a_size_mismatch_in_both_modes(good: Path, tmp_path: Path):
    root = _copy(good, tmp_path)
    with open(root / SHARD, "ab") as file:
        file.write(bytes(1024))  # more zero blocks after the end of the archive: the tar still reads whole
    for fast in (False, True):
        assert _kinds(check_dataset(root, fast=fast, progress=False)) == [("size_mismatch", SHARD, None)]


def test_short_segments_are_counted_not_failed(good: Path):
    for fast in (False, True):
        report = check_dataset(good, clip_frames=FRAMES + 1, fast=fast, progress=False)
        assert report["ok"] and report["short_segments"] == 16
        assert check_dataset(good, clip_frames=FRAMES, fast=fast, progress=False)["short_segments"] == 0


def test_no_manifest_is_a_usage_error_naming_the_path(tmp_path: Path, capsys):
    assert main(["check", str(tmp_path), "--no-progress"]) == 2
    assert f"{tmp_path / 'manifest.json'}: no such file" in capsys.readouterr().err


def test_the_printed_problems_stop_at_50():
    problem = {"shard": SHARD, "key": KEY, "kind": "bad_array", "detail": "..."}
    report = {"root": "data", "fast": False, "ok": False, "problems": [problem] * 60, "summary": {}, "seconds": 1.0}
    lines = format_report(report).splitlines()
    assert sum(f"{SHARD}  {KEY}  bad_array" in line for line in lines) == 50 and lines[-1] == "  ... and 10 more"

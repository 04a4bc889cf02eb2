"""`letstalk check`: each kind of damage is found and named (shard, key, kind), a good dataset passes, and `--fast`
looks at sizes and the index only. ~15 s on 2 CPU cores."""

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

from pipeline.check import check_dataset
from pipeline.cli import main
from pipeline.shards import INDEX, LATENTS, MEMBERS, Manifest, npy_bytes, write_index
from test_training import FRAMES, write_shards

SHARD, KEY = "shard-000001.tar", "v5/0000"  # the sample each test damages


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_shards(tmp_path_factory.mktemp("check") / "good")
    write_index(root, Manifest.load(root))
    return root


def _copy(good: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(good, tmp_path / "data"))


def _rewrite(root: Path, change: Callable[[str, bytes], list[tuple[str, bytes]]]) -> None:
    """Rewrite SHARD with `change(name, data)` -> the members to write instead; then record the new size and hash in
    the manifest and drop the index, so that only the damage `change` made is left to find."""
    path = root / SHARD
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            for new_name, new_data in change(name, data):
                info = tarfile.TarInfo(new_name)
                info.size = len(new_data)
                tar.addfile(info, io.BytesIO(new_data))
    manifest = Manifest.load(root)
    entry = next(s for s in manifest.shards if s["path"] == SHARD)
    entry["bytes"], entry["sha256"] = path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()
    manifest.save(root)
    (root / INDEX).unlink()


def _replace_latents(array: np.ndarray) -> Callable[[str, bytes], list[tuple[str, bytes]]]:
    def change(name: str, data: bytes) -> list[tuple[str, bytes]]:
        return [(name, npy_bytes(array) if name == f"{KEY}.{LATENTS}" else data)]
    return change


class _Payload:
    """Unpickling this would create `marker`: it must never happen."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _object_array(marker: Path) -> Callable[[str, bytes], list[tuple[str, bytes]]]:
    def change(name: str, data: bytes) -> list[tuple[str, bytes]]:
        if name != f"{KEY}.{LATENTS}":
            return [(name, data)]
        poison = np.empty((FRAMES, 4, 8, 8), dtype=object)
        poison.flat[0] = _Payload(marker)
        buffer = io.BytesIO()
        np.save(buffer, poison, allow_pickle=True)
        return [(name, buffer.getvalue())]
    return change


def _kinds(report: dict) -> list[tuple[str, str | None, str]]:
    return [(p["kind"], p["shard"], p["key"]) for p in report["problems"]]


def test_a_good_dataset_passes_with_its_summary(good: Path, tmp_path: Path, capsys):
    out = tmp_path / "report.json"
    assert main(["check", str(good), "--no-progress", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["ok"] and report["problems"] == []
    assert report["summary"] == {"unknown": {"samples": 16, "hours": round(16 * FRAMES / 25 / 3600, 4), "speakers": 0}}
    assert "ok" in capsys.readouterr().out
    fast = check_dataset(good, fast=True, progress=False)
    assert fast["ok"] and fast["fast"]


@pytest.mark.parametrize("damage, kind", [
    (lambda name, data: [] if name == f"{KEY}.audio.npy" else [(name, data)], "missing_member"),
    (lambda name, data: [(name, data)] + ([(f"{KEY}.extra.txt", b"hi")] if name == f"{KEY}.json" else []),
     "extra_member"),
    (_replace_latents(np.zeros((FRAMES, 4, 8), np.float16)), "bad_array"),  # wrong rank
    (_replace_latents(np.zeros((FRAMES, 4, 8, 8), np.float32)), "bad_array"),  # wrong dtype
    (lambda name, data: [(name, (b"\x00" + data[1:]) if name == f"{KEY}.{LATENTS}" else data)], "bad_array"),  # magic
    (lambda name, data: [(name, data[:10] + bytes([data[10] ^ 0xFF]) + data[11:] if name == f"{KEY}.{LATENTS}"
                          else data)], "bad_array"),  # a flipped byte in the header's dict: numpy's tokenizer fails
    (_replace_latents(np.zeros((FRAMES, 3, 8, 8), np.float16)), "channels_mismatch"),
    (lambda name, data: [(name, data[: len(data) // 2] if name == f"{KEY}.audio.flac" else data)],
     "audio_misaligned"),
])
def test_each_kind_of_damage_is_named(good: Path, tmp_path: Path, damage, kind: str):
    root = _copy(good, tmp_path)
    _rewrite(root, damage)
    report = check_dataset(root, progress=False)
    assert not report["ok"] and _kinds(report) == [(kind, SHARD, KEY)], report["problems"]
    assert main(["check", str(root), "--no-progress"]) == 1


def test_an_object_array_is_refused_never_unpickled(good: Path, tmp_path: Path):
    root, marker = _copy(good, tmp_path), tmp_path / "unpickled"
    _rewrite(root, _object_array(marker))
    report = check_dataset(root, progress=False)
    assert _kinds(report) == [("bad_array", SHARD, KEY)] and "object array" in report["problems"][0]["detail"].lower()
    assert not marker.exists()


def test_a_truncated_shard_is_found_by_size_and_by_reading(good: Path, tmp_path: Path):
    root = _copy(good, tmp_path)
    data = (root / SHARD).read_bytes()
    (root / SHARD).write_bytes(data[: len(data) // 2])
    fast = check_dataset(root, fast=True, progress=False)
    assert _kinds(fast) == [("size_mismatch", SHARD, None)]
    full = check_dataset(root, progress=False)
    kinds = {kind for kind, _, _ in _kinds(full)}
    assert kinds >= {"size_mismatch"} and kinds & {"unreadable", "missing_member", "bad_array"}
    assert all(shard == SHARD for _, shard, _ in _kinds(full))


def test_a_flipped_byte_is_a_hash_mismatch_that_fast_does_not_read(good: Path, tmp_path: Path):
    """A byte flipped inside a latent value keeps every size and header right: only the hash tells."""
    root = _copy(good, tmp_path)
    with np.load(root / INDEX, allow_pickle=False) as index:
        row = [k.decode() for k in index["key"]].index(KEY)
        column = MEMBERS.index(LATENTS)
        end = int(index["offsets"][row][column] + index["sizes"][row][column])  # the member's last byte + 1
    data = bytearray((root / SHARD).read_bytes())
    data[end - 10] ^= 0xFF  # inside the last latent values
    (root / SHARD).write_bytes(bytes(data))
    assert _kinds(check_dataset(root, progress=False)) == [("hash_mismatch", SHARD, None)]
    assert check_dataset(root, fast=True, progress=False)["ok"]


def test_short_segments_are_counted_not_failed(good: Path):
    report = check_dataset(good, clip_frames=FRAMES + 1, progress=False)
    assert report["ok"] and report["short_segments"] == 16
    assert check_dataset(good, clip_frames=FRAMES, progress=False)["short_segments"] == 0


def test_no_manifest_is_a_clear_error(tmp_path: Path, capsys):
    assert main(["check", str(tmp_path), "--no-progress"]) == 1
    assert f"{tmp_path}: no manifest.json" in capsys.readouterr().err

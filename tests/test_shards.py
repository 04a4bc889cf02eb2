"""The shard format: exact round trips, readable by plain webdataset and by `tar`, atomic writes, no pickle."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds

from pipeline.shards import (INDEX, LATENTS, MEMBERS, WAVEFORM, AtomicShardWriter, BadSamples, DataWarning, Manifest,
                             Segment, ShardFormatError, index_dataset, index_shards, iter_tar, npy_bytes, npy_load, read_segments,
                             sample_key, video_id, write_index)


def _segment(rng: np.random.Generator, key: str, frames: int = 7) -> Segment:
    flac = io.BytesIO()
    sf.write(flac, rng.uniform(-0.5, 0.5, 640 * frames).astype(np.float32), 16000, format="FLAC")
    return Segment(key, rng.normal(size=(frames, 4, 8, 8)).astype(np.float16),
                   rng.normal(size=(frames, 2, 6)).astype(np.float16), flac.getvalue(),
                   {"frames": frames, "fps": 25.0, "source": f"{key}.mp4"})


@pytest.fixture()
def written(tmp_path: Path) -> tuple[Path, list[Segment], AtomicShardWriter]:
    rng = np.random.default_rng(0)
    segments = [_segment(rng, sample_key(f"video_{v}", s), frames=5 + v) for v in range(3) for s in range(2)]
    with AtomicShardWriter(tmp_path, max_samples=4) as writer:
        for segment in segments:
            writer.write(segment)
    return tmp_path, segments, writer


def _same(a: Segment, b: Segment) -> bool:
    return (a.key == b.key and a.meta == b.meta and a.waveform_flac == b.waveform_flac
            and np.array_equal(a.latents, b.latents) and a.latents.dtype == b.latents.dtype
            and np.array_equal(a.audio, b.audio) and a.audio.dtype == b.audio.dtype)


def test_write_read_round_trip_is_exact(written):
    root, segments, writer = written
    assert [s["path"] for s in writer.shards] == ["shard-000000.tar", "shard-000001.tar"]
    assert [s["samples"] for s in writer.shards] == [4, 2]
    assert sum(s["frames"] for s in writer.shards) == sum(len(s.latents) for s in segments)
    read = [seg for shard in writer.shards for seg in iter_tar(root / shard["path"])]
    assert len(read) == len(segments) and all(_same(a, b) for a, b in zip(read, segments))
    assert not list(root.glob("*.tmp"))


def test_plain_webdataset_reads_the_members_as_bytes(written):
    root, segments, writer = written
    urls = [str(root / s["path"]) for s in writer.shards]
    samples = list(wds.WebDataset(urls, shardshuffle=False))  # no decoders: raw bytes only
    assert [s["__key__"] for s in samples] == [s.key for s in segments]
    assert {k for k in samples[0] if not k.startswith("__")} == {"latents.npy", "audio.npy", "audio.flac", "json"}
    for raw, segment in zip(samples, segments):
        assert np.array_equal(npy_load(raw["latents.npy"]), segment.latents)
        assert json.loads(raw["json"]) == segment.meta
        assert _same(Segment.from_wds(raw), segment)


def test_tar_lists_and_extracts_the_same_bytes(written, tmp_path: Path):
    root, segments, writer = written
    shard = root / writer.shards[0]["path"]
    names = subprocess.run(["tar", "-tf", str(shard)], check=True, capture_output=True, text=True).stdout.split()
    assert names[:4] == [f"{segments[0].key}.{m}" for m in ("latents.npy", "audio.npy", "audio.flac", "json")]
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["tar", "-xf", str(shard), "-C", str(out)], check=True)
    extracted = (out / f"{segments[0].key}.audio.npy").read_bytes()
    assert np.array_equal(np.load(io.BytesIO(extracted), allow_pickle=False), segments[0].audio)
    assert (out / f"{segments[0].key}.audio.flac").read_bytes() == segments[0].waveform_flac


def test_a_failed_write_leaves_no_shard_and_keeps_finished_ones(tmp_path: Path):
    rng = np.random.default_rng(1)
    with pytest.raises(RuntimeError, match="killed"):
        with AtomicShardWriter(tmp_path, max_samples=2) as writer:
            for i in range(3):
                writer.write(_segment(rng, sample_key("v", i)))
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.jsonl", "shard-000000.tar"]  # the finished one only
    assert len(list(iter_tar(tmp_path / "shard-000000.tar"))) == 2
    assert [json.loads(line)["path"] for line in (tmp_path / "index.jsonl").read_text().splitlines()] == [
        "shard-000000.tar"]  # logged once finished, not before


def test_manifest_round_trip_and_clear_errors(tmp_path: Path, written):
    root, _, writer = written
    manifest = Manifest(shards=writer.shards, size=32, failed=[{"path": "bad.mp4", "reason": "no audio stream"}],
                        vae={"id": "v", "scaling_factor": 0.5, "shift_factor": 0.0, "latent_channels": 4, "downsample": 4},
                        audio_encoder={"id": "mel-6", "K": 2, "D": 6, "sample_rate": 16000})
    manifest.save(root)
    loaded = Manifest.load(root)
    assert loaded == manifest and loaded.num_samples == 6
    assert loaded.shard_paths(root) == [str(root / s["path"]) for s in writer.shards]
    saved = json.loads((root / "manifest.json").read_text())
    assert saved["num_frames"] == manifest.num_frames
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{not json")
    with pytest.raises(ShardFormatError, match="broken/manifest.json: not valid JSON"):
        Manifest.load(tmp_path / "broken")
    with pytest.raises(FileNotFoundError, match="run `letstalk prepare`"):
        Manifest.load(tmp_path / "nothing_here")


def test_nothing_is_unpickled_and_bad_samples_are_named():
    with pytest.raises(ValueError, match="allow_pickle"):
        npy_load(npy_bytes(np.array([1, 2])).replace(b"<i8", b"|O8"))
    rng = np.random.default_rng(2)
    good = _segment(rng, "v/0000").to_wds()
    with pytest.raises(ShardFormatError, match="lacks"):
        Segment.from_wds({k: v for k, v in good.items() if k != "audio.npy"})
    short = _segment(rng, "v/0001")
    short.audio = short.audio[:-1]
    with pytest.raises(ShardFormatError, match="v/0001: 7 latent frames but 6 audio frames"):
        short.to_wds()
    wrong = _segment(rng, "v/0002")
    wrong.latents = wrong.latents.astype(np.float32)
    with pytest.raises(ShardFormatError, match="latents must be float16"):
        wrong.validate()


def test_keys_are_webdataset_safe():
    assert video_id("/data/Some clip.v2.mp4") == "Some_clip_v2"
    assert sample_key("abc", 7) == "abc/0007"


def test_the_writer_hashes_sizes_and_indexes_each_shard_while_writing(written):
    """sha256 and size as `hashlib`/`stat` find them in the files; each index row's offsets hold the member's bytes."""
    root, segments, writer = written
    for shard in writer.shards:
        data = (root / shard["path"]).read_bytes()
        assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()
    manifest = Manifest(shards=writer.shards, vae={"latent_channels": 4, "downsample": 8, "scaling_factor": 1.0},
                        audio_encoder={"K": 2, "D": 6},
                        inputs=[{"id": "video_1", "speaker": "ann", "split": "val", "segments": 2, "frames": 12}])
    manifest.save(root)
    write_index(root, manifest)
    with np.load(root / INDEX, allow_pickle=False) as index:
        columns = {name: index[name] for name in index.files}
    assert [k.decode() for k in columns["key"]] == [s.key for s in segments]
    assert columns["frames"].tolist() == [len(s.latents) for s in segments]
    by_name = {s["path"]: (root / s["path"]).read_bytes() for s in writer.shards}
    for i, segment in enumerate(segments):
        data = by_name[str(columns["shards"][columns["shard"][i]])]
        offset, size = columns["offsets"][i], columns["sizes"][i]
        member = lambda m: data[offset[m]: offset[m] + size[m]]  # noqa: E731  (m: the member's place in MEMBERS)
        assert np.array_equal(npy_load(member(MEMBERS.index(LATENTS))), segment.latents)
        assert member(MEMBERS.index(WAVEFORM)) == segment.waveform_flac
    assert columns["speakers"].tolist() == ["ann"]
    assert columns["speaker"].tolist() == [-1, -1, 0, 0, -1, -1] and columns["split"].tolist() == [-1, -1, 1, 1, -1, -1]


def test_the_index_lists_what_walking_the_shards_finds_and_sees_a_shard_cut_short(written):
    root, segments, writer = written
    manifest = Manifest(shards=writer.shards, vae={"latent_channels": 4, "downsample": 8, "scaling_factor": 1.0},
                        audio_encoder={"K": 2, "D": 6})
    write_index(root, manifest)
    paths = manifest.shard_paths(root)
    assert index_dataset(root, manifest) == index_shards(paths) and len(index_shards(paths)) == 6
    shard = root / writer.shards[0]["path"]
    shard.write_bytes(shard.read_bytes()[:5000])
    faults = BadSamples(budget=10)
    with pytest.warns(DataWarning, match="shard-000000.tar"):
        found = index_dataset(root, manifest, faults)
    assert found == index_shards(paths) and 2 <= len(found) < 6 and faults.count >= 1
    (root / INDEX).unlink()  # no index: the same samples by walking
    assert index_dataset(root, manifest) == found


def test_a_flipped_byte_in_an_npy_header_costs_that_sample_only(written):
    """numpy parses the header's dict text with Python's tokenizer, which raises its own errors (TokenError,
    SyntaxError): they must name the sample like any other damage, in the index and in reading."""
    root, segments, writer = written
    path = root / writer.shards[0]["path"]
    with tarfile.open(path) as tar:
        member = tar.getmember(f"{segments[0].key}.{LATENTS}")
    data = bytearray(path.read_bytes())
    data[member.offset_data + 10] ^= 0xFF  # the header dict's opening brace
    path.write_bytes(bytes(data))
    faults = BadSamples(budget=10)
    with pytest.warns(DataWarning, match=f"{segments[0].key}.latents.npy: unreadable .npy header"):
        found = index_shards([str(path)], faults)
    assert [s.key for s in found] == [s.key for s in segments[1:4]] and faults.count == 1
    read = BadSamples(budget=10)
    with pytest.warns(DataWarning, match=segments[0].key):
        kept = list(read_segments([str(path)], read, lazy=(LATENTS,)))
    assert [s.key for s in kept] == [s.key for s in segments[1:4]] and read.count == 1

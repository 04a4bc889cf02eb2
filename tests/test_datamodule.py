"""LetsTalkDataModule on real shards whose values encode (video, segment, frame), so clips can be checked by value."""

from __future__ import annotations

import io
import shutil
import tarfile
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch

from datamodules import LetsTalkDataModule
from pipeline.audio_encoders import audio_windows
from pipeline.models.dit import DiTConfig
from pipeline.shards import AtomicShardWriter, DataWarning, Manifest, Segment, ShardFormatError, sample_key
from pipeline.vae import unscale_latents

C, H, K, D = 4, 4, 2, 3
F, R = 4, 1  # clip_frames, audio_radius
VAE = {"id": "synthetic", "scaling_factor": 0.5, "shift_factor": 1.0, "latent_channels": C, "downsample": 4}
VAL_PERCENT = 20.0  # with these ids: vid05, vid07, vid08 are validation videos
VIDEOS = [f"vid{i:02d}" for i in range(10)]
SHARD_SIZES = (9, 6, 5)  # uneven shards


def _segment(video: int, segment: int, frames: int) -> Segment:
    """latents[t] channels: 0 = frame t, 1 = video, 2 = segment, 3 = frame + 0.5; audio[t, k] = (t, k, video)."""
    t = np.arange(frames, dtype=np.float32)
    latents = np.empty((frames, C, H, H), np.float32)
    latents[:, 0] = t[:, None, None]
    latents[:, 1] = video
    latents[:, 2] = segment
    latents[:, 3] = t[:, None, None] + 0.5
    audio = np.empty((frames, K, D), np.float32)
    audio[:, :, 0] = t[:, None]
    audio[:, :, 1] = np.arange(K)[None, :]
    audio[:, :, 2] = video
    flac = io.BytesIO()
    sf.write(flac, np.zeros(640 * frames, np.float32), 16000, format="FLAC")
    meta = {"fps": 25.0, "sample_rate": 16000, "frames": frames, "source": f"{VIDEOS[video]}.mp4"}
    key = sample_key(VIDEOS[video], segment)
    return Segment(key, latents.astype(np.float16), audio.astype(np.float16), flac.getvalue(), meta)


def _write_dataset(root: Path) -> dict[str, Segment]:
    """20 segments of 10 videos (one of 3 frames per video-pair, too short for a clip) in 3 uneven shards."""
    segments = [_segment(v, s, 3 if (v + s) % 7 == 0 else 6 + (v + 3 * s) % 5) for v in range(10) for s in range(2)]
    manifest = Manifest(vae=dict(VAE), audio_encoder={"id": "synthetic", "K": K, "D": D, "sample_rate": 16000})
    with AtomicShardWriter(root, max_samples=100) as writer:
        position = 0
        for size in SHARD_SIZES:
            for segment in segments[position : position + size]:
                writer.write(segment)
            writer.flush()
            position += size
    manifest.shards = writer.shards
    manifest.save(root)
    return {s.key: s for s in segments}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Segment]]:
    root = tmp_path_factory.mktemp("shards")
    return root, _write_dataset(root)


def _module(root: Path, **kw) -> LetsTalkDataModule:
    args = dict(clip_frames=F, audio_radius=R, batch_size=2, num_workers=0, val_percent=VAL_PERCENT, shuffle_buffer=4)
    args.update(kw)
    return LetsTalkDataModule(str(root), **args)


def _epoch(loader) -> list[dict]:
    return list(loader)


def _check_clip(batch: dict, i: int, segments: dict[str, Segment]) -> None:
    """One clip of a batch against the segment it claims to come from."""
    key, start = batch["key"][i], int(batch["start"][i])
    segment = segments[key]
    frames = len(segment.latents)
    raw = torch.from_numpy(segment.latents.astype(np.float32))
    # scaled exactly once: (z - shift) * scale
    expected = (raw[start : start + F] - VAE["shift_factor"]) * VAE["scaling_factor"]
    assert torch.equal(batch["latents"][i], expected)
    latents = unscale_latents(batch["latents"][i], VAE)  # [F, C, h, w]
    assert torch.equal(latents[:, 0, 0, 0], torch.arange(start, start + F, dtype=torch.float32))
    ref = unscale_latents(batch["ref"][i], VAE)[0]  # [C, h, w]
    assert ref[1, 0, 0] == latents[0, 1, 0, 0] and ref[2, 0, 0] == latents[0, 2, 0, 0]  # same video and segment
    ref_frame = int(ref[0, 0, 0])
    assert 0 <= ref_frame < frames
    assert torch.equal(batch["ref"][i][0], (raw[ref_frame] - VAE["shift_factor"]) * VAE["scaling_factor"])
    if frames > F:
        assert not start <= ref_frame < start + F, (key, start, ref_frame)
    whole = audio_windows(torch.from_numpy(segment.audio.astype(np.float32)), R)  # [T, W, D]
    assert torch.equal(batch["audio"][i], whole[start : start + F])
    for j in range(F):  # row (o + R) * K + k holds frame clamp(start + j + o) and vector k
        for o in range(-R, R + 1):
            rows = batch["audio"][i][j, (o + R) * K : (o + R + 1) * K]
            assert torch.all(rows[:, 0] == min(max(start + j + o, 0), frames - 1))
            assert torch.equal(rows[:, 1], torch.arange(K, dtype=torch.float32))


def test_batches_hold_consecutive_scaled_frames_outside_ref_and_audio_windows(dataset):
    root, segments = dataset
    dm = _module(root)
    batches = _epoch(dm.train_dataloader())
    assert len(batches) == dm.train_batches_per_epoch > 0
    batch = batches[0]
    assert batch["latents"].dtype == torch.float32 and batch["latents"].shape == (2, F, C, H, H)
    assert batch["ref"].shape == (2, 1, C, H, H)
    assert batch["audio"].dtype == torch.float32 and batch["audio"].shape == (2, F, (2 * R + 1) * K, D)
    assert batch["start"].dtype == torch.int64 and isinstance(batch["key"], list)
    for batch in batches:
        for i in range(len(batch["key"])):
            _check_clip(batch, i, segments)
    seen = {key for batch in batches for key in batch["key"]}
    assert all(len(segments[key].latents) >= F for key in seen)  # 3-frame segments are skipped


def test_val_clips_start_at_zero_with_last_frame_reference_and_edge_replicated_audio(dataset):
    root, segments = dataset
    batches = list(_module(root).val_dataloader())
    assert len(batches) == 2
    for batch in batches:
        assert torch.all(batch["start"] == 0)
        for i, key in enumerate(batch["key"]):
            _check_clip(batch, i, segments)
            assert int(unscale_latents(batch["ref"][i], VAE)[0, 0, 0, 0]) == len(segments[key].latents) - 1
            first = batch["audio"][i][0]  # frame 0: offset -1 replicates frame 0
            assert torch.all(first[:K, 0] == 0) and torch.all(first[K : 2 * K, 0] == 0)


def test_train_and_val_videos_are_disjoint_and_cover_all_usable_videos(dataset):
    root, segments = dataset
    dm = _module(root)
    dm.setup("fit")
    train = {s.key.split("/")[0] for s in dm.train_samples}
    val = {s.key.split("/")[0] for s in dm.val_samples}
    usable = {k.split("/")[0] for k, s in segments.items() if len(s.latents) >= F}
    assert train and val and not train & val and train | val == usable
    streamed = {key.split("/")[0] for batch in _epoch(dm.train_dataloader()) for key in batch["key"]}
    assert streamed and streamed <= train
    val_keys = {key for batch in dm.val_dataloader() for key in batch["key"]}
    assert {k.split("/")[0] for k in val_keys} <= val


def test_val_batches_are_identical_across_instances(dataset):
    root, _ = dataset
    first = list(_module(root).val_dataloader())
    second = list(_module(root, seed=7, num_workers=2).val_dataloader())
    assert len(first) == len(second) == 2
    for a, b in zip(first, second):
        assert a["key"] == b["key"]
        for name in ("latents", "ref", "audio", "start"):
            assert torch.equal(a[name], b[name])


def _first_batch(root: Path, **kw) -> dict:
    return next(iter(_module(root, **kw).train_dataloader()))


def test_same_seed_same_batches_different_seed_or_epoch_different(dataset):
    root, _ = dataset
    a, b, c = _first_batch(root, seed=3), _first_batch(root, seed=3), _first_batch(root, seed=4)
    assert a["key"] == b["key"] and torch.equal(a["start"], b["start"]) and torch.equal(a["latents"], b["latents"])
    assert (a["key"], a["start"].tolist()) != (c["key"], c["start"].tolist())
    # the second pass over a loader is epoch 1, the same as a fresh module started at epoch 1
    dm = _module(root, seed=3)
    loader = dm.train_dataloader()
    epoch0, epoch1 = _epoch(loader), _epoch(loader)
    resumed = _module(root, seed=3)
    resumed.set_epoch(1)
    again = _epoch(resumed.train_dataloader())
    assert [x["key"] for x in epoch0] != [x["key"] for x in epoch1]
    assert [x["key"] for x in epoch1] == [x["key"] for x in again]
    assert all(torch.equal(x["latents"], y["latents"]) for x, y in zip(epoch1, again))


def test_ranks_with_uneven_shards_yield_equal_batch_counts(dataset):
    root, _ = dataset
    single = _module(root, batch_size=2)
    single.setup("fit")
    per_rank = []
    for rank in range(2):
        dm = _module(root, batch_size=2, rank=rank, world_size=2)
        assert dm.train_batches_per_epoch == len(single.train_samples) // 4
        per_rank.append(_epoch(dm.train_dataloader()))
        assert len(per_rank[-1]) == dm.train_batches_per_epoch
    assert per_rank[0][0]["key"] != per_rank[1][0]["key"]  # ranks read different shards first
    # more ranks than shards: every rank still gets its batches
    for rank in (0, 4):
        dm = _module(root, batch_size=1, rank=rank, world_size=5)
        assert len(_epoch(dm.train_dataloader())) == dm.train_batches_per_epoch == len(single.train_samples) // 5


def test_truncated_shard_costs_its_cut_sample_named_and_counted_once(dataset, tmp_path):
    """The index names the sample the cut went through and remembers its key: the stream never reads it again,
    so it is counted once, not once per epoch; the shard's complete samples still train."""
    root, segments = dataset
    shutil.copytree(root, tmp_path / "ds")
    shard = tmp_path / "ds" / "shard-000000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.warns(DataWarning,
                      match=r"skipped \(1 distinct damaged sample so far .*shard-000000.tar: sample vid\d\d/\d{4}: lacks"):
        dm = _module(tmp_path / "ds", max_bad_samples=10)
        dm.setup("fit")
    (cut,) = dm.faults.keys
    assert dm.faults.count == 1 and cut in segments
    full = _module(root)
    full.setup("fit")
    kept = {s.key for s in dm.train_samples + dm.val_samples}
    assert 0 < len(kept) < len(full.train_samples) + len(full.val_samples) and cut not in kept
    loader = dm.train_dataloader()
    batches = _epoch(loader) + _epoch(loader)
    assert len(batches) == 2 * dm.train_batches_per_epoch
    assert loader.dataset.faults.count == 0 and all(b["bad_samples"] == [] for b in batches)
    assert cut not in {key for batch in batches for key in batch["key"]}
    for batch in batches:
        for i in range(len(batch["key"])):
            _check_clip(batch, i, segments)


def test_sample_with_mismatched_arrays_is_skipped_and_counted(tmp_path):
    """A readable tar whose one sample fails Segment validation: skipped, counted, stream goes on."""
    root = tmp_path / "ds"
    segments = _write_dataset(root)
    bad = _segment(0, 9, 8)
    members = bad.to_wds()
    members["audio.npy"] = members["audio.npy"][:-6]  # truncated array payload
    with tarfile.open(root / "shard-000002.tar", "a") as tar:
        for name, payload in members.items():
            if name == "__key__":
                continue
            info = tarfile.TarInfo(f"{bad.key}.{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    dm = _module(root, shuffle_buffer=0, max_bad_samples=100)
    dm.setup("fit")
    assert bad.key in {s.key for s in dm.train_samples}  # its latents header is fine
    loader = dm.train_dataloader()
    batches: list[dict] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        while not loader.dataset.faults.count and len(batches) < 100:  # until the stream reaches the bad sample
            batches += _epoch(loader)
    assert any(bad.key in str(w.message) for w in caught if issubclass(w.category, DataWarning))
    assert loader.dataset.faults.count >= 1
    assert bad.key not in {key for batch in batches for key in batch["key"]}
    for batch in batches:
        for i in range(len(batch["key"])):
            _check_clip(batch, i, segments)


def test_two_worker_processes(dataset):
    root, segments = dataset
    runs = []
    for _ in range(2):
        dm = _module(root, num_workers=2, batch_size=2, seed=5)
        loader = dm.train_dataloader()
        runs.append((_epoch(loader), _epoch(loader)))
        assert all(len(epoch) == dm.train_batches_per_epoch for epoch in runs[-1])
    (a0, a1), (b0, b1) = runs
    assert [x["key"] for x in a0] == [x["key"] for x in b0] and [x["key"] for x in a1] == [x["key"] for x in b1]
    assert [x["key"] for x in a0] != [x["key"] for x in a1]
    for batch in a0 + a1:
        for i in range(len(batch["key"])):
            _check_clip(batch, i, segments)


def test_empty_val_split_falls_back_to_train_with_warning(dataset):
    root, _ = dataset
    dm = _module(root, val_percent=0.0, val_batches=1)
    with pytest.warns(DataWarning, match="validation split is empty"):
        (batch,) = list(dm.val_dataloader())
    assert batch["key"] == [s.key for s in dm.train_samples[:2]]


def test_clear_errors(dataset, tmp_path):
    root, _ = dataset
    with pytest.raises(FileNotFoundError, match="letstalk prepare"):
        _module(tmp_path / "nope").setup("fit")
    with pytest.raises(FileNotFoundError, match=r"manifest\.json.*letstalk prepare"):
        _module(tmp_path).setup("fit")
    with pytest.raises(ValueError, match=r"longest: 10 frames.*clip_frames <= 10"):
        _module(root, clip_frames=11).setup("fit")
    with pytest.raises(ValueError, match="ref_mode='middle'"):
        _module(root, ref_mode="middle")
    shutil.copytree(root, tmp_path / "ds")
    manifest = Manifest.load(tmp_path / "ds")
    manifest.vae["latent_channels"] = 8
    manifest.save(tmp_path / "ds")
    with pytest.raises(ShardFormatError, match=r"shard-000000\.tar: sample vid00/0000 has 4 latent channels.* has 8"):
        _module(tmp_path / "ds").setup("fit")
    all_val = _module(root, val_percent=99.99)
    all_val.setup("validate")  # validation alone needs no training data
    assert len(list(all_val.val_dataloader())) == 2
    with pytest.raises(ValueError, match="lower val_percent"):
        all_val.train_dataloader()


def test_all_training_shards_unreadable_raises_instead_of_hanging(dataset, tmp_path):
    root, _ = dataset
    shutil.copytree(root, tmp_path / "ds")
    dm = _module(tmp_path / "ds", max_bad_samples=10**9)
    dm.setup("fit")
    for shard in (tmp_path / "ds").glob("*.tar"):
        shard.write_bytes(b"not a tar file" * 100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        with pytest.raises(RuntimeError, match="no readable training clip"):
            _epoch(dm.train_dataloader())


class _Recorder(L.LightningModule):
    """Records the keys of every batch it trains and validates on."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.train_keys: dict[int, list[str]] = {}
        self.train_clips: list[tuple[str, int]] = []
        self.val_keys: list[str] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.train_keys.setdefault(self.current_epoch, []).extend(batch["key"])
        self.train_clips.extend(zip(batch["key"], batch["start"].tolist()))
        return (self.weight * batch["latents"].mean()) ** 2

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val_keys.extend(batch["key"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(root: Path, epochs: int, ckpt_dir: Path, ckpt_path: str | None = None, callbacks: list | None = None,
         **data) -> tuple[_Recorder, LetsTalkDataModule]:
    model, dm = _Recorder(), _module(root, seed=1, **data)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        default_root_dir=ckpt_dir,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    assert trainer.num_training_batches == dm.train_batches_per_epoch
    return model, dm


def test_lightning_fit_epochs_and_resume_follow_the_trainer_epoch(dataset, tmp_path):
    root, _ = dataset
    model, dm = _fit(root, 2, tmp_path / "a")
    assert sorted(model.train_keys) == [0, 1]
    assert all(len(keys) == dm.train_batches_per_epoch * dm.batch_size for keys in model.train_keys.values())
    assert model.train_keys[0] != model.train_keys[1]
    assert model.val_keys[: 2 * dm.batch_size] == [k for b in dm.val_dataloader() for k in b["key"]]
    _fit(root, 1, tmp_path / "b")
    (ckpt,) = (tmp_path / "b").rglob("*.ckpt")
    resumed, _ = _fit(root, 2, tmp_path / "c", ckpt_path=str(ckpt))
    assert resumed.train_keys == {1: model.train_keys[1]}


@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_resume_continues_with_the_next_batch_and_never_repeats_one(dataset, tmp_path, workers):
    root, _ = dataset
    every = L.pytorch.callbacks.ModelCheckpoint(every_n_train_steps=1, save_top_k=-1, save_on_train_epoch_end=False)
    full, dm = _fit(root, 2, tmp_path / "full", num_workers=workers, callbacks=[every])
    per_epoch = dm.train_batches_per_epoch
    assert per_epoch >= 3
    for stop in (2, per_epoch + 1):  # inside the first epoch, one batch into the second
        (ckpt,) = (tmp_path / "full").rglob(f"*-step={stop}.ckpt")  # saved on_train_batch_end, mid-epoch
        resumed, _ = _fit(root, 2, tmp_path / f"resumed{stop}", ckpt_path=str(ckpt), num_workers=workers)
        assert resumed.train_clips == full.train_clips[stop * dm.batch_size :]


LONG = DiTConfig(motion_frames=2, memory_frames=2, memory_stride=2)


def _check_context(batch: dict, i: int, segments: dict[str, Segment]) -> None:
    """Motion = the M frames right before the clip; memory = `memory_indices(start)`, clamped at frame 0."""
    key, start = batch["key"][i], int(batch["start"][i])
    assert start >= LONG.motion_frames
    motion = unscale_latents(batch["motion"][i], VAE)[:, 0, 0, 0]  # channel 0 = frame index
    assert motion.tolist() == list(range(start - LONG.motion_frames, start))
    memory = unscale_latents(batch["memory"][i], VAE)[:, 0, 0, 0]
    assert memory.tolist() == LONG.long_video.memory_indices(start)
    assert torch.all(unscale_latents(batch["memory"][i], VAE)[:, 1] == segments[key].latents[0, 1, 0, 0].item())


def test_model_context_adds_motion_and_memory_frames_from_the_same_segment(dataset):
    root, segments = dataset
    dm = _module(root)
    dm.set_context(LONG)
    batches = _epoch(dm.train_dataloader())
    assert len(batches) == dm.train_batches_per_epoch > 0
    for batch in batches:
        assert batch["motion"].shape == (2, 2, C, H, H) and batch["memory"].shape == (2, 2, C, H, H)
        for i in range(len(batch["key"])):
            _check_clip(batch, i, segments)
            _check_context(batch, i, segments)
    assert all(len(segments[key].latents) >= F + 2 for batch in batches for key in batch["key"])
    val = list(dm.val_dataloader())
    assert val and all(torch.all(batch["start"] == LONG.motion_frames) for batch in val)
    for batch in val:
        for i in range(len(batch["key"])):
            _check_context(batch, i, segments)
    plain = _module(root)
    plain.set_context(DiTConfig())  # no long-video options: batches as before
    assert "motion" not in next(iter(plain.train_dataloader()))


def test_motion_frames_count_against_segment_length(dataset):
    root, _ = dataset
    dm = _module(root, clip_frames=9)
    dm.set_context(LONG)
    with pytest.raises(ValueError, match=r"clip_frames=9 \+ model.net.motion_frames=2 = 11 frames.*clip_frames <= 8"):
        dm.setup("fit")


def _with_speakers(root: Path, splits: dict[str, str]) -> None:
    """Record in the manifest, as `prepare` does, that speaker s<i> owns vid<2i> and vid<2i+1>, in `splits`."""
    manifest = Manifest.load(root)
    manifest.inputs = [{"path": f"{video}.mp4", "id": video, "speaker": f"s{i // 2}", "split": splits[f"s{i // 2}"],
                        "segments": 2, "frames": 20} for i, video in enumerate(VIDEOS)]
    manifest.save(root)


def _speakers(dm: LetsTalkDataModule, samples) -> set[str]:
    return {f"s{VIDEOS.index(s.key.split('/')[0]) // 2}" for s in samples}


def test_splits_follow_the_speakers_prepare_recorded(dataset, tmp_path):
    """Speaker s0 was put in val by the list's split column: both its videos are validation videos, whatever a hash
    of their ids says; every other speaker trains."""
    root, _ = dataset
    shutil.copytree(root, tmp_path / "ds")
    _with_speakers(tmp_path / "ds", {"s0": "val", "s1": "train", "s2": "train", "s3": "train", "s4": "train"})
    dm = _module(tmp_path / "ds", val_percent=None)
    dm.setup("fit")
    assert _speakers(dm, dm.val_samples) == {"s0"} and _speakers(dm, dm.train_samples) == {"s1", "s2", "s3", "s4"}
    assert {s.key.split("/")[0] for s in dm.val_samples} == {"vid00", "vid01"}
    streamed = {key.split("/")[0] for batch in _epoch(dm.train_dataloader()) for key in batch["key"]}
    assert streamed and not streamed & {"vid00", "vid01"}


@pytest.mark.parametrize("percent", [55.0, 65.0, 90.0])
def test_a_new_val_percent_splits_speakers_not_videos(dataset, tmp_path, percent):
    """Re-split at another percent: a speaker's two videos stay together (a split by video id puts s0..s4's
    videos on both sides at these percents)."""
    root, _ = dataset
    shutil.copytree(root, tmp_path / "ds")
    _with_speakers(tmp_path / "ds", dict.fromkeys(("s0", "s1", "s2", "s3", "s4"), "train"))
    dm = _module(tmp_path / "ds", val_percent=percent)
    dm.setup("fit")
    train, val = _speakers(dm, dm.train_samples), _speakers(dm, dm.val_samples)
    assert train and val and not train & val


@pytest.mark.parametrize("open_shards, shards_in_first_batch", [(1, 1), (3, 3)])
def test_workers_read_several_shards_at_once_a_segment_from_each_in_turn(dataset, open_shards, shards_in_first_batch):
    """No shuffle buffer, batches of 3: one shard at a time fills a batch from one shard; three at once, from three."""
    root, _ = dataset
    dm = _module(root, shuffle_buffer=0, batch_size=3, open_shards=open_shards, val_percent=0.0)
    dm.setup("fit")
    shard_of = {s.key: s.shard for s in dm.train_samples}
    first = next(iter(dm.train_dataloader()))
    assert len({shard_of[key] for key in first["key"]}) == shards_in_first_batch


def test_a_mid_epoch_resume_draws_skipped_batches_from_headers_and_reads_only_clip_frames(dataset, monkeypatch):
    """Training holds lazy arrays (`pipeline.shards.NpyMember`): a clip reads its own frames and audio rows by offset,
    and the batches a resume skips read no array data at all, yet the resumed batches equal the uninterrupted ones."""
    import pipeline.shards.npy as shards

    root, _ = dataset
    reads: list[int] = []
    real = shards._pread
    monkeypatch.setattr(shards, "_pread", lambda path, size, offset: reads.append(size) or real(path, size, offset))
    dm = _module(root, val_percent=0.0)
    dm.setup("fit")
    whole, after = [], []
    for batch in dm.train_dataloader():
        whole.append(batch)
        after.append(sum(reads))
    assert len(whole) >= 3
    row = H * H * C * 2  # bytes of one float16 latent frame
    assert 0 < after[0] < 3 * dm.batch_size * (F + 1) * row  # the clips' frames (+ reference), not whole segments
    reads.clear()
    loader = dm.train_dataloader()
    loader.dataset.skip = 2
    resumed = _epoch(loader)
    assert [b["key"] for b in resumed] == [b["key"] for b in whole[2:]]
    assert all(torch.equal(a["latents"], b["latents"]) for a, b in zip(resumed, whole[2:]))
    assert sum(reads) == after[-1] - after[1]  # only the batches it yields were read


@pytest.mark.parametrize("world_size", [1, 3, 7])
def test_an_epoch_uses_each_segment_at_most_once_over_all_ranks(dataset, world_size):
    """The epoch plan (`datamodules.plan`) gives each rank the same number of segments, disjoint: uneven shards
    (9, 6, 5 samples) never make a rank read a segment twice, nor two ranks the same one."""
    root, _ = dataset
    keys = []
    for rank in range(world_size):
        dm = _module(root, batch_size=1, rank=rank, world_size=world_size)
        batches = _epoch(dm.train_dataloader())
        assert len(batches) == dm.train_batches_per_epoch == len(dm.train_samples) // world_size
        keys += [key for batch in batches for key in batch["key"]]
    assert len(keys) == len(set(keys)) == world_size * (len(dm.train_samples) // world_size)

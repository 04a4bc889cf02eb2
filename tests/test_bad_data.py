"""Damaged data costs a sample, not the run (`pipeline.shards.BadSamples`), through `letstalk fit`, validation and
evaluation: the two cases a user met (a shard cut in half; a sample whose latents are a pickled object array), the
budget, and an exact resume on damaged data. ~25 s on 2 CPU cores."""

from __future__ import annotations

import csv
import io
import shutil
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_modules.letstalk import LetsTalkModule
from pipeline.cli import main
from pipeline.evaluate import select_segments
from pipeline.shards import LATENTS, BadSamples, DataWarning, Manifest, TooManyBadSamples, index_shards
from procs import run_job
from test_training import _fit, fit_args, write_shards

POISONED = "v1/0001"  # in shard-000000.tar
BUDGET = {"max_bad_samples": 10}


class _Payload:
    """Unpickling this would create `marker`: it must never happen."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _damage(root: Path, marker: Path) -> None:
    """shard-000001.tar cut in half; in shard-000000.tar, POISONED's latents replaced by an object array of the same
    4-D shape whose first element unpickles to a file write."""
    cut = root / "shard-000001.tar"
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    shard = root / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(shard, "w") as tar:
        for member, payload in members:
            if member.name == f"{POISONED}.{LATENTS}":
                shape = np.load(io.BytesIO(payload)).shape
                poison = np.empty(shape, dtype=object)
                poison.flat[0] = _Payload(marker)
                buffer = io.BytesIO()
                np.save(buffer, poison, allow_pickle=True)
                payload = buffer.getvalue()
                member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = write_shards(tmp_path_factory.mktemp("damaged"))
    marker = root.parent / "unpickled"
    _damage(root, marker)
    return root, marker


def test_the_index_names_and_counts_both_kinds_of_damage(damaged):
    root, marker = damaged
    faults = BadSamples(budget=10)
    with pytest.warns(DataWarning) as caught:
        samples = index_shards(Manifest.load(root).shard_paths(root), faults)
    messages = [str(w.message) for w in caught]
    assert any(f"shard-000000.tar: {POISONED}.latents.npy: an object array (refused" in m for m in messages), messages
    assert any("shard-000001.tar: sample v" in m and "lacks" in m for m in messages), messages
    assert faults.count == 2 and POISONED in faults.keys and len(samples) < 16
    assert not marker.exists()


def test_damaged_shards_train_to_max_steps_with_the_bad_samples_counted_and_named(damaged, tmp_path):
    """Training, validation (every 2 steps) and the log: nothing stops the run, `data/bad_samples` says 2."""
    root, marker = damaged
    run = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["fit", *fit_args(root, run), "--trainer.max_steps", "6", "--data.max_bad_samples", "10"]) == 0
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 6
    named = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert any(POISONED in m for m in named) and any("shard-000001.tar" in m for m in named), named
    rows = [row for path in run.glob("lightning_logs/version_*/metrics.csv") for row in csv.DictReader(open(path))]
    counts = [float(r["data/bad_samples"]) for r in rows if r.get("data/bad_samples")]
    assert counts and set(counts) == {2.0}
    assert not marker.exists()


def test_a_budget_of_zero_stops_with_a_clear_message(damaged, tmp_path):
    root, _ = damaged
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        with pytest.raises(TooManyBadSamples, match=r"1 distinct damaged sample, more than data.max_bad_samples=0 "
                                                    rf"allows; the last: .*shard-000000.tar: {POISONED}.latents.npy: an object "
                                                    r"array .*letstalk check"):
            main(["fit", *fit_args(root, tmp_path / "run"), "--trainer.max_steps", "2", "--data.max_bad_samples", "0"])


def test_a_fractional_budget_counts_against_the_dataset(damaged):
    root, _ = damaged
    paths = Manifest.load(root).shard_paths(root)
    assert BadSamples(budget=0.2, total=16).allowed == 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        index_shards(paths, BadSamples(budget=0.125, total=16))  # 2 allowed: both pass
        with pytest.raises(TooManyBadSamples, match=r"more than data.max_bad_samples=1 \(0.1 of 16 samples\)"):
            index_shards(paths, BadSamples(budget=0.1, total=16))


def test_evaluation_clips_skip_damaged_samples(damaged):
    """`letstalk evaluate` and EvalCallback choose clips through `select_segments`: damage is skipped there too."""
    root, marker = damaged
    faults = BadSamples(budget=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        segments = select_segments(root, 100, seed=0, faults=faults)
    assert segments and POISONED not in {s.key for s in segments} and faults.count == 2
    assert not marker.exists()


def test_exact_resume_on_damaged_data(damaged, tmp_path):
    """6 steps in one go == 3 steps then a resume to 6, with the damaged shards (skips are deterministic)."""
    root, _ = damaged
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        whole = _fit(root, tmp_path / "whole", 6, data=BUDGET)
        _fit(root, tmp_path / "parts", 3, data=BUDGET)
        torch.manual_seed(1234)
        resumed = _fit(root, tmp_path / "parts", 6, ckpt=str(tmp_path / "parts" / "ckpt" / "last.ckpt"), data=BUDGET)
    assert isinstance(resumed, LetsTalkModule) and resumed.global_step == whole.global_step == 6
    for (key, x), y in zip(whole.net.state_dict().items(), resumed.net.state_dict().values()):
        assert torch.equal(x, y), f"{key} differs after resume"


def _damage_what_only_decoding_finds(root: Path) -> list[str]:
    """In shard-000000.tar, four samples damaged: a cut `json`, an `audio.npy` cut to 50 bytes, a `latents.npy` cut
    after its header, and an `audio.npy` of objects. Returns their keys."""
    shard = root / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m, _ in members))[:4]
    objects = io.BytesIO()
    np.save(objects, np.empty((12, 2, 8), dtype=object), allow_pickle=True)
    change = {f"{keys[0]}.json": lambda b: b[: len(b) // 2], f"{keys[1]}.audio.npy": lambda b: b[:50],
              f"{keys[2]}.latents.npy": lambda b: b[:200], f"{keys[3]}.audio.npy": lambda b: objects.getvalue()}
    with tarfile.open(shard, "w") as tar:
        for member, payload in members:
            payload = change.get(member.name, lambda b: b)(payload)
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    return keys


@pytest.mark.parametrize("budget, stops", [(4, False), (3, True)])
def test_the_budget_counts_distinct_samples_however_often_they_are_met(tmp_path, budget, stops):
    """Four damaged samples met by two loader workers in every epoch of a run of 3 epochs or more: `data/bad_samples`
    stays 4, a budget of 4 lets the run finish and a budget of 3 stops it naming 4 distinct samples."""
    root = write_shards(tmp_path / "shards")
    keys = _damage_what_only_decoding_finds(root)
    run = tmp_path / "run"
    args = ["fit", *fit_args(root, run), "--trainer.max_steps", "8", "--data.num_workers", "2", "--data.batch_size",
            "4", "--data.val_percent", "0", "--data.max_bad_samples", str(budget)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if stops:
            with pytest.raises(TooManyBadSamples, match=rf"4 distinct damaged samples, more than "
                                                        rf"data.max_bad_samples={budget} allows"):
                main(args)
            return
        assert main(args) == 0
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 8 and last["epoch"] >= 2 and sorted(last["bad_samples"]) == sorted(keys)
    rows = [row for path in run.glob("lightning_logs/version_*/metrics.csv") for row in csv.DictReader(open(path))]
    counts = [float(r["data/bad_samples"]) for r in rows if r.get("data/bad_samples")]
    assert counts[-1] == 4.0 and max(counts) == 4.0, counts
    named = {key for w in caught if issubclass(w.category, DataWarning) for key in keys if key in str(w.message)}
    assert named == set(keys)


def test_a_readable_dataset_counts_nothing(tmp_path):
    root = write_shards(tmp_path / "good")
    faults = BadSamples(budget=0)
    assert len(index_shards(Manifest.load(root).shard_paths(root), faults)) == 16 and faults.count == 0
    shutil.rmtree(root)


RANKS_SCRIPT = """
import sys
import lightning as L
sys.path.insert(0, {repo!r})
import datamodules.letstalk as dm
from lightning_modules.letstalk import LetsTalkModule

root, run = sys.argv[1], sys.argv[2]
reads = []
listing = dm.index_dataset
dm.index_dataset = lambda *args: reads.append(1) or listing(*args)
L.seed_everything(0)
logger = L.pytorch.loggers.CSVLogger(run)
trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_steps=3, default_root_dir=run, logger=logger,
                    log_every_n_steps=1, enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0,
                    enable_checkpointing=False)
data = dm.LetsTalkDataModule(root, clip_frames=4, audio_radius=1, batch_size=2, num_workers=0, max_bad_samples=10)
trainer.fit(LetsTalkModule(net={{"size": "tiny"}}), data)
open(f"{{run}}/reads-{{trainer.global_rank}}", "w").write(str(len(reads)))
"""


def test_two_ranks_read_the_index_once_and_count_its_damage_once(damaged, tmp_path):
    """Rank 0 lists the dataset and broadcasts it: rank 1 reads no index, and the damage is counted once (2), not
    once per rank. ~15 s on 2 CPU cores."""
    root, _ = damaged
    script, run = tmp_path / "ranks.py", tmp_path / "run"
    script.write_text(RANKS_SCRIPT.format(repo=str(Path(__file__).resolve().parents[1])))
    done = run_job([sys.executable, str(script), str(root), str(run)], timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [(run / f"reads-{rank}").read_text() for rank in (0, 1)] == ["1", "0"]
    rows = [row for path in run.glob("lightning_logs/version_*/metrics.csv") for row in csv.DictReader(open(path))]
    assert {float(r["data/bad_samples"]) for r in rows if r.get("data/bad_samples")} == {2.0}

"""Checkpoints carry their integrity (lightning_modules/trainer.py, pipeline.checkpoints): every save of `letstalk fit`
writes a manifest last (sizes, sha256, step, ranks); resume skips a damaged or unfinished newest checkpoint, naming the
file, and ends exactly where an uninterrupted run ends; export and generate refuse damaged files; a full disk stops the
run with the folder's free space and leaves the previous checkpoint intact and nothing that looks complete.

Real runs of the tiny model on tests/test_training.py's shards: the single-process ones in this process (~15-25 s
each on 2 cores), the 2-rank ones (ZeRO-2, DDP) as subprocesses (~30 s each, most of it start-up). The full-disk
tests mount a tmpfs (root only; skipped, saying why, where mounting is not permitted).
"""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.checkpoints import (MANIFEST, CheckpointIntegrityError, UnverifiedCheckpointWarning, make_manifest,
                                  manifest_path, read_weights, structure_problem, verify_checkpoint, write_manifest)
from pipeline.cli import main
from pipeline.cli.train import resume_checkpoint
from pipeline.shipped import CONFIGS
from procs import run_job
from test_training import TINY_FIT, write_shards

REPO = Path(__file__).resolve().parents[1]
EVERY_STEP = 'save_top_k: -1, filename: "last-{step}"'  # keep every checkpoint under a `last*` name: resume's candidates
FLAGS = ["--seed_everything", "0", "--trainer.logger", "false", "--trainer.limit_val_batches", "1"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shards(tmp_path_factory.mktemp("integrity_shards"))


def config(shards: Path, name: str, checkpoint_args: str, every: int = 2) -> Path:
    """TINY_FIT (CPU, tiny model) with the ModelCheckpoint's init args `checkpoint_args`, every `every` steps."""
    path = shards.parent / f"{name}.yaml"
    path.write_text(TINY_FIT.replace("SHARDS", str(shards)).replace("EVERY", str(every))
                    .replace("save_last: true", checkpoint_args))
    return path


def fit(config_path: Path, run: Path, steps: int, *flags: str) -> None:
    """`letstalk fit` in this process; SystemExit on failure, as on the command line."""
    assert main(["fit", "--config", str(config_path), "--trainer.default_root_dir", str(run),
                 "--trainer.max_steps", str(steps), *FLAGS, *flags]) == 0


def fit_job(config_path: Path, run: Path, steps: int, *flags: str) -> subprocess.CompletedProcess:
    """`letstalk fit` on 2 CPU ranks as a subprocess (Lightning launches the second rank)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "WANDB_MODE": "offline"}
    return run_job([sys.executable, "-m", "pipeline.cli", "fit", "--config", str(config_path), *flags,
                    "--trainer.default_root_dir", str(run), "--trainer.max_steps", str(steps), *FLAGS,
                    "--trainer.accelerator", "cpu", "--trainer.devices", "2"], timeout=300, env=env)


def flip_byte(path: Path, at: float = 0.5) -> None:
    """One bit flipped in the middle of `path` (tensor data: the zip and its pickle stay readable)."""
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x01
    path.write_bytes(bytes(data))


def weights(path: Path) -> dict[str, torch.Tensor]:
    _, net = read_weights(path, ema=False)
    _, ema = read_weights(path, ema=True)
    return {**{f"net.{k}": v for k, v in net.items()}, **{f"ema.{k}": v for k, v in ema.items()}}


def assert_equal_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ from the uninterrupted run's, e.g. {differ[:3]}"


@pytest.fixture(scope="module")
def ddp_run(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 steps in one process, a checkpoint every 2 (`last-step=2.ckpt`, `last-step=4.ckpt`)."""
    run = tmp_path_factory.mktemp("ddp") / "run"
    fit(config(shards, "every-step", EVERY_STEP), run, 4)
    return run


def test_every_save_writes_a_manifest_last_and_no_orphans(ddp_run: Path, shards: Path, tmp_path: Path):
    """Each checkpoint file has `<name>.manifest.json` (size, sha256, step, ranks) that verifies; ModelCheckpoint's
    removal of an older top-k file takes its manifest along; nothing temporary is left."""
    ckpts = ddp_run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "last-step=2.ckpt", "last-step=2.ckpt.manifest.json", "last-step=4.ckpt", "last-step=4.ckpt.manifest.json"]
    manifest = verify_checkpoint(ckpts / "last-step=4.ckpt")
    assert manifest["global_step"] == 4 and manifest["world_size"] == 1 and manifest["kind"] == "file"
    (entry,) = manifest["files"]
    assert entry["path"] == "last-step=4.ckpt" and entry["bytes"] == (ckpts / "last-step=4.ckpt").stat().st_size
    run = tmp_path / "top1"  # save_top_k 1 and save_last: the step-2 file is removed at step 4, with its manifest
    fit(config(shards, "top1", "save_last: true"), run, 4)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "epoch=1-step=4.ckpt", "epoch=1-step=4.ckpt.manifest.json", "last.ckpt", "last.ckpt.manifest.json"]
    assert verify_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 4


def test_a_damaged_newest_ckpt_is_skipped_naming_the_file_and_the_resumed_run_ends_as_the_uninterrupted_one(
        ddp_run: Path, shards: Path, tmp_path: Path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("last-step=2.ckpt", "last-step=4.ckpt"):
        for path in (ddp_run / "checkpoints" / name, manifest_path(ddp_run / "checkpoints" / name)):
            (run / "checkpoints" / path.name).write_bytes(path.read_bytes())
    uninterrupted = weights(run / "checkpoints" / "last-step=4.ckpt")
    damaged = run / "checkpoints" / "last-step=4.ckpt"
    flip_byte(damaged)
    assert structure_problem(damaged) is None  # a readable torch zip: only the manifest tells
    capsys.readouterr()
    fit(config(shards, "every-step", EVERY_STEP), run, 4, "--ckpt_path", "last")
    err = capsys.readouterr().err
    assert (f"skipping damaged checkpoint {damaged}: {damaged}: its bytes differ from the sha256 its manifest "
            "recorded") in err, err[-3000:]
    assert f"resuming from {run / 'checkpoints' / 'last-step=2.ckpt'}" in err
    again = run / "checkpoints" / "last-step=4-v1.ckpt"  # ModelCheckpoint's name beside a file it did not write
    assert verify_checkpoint(again)["global_step"] == 4
    assert_equal_weights(weights(again), uninterrupted)


def test_export_and_generate_refuse_damaged_files_naming_them(ddp_run: Path, tmp_path: Path, capsys):
    """A damaged checkpoint: export stops naming the file; its export records the safetensors' sha256, and a
    damaged export stops generate (and a re-export) naming the file; nothing half-made is written."""
    good = ddp_run / "checkpoints" / "last-step=4.ckpt"
    out = tmp_path / "model.safetensors"
    assert main(["export", str(good), "--out", str(out)]) == 0
    record = json.loads(out.with_suffix(".json").read_text())["integrity"]
    assert record["file"] == "model.safetensors" and record["bytes"] == out.stat().st_size and len(record["sha256"]) == 64
    config_, state = read_weights(out)
    assert "integrity" not in config_ and state

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(good.read_bytes())
    manifest_path(bad).write_bytes(manifest_path(good).read_bytes())
    flip_byte(bad)
    capsys.readouterr()
    assert main(["export", str(bad), "--out", str(tmp_path / "bad.safetensors")]) == 1
    assert f"letstalk export: error: {bad}: its bytes differ from the sha256 its manifest recorded" in capsys.readouterr().err
    assert not list(tmp_path.glob("bad.safetensors*"))
    bad.write_bytes(good.read_bytes()[:-1000])  # truncated: the size says so before any hashing
    assert main(["export", str(bad), "--out", str(tmp_path / "bad.safetensors")]) == 1
    assert f"{bad}: {bad.stat().st_size} bytes, its manifest recorded {good.stat().st_size} (truncated)" in \
        capsys.readouterr().err

    flip_byte(out)
    args = ["generate", "--checkpoint", str(out), "--portrait", str(tmp_path / "p.png"), "--audio",
            str(tmp_path / "a.wav"), "--out", str(tmp_path / "video.mp4")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"letstalk generate: error: {out}: its bytes differ from the sha256 model.json recorded" in err, err
    assert not (tmp_path / "video.mp4").exists()
    with pytest.raises(CheckpointIntegrityError, match="model.safetensors: its bytes differ"):
        read_weights(out)


def test_checkpoints_and_exports_without_a_record_are_used_with_a_warning(ddp_run: Path, tmp_path: Path):
    """Older checkpoints and other tools' have no manifest: an explicit path still works, with a warning."""
    old = tmp_path / "old.ckpt"
    old.write_bytes((ddp_run / "checkpoints" / "last-step=4.ckpt").read_bytes())
    with pytest.warns(UnverifiedCheckpointWarning, match="old.ckpt: no integrity manifest"):
        read_weights(old)
    out = tmp_path / "old.safetensors"
    with pytest.warns(UnverifiedCheckpointWarning):
        main(["export", str(old), "--out", str(out)])
    config_path = out.with_suffix(".json")
    config_path.write_text(json.dumps({k: v for k, v in json.loads(config_path.read_text()).items() if k != "integrity"}))
    with pytest.warns(UnverifiedCheckpointWarning, match="old.safetensors: no sha256 in old.json"):
        assert load_file(out).keys() == read_weights(out)[1].keys()


def _ckpt(path: Path, step: int, manifest: bool, at: float) -> Path:
    torch.save({"global_step": step, "state_dict": {"w": torch.full((4,), float(step))}}, path)
    if manifest:
        write_manifest(make_manifest(path, step, 1), manifest_path(path))
    for p in (path, manifest_path(path)):
        if p.exists():
            os.utime(p, (at, at))
    return path


def test_resume_treats_a_checkpoint_without_its_manifest_as_unfinished_unless_the_run_has_none(tmp_path: Path, capsys):
    """No Lightning run: resume's choice among candidate files. A run whose checkpoints carry manifests: one without
    is a save that did not finish, skipped with its reason; a run from before manifests: judged by structure, and
    used saying so. An explicit --ckpt_path that is damaged stops the run naming the file."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from types import SimpleNamespace

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), checkpoint_callbacks=[ModelCheckpoint(dirpath=ckpts)])
    _ckpt(ckpts / "last-v1.ckpt", 2, True, at=100)
    newest = _ckpt(ckpts / "last.ckpt", 4, False, at=200)
    assert resume_checkpoint(trainer, "last") == str(ckpts / "last-v1.ckpt")
    err = capsys.readouterr().err
    assert (f"skipping incomplete checkpoint {newest}: no integrity manifest last.ckpt.manifest.json "
            "(its save did not finish)") in err
    manifest_path(ckpts / "last-v1.ckpt").unlink()  # no checkpoint of the run has one: a run from before manifests
    assert resume_checkpoint(trainer, "last") == str(newest)
    assert "(no integrity manifest: its structure was checked, not its bytes)" in capsys.readouterr().err
    assert resume_checkpoint(trainer, str(newest)) == str(newest)
    assert "has no integrity manifest" in capsys.readouterr().err
    _ckpt(newest, 4, True, at=200)
    flip_byte(newest)
    with pytest.raises(CheckpointIntegrityError, match=f"{newest}: its bytes differ"):
        resume_checkpoint(trainer, str(newest))
    manifest_path(newest).write_text("{not json")
    assert resume_checkpoint(trainer, "last") is None
    assert f"skipping damaged checkpoint {newest}: {manifest_path(newest)}: unreadable integrity manifest" in \
        capsys.readouterr().err


ZERO2 = ["--config", str(CONFIGS / "trainer" / "zero2.yaml"), "--trainer.precision", "32-true"]


def test_zero2_a_flipped_byte_in_one_rank_shard_is_skipped_and_the_resumed_run_ends_as_the_uninterrupted_one(
        shards: Path, tmp_path: Path):
    """ZeRO-2 on 2 CPU ranks: each checkpoint is a folder with the manifest inside; one bit of rank 1's optimizer
    shard in the newest flipped: resume names that shard, takes the step-2 folder (mid-epoch) and ends at step 4 with
    the weights the uninterrupted run saved; export refuses the damaged folder naming the shard."""
    run = tmp_path / "run"
    cfg = config(shards, "zero2-every-step", EVERY_STEP)
    first = fit_job(cfg, run, 4, *ZERO2)
    assert first.returncode == 0, first.stderr[-3000:]
    newest = run / "checkpoints" / "last-step=4.ckpt"
    manifest = verify_checkpoint(newest)
    assert manifest["kind"] == "deepspeed" and manifest["world_size"] == 2 and manifest["global_step"] == 4
    listed = {f["path"] for f in manifest["files"]}
    assert {"latest", "checkpoint/zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= listed and MANIFEST not in listed
    assert not list(run.rglob("*.partial")) and not list(run.rglob("*.old"))
    uninterrupted = weights(newest)
    shard = newest / "checkpoint" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    flip_byte(shard)
    assert structure_problem(newest) is None  # every shard a readable zip: only the manifest tells
    with pytest.raises(CheckpointIntegrityError, match=f"{shard}: its bytes differ from the sha256"):
        read_weights(newest)
    assert main(["export", str(newest), "--out", str(tmp_path / "m.safetensors")]) == 1

    resumed = fit_job(cfg, run, 4, *ZERO2, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"skipping damaged checkpoint {newest}: {shard}: its bytes differ from the sha256" in resumed.stderr
    assert resumed.stderr.count("skipping damaged checkpoint") == 1  # said by rank 0 only
    assert f"resuming from {run / 'checkpoints' / 'last-step=2.ckpt'}" in resumed.stderr
    again = run / "checkpoints" / "last-step=4-v1.ckpt"  # ModelCheckpoint's name beside a folder it did not write
    assert verify_checkpoint(again)["global_step"] == 4
    assert_equal_weights(weights(again), uninterrupted)


@contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted on `folder` (skip, saying why, where mounting is not permitted)."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill a disk ({done.stderr.strip() or 'mount failed'}; needs root)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_full_disk_stops_the_run_naming_the_folder_and_keeps_the_previous_checkpoint(shards: Path, tmp_path: Path,
                                                                                       capsys):
    """The run folder on a tmpfs that holds the step-2 checkpoints (top-k and last: 2 x 27 MiB) but not another one:
    the step-4 save stops the run before writing, with the folder's free space and the size needed; the step-2 files
    still verify and nothing of step 4 exists. With space back (the tmpfs grown), resume finishes the run."""
    cfg = config(shards, "full-disk", "save_last: true")
    with tmpfs(tmp_path / "run", "70m") as run:
        with pytest.raises(SystemExit) as stopped:
            fit(cfg, run, 4)
        assert stopped.value.code == 1
        err = capsys.readouterr().err
        ckpts = run / "checkpoints"
        assert (f"letstalk fit: error: no space to save checkpoint epoch=1-step=4.ckpt: {ckpts} has " in err
                and re.search(r"MiB free, about [\d.]+ MiB needed \(the size of the previous checkpoint", err)), err[-2000:]
        assert sorted(p.name for p in ckpts.iterdir()) == [
            "epoch=0-step=2.ckpt", "epoch=0-step=2.ckpt.manifest.json", "last.ckpt", "last.ckpt.manifest.json"]
        assert verify_checkpoint(ckpts / "last.ckpt")["global_step"] == 2
        assert verify_checkpoint(ckpts / "epoch=0-step=2.ckpt")["global_step"] == 2
        subprocess.run(["mount", "-o", "remount,size=200m", str(run)], check=True)
        fit(cfg, run, 4, "--ckpt_path", "last")
        assert f"resuming from {ckpts / 'last.ckpt'}" in capsys.readouterr().err
        assert verify_checkpoint(ckpts / "last.ckpt")["global_step"] == 4
        assert not list(run.rglob("*.partial"))


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_a_disk_that_fills_during_a_save_on_2_ranks_stops_every_rank_and_leaves_nothing_that_looks_complete(
        shards: Path, tmp_path: Path, strategy: str):
    """A tmpfs smaller than one checkpoint: the first save fails in the middle of its writes (under DDP on rank 0,
    which writes the file; under ZeRO-2 on whichever rank's shard hits the limit). Every rank stops with the message,
    none waits in a collective, and no checkpoint, manifest or `.partial` is left."""
    flags = ["--trainer.strategy", "ddp"] if strategy == "ddp" else ZERO2
    with tmpfs(tmp_path / "run", "6m") as run:
        done = fit_job(config(shards, f"fills-{strategy}", "save_last: true"), run, 2, *flags)
        assert done.returncode != 0
        said = re.findall(r"letstalk fit(?: \(rank 1\))?: error: no space left on device while saving checkpoint "
                          r"epoch=\d+-step=2\.ckpt(?: \(rank \d\))?: (\S+) has [\d.]+ MiB free, more than the "
                          r"[\d.]+ MiB written before it filled; the unfinished save is removed", done.stderr)
        assert said == [str(run / "checkpoints")] * 2, done.stderr[-3000:]  # every rank stops with it
        assert not [p for p in run.rglob("*") if ".ckpt" in p.name], list(run.rglob("*"))


def test_a_disk_that_fills_while_overwriting_a_checkpoint_keeps_the_old_one_whole(tmp_path: Path):
    """Lightning's BoringModel on a 3 MiB tmpfs, `trainer.save_checkpoint` called directly (as SlurmRequeue and any
    user code do): `last.ckpt` (1.2 MB) fits; the next one grew to 3.2 MB, more than the free space although the
    previous size passes the pre-check, so the disk fills in the middle of the write. The old `last.ckpt` is still
    whole and verifies (the new one went to `last.ckpt.partial`, removed), and the error names the folder."""
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lightning_modules.trainer import CheckpointSpaceError, LetsTalkTrainer

    with tmpfs(tmp_path / "run", "3m") as run:
        model = BoringModel()
        model.register_buffer("ballast", torch.zeros(300_000))
        trainer = LetsTalkTrainer(default_root_dir=run, max_steps=1, accelerator="cpu", logger=False,
                                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(model)
        last = run / "last.ckpt"
        trainer.save_checkpoint(last)
        before = last.read_bytes()
        assert verify_checkpoint(last)["bytes"] == len(before)
        model.ballast = torch.zeros(800_000)
        with pytest.raises(CheckpointSpaceError, match=f"no space left on device while saving checkpoint last.ckpt: "
                                                       f"{run} has 1.[89] MiB free, about 1.1 MiB needed \\(the size of the "
                                                       "previous checkpoint, last.ckpt.manifest.json\\), more than "
                                                       "the [\\d.]+ MiB written before it filled"):
            trainer.save_checkpoint(last)
        assert last.read_bytes() == before and verify_checkpoint(last)
        assert sorted(p.name for p in run.iterdir()) == ["last.ckpt", "last.ckpt.manifest.json"]

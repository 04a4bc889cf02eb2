"""`slurm/train.sbatch` and `letstalk sweep` against a real single-node SLURM (tests/slurm_cluster.py), and how
`letstalk fit` resumes a requeued job (`--ckpt_path last`: the newest complete checkpoint).

Times on 2 CPU cores: the DDP requeue test ~35 s (two starts of a 2-task DDP job on the tiny model), the sweep
~25 s, each 2-task ZeRO-2 requeue test ~40 s plus ~20 s once for the uninterrupted reference job, the rest and
starting the cluster ~1 s. The requeued job's BeginTime (now + 120 s, SLURM's requeue delay) is moved to now with
`scontrol update StartTime=now`, which is what an operator may do too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from pipeline.checkpoints import read_weights
from pipeline.cli import main
from pipeline.cli.sweep import SBATCH_SCRIPT
from pipeline.cli.train import resume_checkpoint
from pipeline.shipped import CONFIGS
from slurm_cluster import KILL_WAIT, SlurmCluster
from test_training import fit_args, write_shards

TESTS = Path(__file__).resolve().parent
VENV_BIN = TESTS.parent / ".venv" / "bin"
CPU_TASKS = ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1"]
ZERO2 = ["--config", str(CONFIGS / "trainer" / "zero2.yaml"), "--trainer.accelerator", "cpu",
         "--trainer.precision", "32-true"]
STEPS, EVERY, HOLD = 9, 3, 4  # the ZeRO-2 jobs: checkpoints at steps 3, 6, 9; rank 0 held at step 4
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shards(tmp_path_factory.mktemp("slurm_shards"))


def _job_env(slurm: SlurmCluster) -> SlurmCluster:
    """`letstalk` (this interpreter's venv) on the jobs' PATH; this checkout and tests/ (HoldRankZero) on PYTHONPATH."""
    slurm.env["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"
    slurm.env["PYTHONPATH"] = f"{TESTS.parent}{os.pathsep}{TESTS}"  # this checkout first
    return slurm


@pytest.fixture
def cluster(slurm: SlurmCluster) -> Iterator[SlurmCluster]:
    """The session's cluster, ready for jobs; a test's jobs that are still there afterwards are cancelled, and what
    it set in the jobs' environment (e.g. LETSTALK_FAULTS, tests/test_faults.py) is undone: a later job that read
    another test's fault record would take that test's decision."""
    env = dict(slurm.env)
    yield _job_env(slurm)
    slurm.cancel_all()
    slurm.env = env


def _wait_for(path: Path, timeout: float, job: int, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        state = cluster.job(job)["JobState"]
        if state not in ("PENDING", "RUNNING", "CONFIGURING"):
            raise AssertionError(f"job {job} is {state} before {path} appeared")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} not written after {timeout:.0f} s")
        time.sleep(0.5)


def test_requeued_ddp_job_resumes_from_its_last_checkpoint(cluster: SlurmCluster, shards: Path, tmp_path: Path):
    run, log = tmp_path / "run", tmp_path / "job.out"
    steps = 20
    job = cluster.sbatch([*CPU_TASKS, f"--output={log}", str(SBATCH_SCRIPT), *fit_args(shards, run, every=5),
                          "--trainer.strategy", "ddp", "--trainer.max_steps", str(steps),
                          "--trainer.val_check_interval", "1000"], cwd=tmp_path)
    _wait_for(run / "checkpoints" / "last.ckpt", 240, job, cluster)
    cluster.scontrol("requeue", str(job))
    requeued_at = time.monotonic()
    cluster.wait(job, {"PENDING"}, 60)
    cluster.start_now(job)
    info = cluster.wait(job, ENDED, 300)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", f"{info}\n{text[-3000:]}\n{cluster.log_tail()}"
    assert info["Restarts"] == "1"
    assert "restart 0:" in text and "restart 1:" in text
    resumed = re.findall(r"resumed at step (\d+) \(SLURM_RESTART_COUNT=1\)", text)
    assert resumed and 5 <= int(resumed[0]) < steps, text[-3000:]
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == steps
    print(f"requeued at step {resumed[0]}; finished {time.monotonic() - requeued_at:.0f} s after the requeue")


def test_two_point_sweep_runs_through_slurm_to_completion(cluster: SlurmCluster, shards: Path, tmp_path: Path,
                                                           monkeypatch, capsys):
    for key in ("SLURM_CONF", "PATH"):
        monkeypatch.setenv(key, cluster.env[key])
    monkeypatch.chdir(tmp_path)  # the jobs' %x-%j.out logs
    runs = tmp_path / "runs"
    assert main(["sweep", "--grid", "model.optim.lr=1e-3,2e-3", "--runs", str(runs), "--name", "tiny",
                 "--sbatch=--gpus-per-node=0 --ntasks-per-node=1 --cpus-per-task=1", "--",
                 *fit_args(shards, None), "--trainer.max_steps", "2", "--trainer.val_check_interval", "1000"]) == 0
    jobs = [int(j) for j in re.findall(r"Submitted batch job (\d+)", capsys.readouterr().out)]
    assert len(jobs) == 2
    for job in jobs:
        info = cluster.wait(job, {"COMPLETED", "FAILED", "CANCELLED"}, 300)
        assert info["JobState"] == "COMPLETED", (tmp_path / f"tiny-{info['JobName'].split('-', 1)[1]}-{job}.out")
    for run, lr in (("lr_1e-3", 1e-3), ("lr_2e-3", 2e-3)):
        last = torch.load(runs / run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert last["global_step"] == 2 and last["hyper_parameters"]["optim"]["lr"] == pytest.approx(lr)
        assert (runs / run / "wandb_run_id").is_file()  # each point its own W&B run


def _zero2_job(cluster: SlurmCluster, shards: Path, folder: Path, hold: bool) -> tuple[int, Path, Path]:
    """A 2-task ZeRO-2 `train.sbatch` job of STEPS steps into `folder/run`, log `folder/job.out`; with `hold`, rank 0
    waits at step HOLD on the first start (slurm_cluster.HoldRankZero) until `folder/release` exists."""
    run, log = folder / "run", folder / "job.out"
    held = {"class_path": "slurm_cluster.HoldRankZero", "init_args": {"folder": str(folder), "step": HOLD}}
    job = cluster.sbatch([*CPU_TASKS, f"--output={log}", str(SBATCH_SCRIPT), *fit_args(shards, run, every=EVERY),
                          *ZERO2, "--trainer.max_steps", str(STEPS), "--trainer.val_check_interval", "1000",
                          *([f"--trainer.callbacks+={json.dumps(held)}"] if hold else [])], cwd=folder)
    return job, run, log


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    """Network and EMA weights of the run's `last` checkpoint (a DeepSpeed folder or a file), which must be of step
    STEPS."""
    last = run / "checkpoints" / "last.ckpt"
    assert last.exists() and list((run / "checkpoints").glob(f"*step={STEPS}.ckpt"))
    _, net = read_weights(last, ema=False)
    _, ema = read_weights(last, ema=True)
    return {**{f"net.{k}": v for k, v in net.items()}, **{f"ema.{k}": v for k, v in ema.items()}}


def _restarted_to_completion(cluster: SlurmCluster, job: int, log: Path) -> str:
    """Wait for the requeued job, start it now, wait for its end; its log, after checking it completed. The first
    start's processes must have ended on their own, before SLURM kills them (KILL_WAIT after its SIGTERM)."""
    stopping = time.monotonic()
    info = cluster.wait(job, {"PENDING"} | ENDED, 120)
    assert info["JobState"] == "PENDING", log.read_text()[-4000:]
    took = time.monotonic() - stopping
    print(f"job {job} pending again after {took:.0f} s")
    assert took < KILL_WAIT - 5, f"the job's processes hung until SLURM killed them: {log.read_text()[-4000:]}"
    cluster.start_now(job)
    info = cluster.wait(job, ENDED, 300)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (
        f"{info}\n{text[-4000:]}\n{cluster.log_tail()}")
    return text


def _resumed_at(text: str) -> list[int]:
    return [int(step) for step in re.findall(r"resumed at step (\d+) \(SLURM_RESTART_COUNT=1\)", text)]


def _assert_same_weights(run: Path, reference: dict[str, torch.Tensor]) -> None:
    """Bit-equal: the same 2 ranks, partitions and CPU kernels repeat the same float operations in the same order
    once the resume restored weights, Adam and EMA state, LR schedule, RNG and data position exactly (as
    tests/test_deepspeed.py's mid-epoch resume shows); any tolerance would hide a resume that is slightly off."""
    final = _final_weights(run)
    assert final.keys() == reference.keys()
    differ = [k for k in reference if not torch.equal(final[k], reference[k])]
    assert not differ, f"{len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:3]}"


@pytest.fixture(scope="module")
def uninterrupted(slurm: SlurmCluster, shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Final weights of the ZeRO-2 job that nothing interrupts: what every requeued job below must end with."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    job, run, log = _zero2_job(_job_env(slurm), shards, folder, hold=False)
    started = time.monotonic()
    info = slurm.wait(job, ENDED, 300)
    assert info["JobState"] == "COMPLETED", log.read_text()[-4000:]
    print(f"uninterrupted ZeRO-2 job: {time.monotonic() - started:.0f} s")
    return _final_weights(run)


def test_requeued_zero2_job_saves_within_kill_wait_and_ends_with_the_weights_of_an_uninterrupted_run(
        cluster: SlurmCluster, shards: Path, tmp_path: Path, uninterrupted: dict):
    """`scontrol requeue` while rank 0 lags (held at step 4) and rank 1 waits for it: SIGTERM reaches every process,
    srun included, which gives the tasks KillWait before it kills them. The ranks agree at the start of step 5, save
    at its end and leave on their own within seconds; the job resumes from that checkpoint to the weights of the
    uninterrupted run."""
    job, run, log = _zero2_job(cluster, shards, tmp_path, hold=True)
    _wait_for(tmp_path / "held", 240, job, cluster)
    cluster.scontrol("requeue", str(job))  # SIGTERM while rank 0 is held and rank 1 waits in a collective
    time.sleep(1)
    (tmp_path / "release").touch()  # rank 0 was only slower
    text = _restarted_to_completion(cluster, job, log)
    saved = run / f"requeue-step={HOLD + 1}.ckpt"
    assert f"resuming from {saved}" in text and _resumed_at(text) == [HOLD + 1], text[-4000:]
    _assert_same_weights(run, uninterrupted)


def test_usr1_saves_at_a_step_all_ranks_agree_on_then_requeues_and_resumes(cluster: SlurmCluster, shards: Path,
                                                                           tmp_path: Path, uninterrupted: dict):
    """USR1 reaches rank 0 while it is held at step 4 (in Python) and rank 1 while it waits in a collective: the ranks
    are at different points of the step, where Lightning's auto-requeue (a collective save inside the signal handler)
    breaks the job (gloo: "Received data size doesn't match expected size"; the job FAILS, nothing is requeued).
    The ranks agree at the start of step 5 and save at its end (not a ModelCheckpoint step, so that the requeue
    checkpoint is the newest)."""
    job, run, log = _zero2_job(cluster, shards, tmp_path, hold=True)
    _wait_for(tmp_path / "held", 240, job, cluster)
    subprocess.run(["scancel", "--signal=USR1", str(job)], env=cluster.env, check=True)  # every task of the job
    signalled = time.monotonic()
    time.sleep(3)  # delivered before rank 0 goes on
    (tmp_path / "release").touch()
    text = _restarted_to_completion(cluster, job, log)
    saved = run / f"requeue-step={HOLD + 1}.ckpt"  # agreed at the start of the next batch, saved at its end
    assert f"saved {saved}; job {job} requeued" in text, text[-4000:]
    assert f"resuming from {saved}" in text and _resumed_at(text) == [HOLD + 1], text[-4000:]
    assert not list(run.glob("hpc_ckpt_*")) and not list(run.glob("*.partial"))  # Lightning's handler did not act
    _assert_same_weights(run, uninterrupted)
    print(f"USR1 to completion: {time.monotonic() - signalled:.0f} s")


def test_requeue_skips_newer_half_written_checkpoints(cluster: SlurmCluster, shards: Path, tmp_path: Path,
                                                      uninterrupted: dict):
    """Newer than `last` (step 3) when the job is requeued, as a save cut short leaves them: a DeepSpeed folder
    without rank 1's optimizer shard and a truncated checkpoint file. `last` by mtime would take one of them and
    fail on every restart; the newest complete one is `last`. The tasks are killed (no save at SIGTERM), the batch
    script requeues the job after that fault."""
    job, run, log = _zero2_job(cluster, shards, tmp_path, hold=True)
    _wait_for(tmp_path / "held", 240, job, cluster)
    last, file = run / "checkpoints" / "last.ckpt", run / "checkpoints" / "last-v1.ckpt"
    folder = run / "hpc_ckpt_1.ckpt"
    shutil.copytree(last, folder, copy_function=shutil.copyfile)  # new mtimes
    next((folder / "checkpoint").glob("*rank_1_*optim_states.pt")).unlink()
    shard = next((last / "checkpoint").glob("*optim_states.pt")).read_bytes()
    file.write_bytes(shard[: len(shard) // 2])
    subprocess.run(["scancel", "--signal=KILL", f"{job}.0"], env=cluster.env, check=True)  # the step: a fault, no save
    text = _restarted_to_completion(cluster, job, log)
    assert f"skipping incomplete checkpoint {folder}: 1 optimizer shards, written by 2 ranks" in text, text[-4000:]
    assert f"skipping incomplete checkpoint {file}: not a readable torch file" in text, text[-4000:]
    assert f"resuming from {last}" in text and _resumed_at(text) == [EVERY], text[-4000:]
    _assert_same_weights(run, uninterrupted)


def _deepspeed_folder(path: Path, ranks: int, shards: int, written_at: float, folder_mtime: float) -> None:
    """A Lightning DeepSpeed checkpoint folder's layout: `latest`, model states (with `dp_world_size`), optimizer
    shards, files last written at `written_at`, the folder's own mtime `folder_mtime`."""
    tag = path / "checkpoint"
    tag.mkdir(parents=True)
    torch.save({"module": {"w": torch.zeros(2)}, "dp_world_size": ranks}, tag / "mp_rank_00_model_states.pt")
    for rank in range(shards):
        torch.save({"optimizer_state_dict": {}}, tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    (path / "latest").write_text("checkpoint")
    for file in (*tag.iterdir(), path / "latest"):
        os.utime(file, (written_at, written_at))
    os.utime(path, (folder_mtime, folder_mtime))


def test_last_is_the_newest_complete_checkpoint(tmp_path: Path, capsys):
    """No SLURM needed. `last` whose shards were overwritten in place (as ModelCheckpoint does) is newer than an
    older requeue checkpoint although its folder is older; incomplete ones are skipped, each with its reason."""
    ckpts = tmp_path / "checkpoints"
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), checkpoint_callbacks=[ModelCheckpoint(dirpath=ckpts)])
    _deepspeed_folder(ckpts / "last.ckpt", 2, 2, written_at=100, folder_mtime=10)
    _deepspeed_folder(tmp_path / "requeue-step=5.ckpt", 2, 2, written_at=50, folder_mtime=50)
    _deepspeed_folder(tmp_path / "hpc_ckpt_1.ckpt", 2, 1, written_at=200, folder_mtime=200)
    _deepspeed_folder(ckpts / "last-v2.ckpt", 2, 2, written_at=300, folder_mtime=300)
    (ckpts / "last-v2.ckpt" / "latest").unlink()
    torch.save({"state_dict": {}}, ckpts / "last-v1.ckpt")
    whole = (ckpts / "last-v1.ckpt").read_bytes()
    (ckpts / "last-v1.ckpt").write_bytes(whole[:-100])
    assert resume_checkpoint(trainer, "last") == str(ckpts / "last.ckpt")
    err = capsys.readouterr().err
    assert f"skipping incomplete checkpoint {ckpts / 'last-v1.ckpt'}: not a readable torch file" in err
    assert f"skipping incomplete checkpoint {ckpts / 'last-v2.ckpt'}: no `latest` file" in err
    assert f"checkpoint {tmp_path / 'hpc_ckpt_1.ckpt'}: 1 optimizer shards, written by 2 ranks" in err
    shutil.rmtree(ckpts / "last.ckpt")
    shutil.rmtree(tmp_path / "requeue-step=5.ckpt")
    assert resume_checkpoint(trainer, "last") is None  # nothing complete: a fresh start
    assert "starting from scratch" in capsys.readouterr().err

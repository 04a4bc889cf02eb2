"""`slurm/train.sbatch` and `letstalk sweep` against a real single-node SLURM (tests/slurm_cluster.py).

The requeue test takes 1-2 min on 2 CPU cores (two starts of a 2-task DDP job on the tiny model), the sweep
~30 s, starting the cluster ~1 s.
The requeued job's BeginTime (now + 120 s, SLURM's requeue delay) is moved to now with
`scontrol update StartTime=now`, which is what an operator may do too.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
import torch

from pipeline.cli import main
from pipeline.cli.sweep import SBATCH_SCRIPT
from slurm_cluster import SlurmCluster
from test_training import fit_args, write_shards

VENV_BIN = Path(__file__).resolve().parents[1] / ".venv" / "bin"
CPU_TASKS = ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shards(tmp_path_factory.mktemp("slurm_shards"))


@pytest.fixture
def cluster(slurm: SlurmCluster) -> SlurmCluster:
    """The session's cluster with `letstalk` (this interpreter's venv) on the jobs' PATH."""
    slurm.env["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"
    return slurm


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
    cluster.scontrol("update", f"JobId={job}", "StartTime=now")
    info = cluster.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 300)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-3000:]
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

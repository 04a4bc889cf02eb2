"""Faults a cluster throws, against a real single-node SLURM (tests/slurm_cluster.py) running `slurm/train.sbatch`
with 2 CPU tasks on the tiny model: a killed rank, a killed loader worker, preemption with and without grace, a
crash that repeats, a configuration error. Each ends the job fast, requeues it (or not) by the rules of
`pipeline/faults.py`, and the resumed job ends with the weights of an uninterrupted one. The fault table of
docs/slurm.md comes from these tests' printed lines.

The jobs are held at a known point as in tests/test_slurm.py: rank 0 waits in Python at the end of step HOLD
(slurm_cluster.HoldRankZero) while rank 1 runs into its next collective; the fault is injected there. A requeued
job's start is moved to now (`scontrol update StartTime=now`) instead of SLURM's 120 s requeue delay.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pipeline import faults
from pipeline.checkpoints import REQUEUE_PREFIX
from pipeline.cli.sweep import SBATCH_SCRIPT
from slurm_cluster import SlurmCluster, job_processes
from test_bad_data import _damage_what_only_decoding_finds
from test_slurm import (CPU_TASKS, ENDED, EVERY, HOLD, STEPS, ZERO2, _assert_same_weights, _final_weights, _job_env,
                        _wait_for, cluster, shards, uninterrupted)  # noqa: F401  (fixtures)
from test_training import fit_args, write_shards

DDP = ["--trainer.strategy", "ddp"]
STRATEGIES = {"ddp": DDP, "zero2": ZERO2}


def _job(cluster: SlurmCluster, shards: Path, folder: Path, strategy: list[str], *flags: str,
         hold: bool = True) -> tuple[int, Path, Path]:
    """A 2-task train.sbatch job of STEPS steps (checkpoints every EVERY) into `folder/run`, log `folder/job.out`,
    fault record `folder/faults.jsonl`; with `hold`, rank 0 waits at the end of step HOLD on the first start."""
    run, log = folder / "run", folder / "job.out"
    held = {"class_path": "slurm_cluster.HoldRankZero", "init_args": {"folder": str(folder), "step": HOLD}}
    cluster.env["LETSTALK_FAULTS"] = str(folder / "faults.jsonl")
    job = cluster.sbatch([*CPU_TASKS, f"--output={log}", str(SBATCH_SCRIPT), *fit_args(shards, run, every=EVERY),
                          *strategy, "--trainer.max_steps", str(STEPS), "--trainer.val_check_interval", "1000",
                          *flags, *([f"--trainer.callbacks+={json.dumps(held)}"] if hold else [])], cwd=folder)
    return job, run, log


def _processes(job: int) -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, SLURM_PROCID) of this job's `letstalk fit` task processes and their loader workers."""
    return {p.pid: (p.parent, p.rank) for p in job_processes(job) if p.rank is not None and "fit" in p.command}


def _rank(job: int, rank: int) -> int:
    """The pid of task `rank` (its parent is not another task process)."""
    procs = _processes(job)
    return next(pid for pid, (parent, r) in procs.items() if r == rank and parent not in procs)


def _worker(job: int, rank: int) -> int:
    """The pid of a loader worker of task `rank` (a child of the task process running the same command)."""
    procs, task = _processes(job), _rank(job, rank)
    return next(pid for pid, (parent, _) in procs.items() if parent == task)


def _ended_by_fault(cluster: SlurmCluster, job: int, since: float) -> float:
    """Wait until the job ended (requeued: PENDING again, or stopped); seconds from `since`, printed, not asserted:
    a job that a fault does not end stays up (rank 0 is held for 300 s) and the wait fails."""
    cluster.wait(job, {"PENDING"} | ENDED, 120)
    return time.monotonic() - since


def _restart_now(cluster: SlurmCluster, job: int, log: Path, state: str = "COMPLETED") -> str:
    cluster.start_now(job)
    info = cluster.wait(job, ENDED, 300)
    text = log.read_text()
    assert info["JobState"] == state and info["Restarts"] == "1", f"{info}\n{text[-4000:]}\n{cluster.log_tail()}"
    return text


def _resumed(text: str) -> list[int]:
    return [int(step) for step in re.findall(r"resumed at step (\d+) \(SLURM_RESTART_COUNT=1\)", text)]


@pytest.fixture(scope="module")
def uninterrupted_ddp(slurm: SlurmCluster, shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Final weights of the DDP job nothing interrupts."""
    folder = tmp_path_factory.mktemp("uninterrupted_ddp")
    job, run, log = _job(_job_env(slurm), shards, folder, DDP, hold=False)
    info = slurm.wait(job, ENDED, 300)
    assert info["JobState"] == "COMPLETED", log.read_text()[-4000:]
    return _final_weights(run)


def _reference(name: str, request: pytest.FixtureRequest) -> dict:
    return request.getfixturevalue("uninterrupted_ddp" if name == "ddp" else "uninterrupted")


def _fault_row(fault: str, strategy: str, took: float, text: str) -> None:
    """One row of the fault table in docs/slurm.md, printed (`pytest -s`)."""
    resumed = _resumed(text)
    print(f"FAULT | {fault} | {strategy} | ended {took:.0f} s after | resumed at step {resumed} of fault at {HOLD}")


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
@pytest.mark.parametrize("victim", ["rank", "worker"])
def test_a_dead_rank_or_loader_worker_ends_the_job_which_requeues_itself_and_resumes_exactly(
        cluster: SlurmCluster, shards: Path, tmp_path: Path, strategy: str, victim: str, request):
    """`kill -9` of task 1 while rank 0 is held at step HOLD and stays held (a rank busy elsewhere, which no
    collective error reaches: only srun's --kill-on-bad-exit ends it, by SIGTERM, which the rank takes as a request to
    save, and SIGKILL KillWait later), or of one of task 1's loader workers (rank 0 then goes on, and task 1 fails at
    its next batch). The batch script requeues the job (a fault, the first), and
    the job resumes from `last` (step EVERY) to the weights of an uninterrupted run."""
    job, run, log = _job(cluster, shards, tmp_path, STRATEGIES[strategy], "--data.num_workers", "1")
    _wait_for(tmp_path / "held", 240, job, cluster)
    victim_pid = _rank(job, 1) if victim == "rank" else _worker(job, 1)
    os.kill(victim_pid, signal.SIGKILL)
    killed = time.monotonic()
    if victim == "worker":  # task 1 waits in a collective, where it cannot notice its worker's death: let it go on
        (tmp_path / "release").touch()
    took = _ended_by_fault(cluster, job, killed)  # a dead rank: rank 0 still held, only srun can end it
    (tmp_path / "release").touch()
    text = _restart_now(cluster, job, log)
    assert "ended by a fault" in text and "fault 1 of at most 3" in text and "requeueing" in text, text[-4000:]
    assert _resumed(text) == [EVERY], text[-4000:]
    _assert_same_weights(run, _reference(strategy, request))
    _fault_row(f"kill -9 of a {'rank' if victim == 'rank' else 'loader worker'}", strategy, took, text)


def test_a_hung_rank_ends_the_job_by_the_process_group_timeout(cluster: SlurmCluster, shards: Path, tmp_path: Path,
                                                                uninterrupted_ddp: dict):
    """Task 1 stopped (`kill -STOP`: a rank stuck on a GPU or a filesystem, alive but silent) while rank 0 is held
    at step HOLD; rank 0 then waits in its next collective until the process-group timeout (20 s here, 10 min in the
    trainer configs) fails it, srun's --kill-on-bad-exit ends the stopped task, and the job requeues itself and
    resumes from `last` to the weights of an uninterrupted run."""
    ddp = {"class_path": "lightning.pytorch.strategies.DDPStrategy", "init_args": {"timeout": "0:00:20"}}
    job, run, log = _job(cluster, shards, tmp_path, ["--trainer.strategy", json.dumps(ddp)])
    _wait_for(tmp_path / "held", 240, job, cluster)
    os.kill(_rank(job, 1), signal.SIGSTOP)
    stopped = time.monotonic()
    (tmp_path / "release").touch()
    took = _ended_by_fault(cluster, job, stopped)
    text = _restart_now(cluster, job, log)
    assert "ended by a fault" in text and "fault 1 of at most 3" in text, text[-4000:]
    assert _resumed(text) == [EVERY], text[-4000:]
    _assert_same_weights(run, uninterrupted_ddp)
    _fault_row("a rank hangs (kill -STOP), process-group timeout 20 s", "ddp", took, text)


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_preemption_with_grace_saves_at_the_step_end_and_resumes_exactly(cluster: SlurmCluster, shards: Path,
                                                                        tmp_path: Path, strategy: str, request):
    """Preemption's SIGTERM (what PreemptMode=REQUEUE sends to the tasks and their children, not to srun: `scancel
    --signal=TERM`) while rank 0 is held at step HOLD and rank 1 waits in a collective, with loader workers running.
    The workers ignore it, the ranks agree at the start of step HOLD + 1, save at its end, requeue and leave; the
    job resumes from that checkpoint to the weights of an uninterrupted run."""
    job, run, log = _job(cluster, shards, tmp_path, STRATEGIES[strategy], "--data.num_workers", "1")
    _wait_for(tmp_path / "held", 240, job, cluster)
    subprocess.run(["scancel", "--signal=TERM", str(job)], env=cluster.env, check=True)
    signalled = time.monotonic()
    time.sleep(3)  # delivered before rank 0 goes on
    (tmp_path / "release").touch()
    took = _ended_by_fault(cluster, job, signalled)
    text = _restart_now(cluster, job, log)
    saved = run / f"requeue-step={HOLD + 1}.ckpt"
    assert f"SIGTERM on rank 0: saving at the end of step {HOLD + 1}" in text, text[-4000:]
    assert f"saved {saved}; job {job} requeued" in text and "ended by a fault" not in text, text[-4000:]
    assert f"resuming from {saved}" in text and _resumed(text) == [HOLD + 1], text[-4000:]
    _assert_same_weights(run, _reference(strategy, request))
    _fault_row("preemption: SIGTERM, grace long enough for a step and a save", strategy, took, text)


def test_preemption_without_grace_resumes_from_the_last_complete_checkpoint(cluster: SlurmCluster, shards: Path,
                                                                            tmp_path: Path, uninterrupted: dict):
    """Preemption's SIGTERM, then the requeue at the end of a grace too short for the save (SIGTERM to srun too,
    which SIGKILLs the tasks) while rank 0 is still held: nothing half-written is taken, the job resumes from `last`
    (step EVERY) to the weights of an uninterrupted run."""
    job, run, log = _job(cluster, shards, tmp_path, ZERO2, "--data.num_workers", "1")
    _wait_for(tmp_path / "held", 240, job, cluster)
    subprocess.run(["scancel", "--signal=TERM", str(job)], env=cluster.env, check=True)
    signalled = time.monotonic()
    time.sleep(1)
    cluster.scontrol("requeue", str(job))
    took = _ended_by_fault(cluster, job, signalled)
    (tmp_path / "release").touch()
    text = _restart_now(cluster, job, log)
    assert not list(run.glob(f"{REQUEUE_PREFIX}*")), text[-4000:]  # the save never finished: nothing to take
    assert _resumed(text) == [EVERY] and "ended by a fault" not in text, text[-4000:]
    _assert_same_weights(run, uninterrupted)
    _fault_row("preemption: SIGTERM, grace shorter than a step and a save", "zero2", took, text)


def test_a_crash_that_repeats_at_the_same_step_stops_after_one_restart(cluster: SlurmCluster, tmp_path: Path):
    """Damaged samples under `data.max_bad_samples 0`: every start stops at the same point (the shard index finds
    them at start). The first start's fault requeues the job, the second's stops it, naming the error and where."""
    shards = write_shards(tmp_path / "shards")
    _damage_what_only_decoding_finds(shards)
    job, run, log = _job(cluster, shards, tmp_path, DDP, "--data.max_bad_samples", "0", "--data.val_percent", "0",
                         hold=False)
    started = time.monotonic()
    while not any("decision" in r for r in faults.read(tmp_path / "faults.jsonl")):  # the first start has ended (the
        assert time.monotonic() - started < 240, log.read_text()[-4000:]  # job is PENDING before it starts, too)
        time.sleep(0.5)
    info = cluster.wait(job, {"PENDING"} | ENDED, 240)
    assert info["JobState"] == "PENDING", log.read_text()[-4000:]
    text = _restart_now(cluster, job, log, state="FAILED")
    stop = re.search(r"the same (\w+) at (start|step \d+) as the previous start, a deterministic crash", text)
    assert stop and stop.group(1) == "TooManyBadSamples", text[-4000:]
    decisions = [r["decision"] for r in faults.read(tmp_path / "faults.jsonl") if "decision" in r]
    assert decisions == ["requeue", "stop"]
    print(f"FAULT | the same crash at {stop.group(2)} of every start | ddp | stopped after 1 restart, "
          f"{time.monotonic() - started:.0f} s in all")


def test_a_configuration_error_is_not_restarted(cluster: SlurmCluster, shards: Path, tmp_path: Path):
    job, _, log = _job(cluster, shards, tmp_path, DDP, "--data.clip_frames", "99", hold=False)
    info = cluster.wait(job, ENDED, 240)
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", text[-4000:]
    assert "a configuration error, which would fail again" in text and "stopping" in text, text[-4000:]


def test_the_restart_rules():
    """pipeline.faults.decide without SLURM: configuration errors, the restart budget, a repeated crash."""
    crash = {"attempt": 0, "rank": 0, "step": 7, "kind": "crash", "error": "RuntimeError: worker killed"}
    assert faults.decide([crash], 0) == (True, "fault 1 of at most 3 (rank 0 at step 7: RuntimeError: worker killed)")
    config = {**crash, "kind": "config", "step": None}
    assert not faults.decide([config], 0)[0]
    same = [crash, {"attempt": 0, "decision": "requeue"}, {**crash, "attempt": 1}]
    requeue, why = faults.decide(same, 1)
    assert not requeue and "the same RuntimeError at step 7" in why
    assert faults.decide([crash, {"attempt": 0, "decision": "requeue"}, {**crash, "attempt": 1, "step": 9}], 1)[0]
    spent = [{"attempt": a, "decision": "requeue"} for a in range(3)] + [{**crash, "attempt": 3, "step": 12}]
    requeue, why = faults.decide(spent, 3)
    assert not requeue and "3 restarts after faults already, LETSTALK_MAX_RESTARTS=3" in why
    assert faults.decide(spent, 3, max_restarts=4)[0]
    at_start = {**crash, "step": None, "error": "TooManyBadSamples: 1 distinct damaged sample"}
    requeue, why = faults.decide([at_start, {"attempt": 0, "decision": "requeue"}, {**at_start, "attempt": 1}], 1)
    assert not requeue and "the same TooManyBadSamples at start as the previous start" in why
    killed = faults.decide([], 2)
    assert killed[0] and "no rank recorded an error" in killed[1]
    full = {**crash, "kind": "space", "error": "CheckpointSpaceError: no space to save checkpoint last.ckpt"}
    requeue, why = faults.decide([full], 0)
    assert not requeue and "the disk is full" in why and "scontrol requeue" in why


def test_a_full_disk_at_a_checkpoint_is_recorded_as_such(tmp_path, monkeypatch):
    """FaultLog tells a full disk from a crash, so the job is not restarted into the same full disk."""
    from types import SimpleNamespace

    from lightning_modules.requeue import FaultLog
    from lightning_modules.trainer import CheckpointSpaceError

    monkeypatch.setenv("LETSTALK_FAULTS", str(tmp_path / "faults.jsonl"))
    trainer = SimpleNamespace(global_step=4, global_rank=1)
    FaultLog().on_exception(trainer, None, CheckpointSpaceError("no space to save checkpoint last.ckpt"))
    FaultLog().on_exception(trainer, None, RuntimeError("worker killed"))
    assert [(r["kind"], r["rank"], r["step"]) for r in faults.read(tmp_path / "faults.jsonl")] == [
        ("space", 1, 4), ("crash", 1, 4)]

"""A real SLURM (munge + slurmctld + one slurmd per node, all on loopback) in a private state folder, for tests.

Needs Debian's `slurm-wlm` and `munge` (CI installs them) and root (slurmd runs the jobs as the submitter,
which on a single test node needs root). Every daemon writes only under the state folder; `stop` kills
them by the pids they wrote there. `HoldRankZero` is a callback that test jobs load by class path (tests/ on
their PYTHONPATH) to stop a job at a known step.

Several nodes on one machine (`SlurmCluster(..., nodes=2)`): nodes n0, n1, ... each with its own slurmd
(`slurmd -N n0`), port, spool, pid and log file (SLURM's `%n`), all at NodeHostname localhost and NodeAddr
127.0.0.1. Debian's slurm-wlm 22.05 runs them side by side (checked: both idle, a `--nodes=2` job's tasks get
SLURM_NODEID 0 and 1). Their CPUs are declared, not detected (`SlurmdParameters=config_overrides`), so the
nodes may together declare more CPUs than the machine has. A node name other than localhost does not resolve:
a multi-node job's ranks need MASTER_ADDR=127.0.0.1 in the environment (Lightning takes it before the node list).
"""

from __future__ import annotations

import faulthandler
import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L

SBIN = Path("/usr/sbin")
MUNGE_KEY = Path("/etc/munge/munge.key")
KILL_WAIT = 30  # s from SIGTERM to SIGKILL when a job is cancelled or requeued (SLURM's default)

SLURM_CONF = """\
ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge}/munge.socket.2
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation={S}/state
SlurmdSpoolDir={S}/spool{node_part}
SlurmctldPidFile={S}/slurmctld.pid
SlurmdPidFile={S}/slurmd{node_part}.pid
SlurmctldLogFile={S}/log/slurmctld.log
SlurmdLogFile={S}/log/slurmd{node_part}.log
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmdParameters=config_overrides
JobRequeue=1
KillWait={kill_wait}
MinJobAge=300
{node_lines}
PartitionName=debug Nodes={node_names} Default=YES MaxTime=INFINITE State=UP
"""


def missing() -> str | None:
    """Why a cluster cannot be started here, or None when it can."""
    for daemon in ("munged", "slurmctld", "slurmd"):
        if not (SBIN / daemon).is_file():
            return f"{SBIN / daemon} is not installed (apt-get install slurm-wlm munge)"
    if shutil.which("sbatch") is None:
        return "sbatch is not on PATH (apt-get install slurm-wlm)"
    if os.geteuid() != 0:
        return "starting slurmd/munged needs root"
    if not MUNGE_KEY.is_file():
        return f"{MUNGE_KEY} is missing (the munge package creates it)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """Daemons of one cluster; `env` is the environment (SLURM_CONF) in which to call sbatch/scontrol."""

    def __init__(self, state: Path, cpus: int = 2, nodes: int = 1):
        """`cpus` per node; one node is `localhost`, several are n0, n1, ... (see the module docstring)."""
        self.state = state
        self.nodes = ["localhost"] if nodes == 1 else [f"n{i}" for i in range(nodes)]
        self.conf = state / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        for sub in ("state", "spool", "log"):
            (state / sub).mkdir(parents=True, exist_ok=True)
        # munged runs as user munge: its folder must be reachable by it (test tmp folders are 0700) and its own
        self.munge = Path(tempfile.mkdtemp(prefix="letstalk-munge-"))
        shutil.chown(self.munge, "munge", "munge")
        self.munge.chmod(0o755)
        if nodes == 1:
            node_lines = f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 State=UNKNOWN"
        else:  # one slurmd per node on this machine, each on its own port and spool. A job step's messages are
            # forwarded between the slurmds: on a machine loaded ~8x over its cores both logged "Socket timed out"
            # (the default 10 s) at about the time the ranks would finish, and the job stayed RUNNING; allow 60 s
            for node in self.nodes:
                (state / f"spool-{node}").mkdir(exist_ok=True)
            node_lines = "MessageTimeout=60\n" + "\n".join(
                f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={_free_port()} CPUs={cpus} "
                "RealMemory=4000 State=UNKNOWN" for name in self.nodes)
        self.conf.write_text(SLURM_CONF.format(S=state, munge=self.munge, ctld_port=_free_port(), d_port=_free_port(),
                                               cpus=cpus, kill_wait=KILL_WAIT, node_lines=node_lines,
                                               node_names=",".join(self.nodes), node_part="" if nodes == 1 else "-%n"))

    def start(self, timeout: float = 60.0) -> None:
        m = self.munge
        self._run(["runuser", "-u", "munge", "--", str(SBIN / "munged"), f"--socket={m}/munge.socket.2",
                   f"--key-file={MUNGE_KEY}", f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
                   f"--seed-file={m}/munged.seed"])
        self._run([str(SBIN / "slurmctld"), "-f", str(self.conf)])
        for node in self.nodes:
            self._run([str(SBIN / "slurmd"), "-f", str(self.conf), "-N", node])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._node_state() == "idle":
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SLURM nodes not all idle after {timeout:.0f} s; see {self.state / 'log'}")

    def _run(self, argv: list[str]) -> None:
        result = subprocess.run(argv, env=self.env, capture_output=True, text=True)
        if result.returncode:
            self.stop()
            raise RuntimeError(f"{argv[0]} failed to start: {result.stderr.strip()}; see {self.state / 'log'}")

    def stop(self) -> None:
        """Kill the daemons this cluster started (by the pid files they wrote)."""
        for path in (*self._slurmd_files("", ".pid"), self.state / "slurmctld.pid", self.munge / "munged.pid"):
            if not path.is_file():
                continue
            pid = int(path.read_text().strip())
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):  # up to 10 s for a clean exit
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.munge, ignore_errors=True)

    def sbatch(self, argv: list[str], cwd: Path) -> int:
        """Submit; returns the job id."""
        result = subprocess.run(["sbatch", "--parsable", *argv], env=self.env, cwd=cwd, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"sbatch failed: {result.stderr.strip()}")
        return int(result.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], env=self.env, capture_output=True,
                             text=True, check=True).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def scontrol(self, *args: str) -> None:
        subprocess.run(["scontrol", *args], env=self.env, capture_output=True, text=True, check=True)

    def cancel_all(self) -> None:
        """Cancel every job of this cluster (a failed test leaves none running for the next)."""
        subprocess.run(["scancel", f"--user={getpass.getuser()}"], env=self.env, capture_output=True, text=True)

    def wait_idle(self, timeout: float) -> None:
        """Poll until the node is idle: a requeued job's previous start has released it (its processes are gone).
        SLURM's requeue delay (~120 s) gives this time; a test that starts the job at once must wait for it."""
        deadline = time.monotonic() + timeout
        while (state := self._node_state()) != "idle":
            if time.monotonic() > deadline:
                raise TimeoutError(f"node still {state} after {timeout:.0f} s\n{self.log_tail()}")
            time.sleep(0.5)

    def start_now(self, job: int, timeout: float = 60) -> None:
        """Start a requeued job now instead of after SLURM's requeue delay (~120 s), once that delay's reasons are
        gone: the node is idle, no process of the job's previous start is left (slurmstepds included; slurmd refuses
        a start before: "Job 3 already killed, do not launch batch job"), and 2 s have passed since, so the new job
        credential is dated after slurmd's revocation of the old one, which a loaded slurmd may record only as the
        last process goes ("Job credential revoked" otherwise)."""
        self.wait_idle(timeout)
        deadline = time.monotonic() + timeout
        while job_processes(job):
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job}'s processes still there after {timeout:.0f} s")
            time.sleep(0.5)
        time.sleep(2)
        self.scontrol("update", f"JobId={job}", "StartTime=now")

    def _slurmd_files(self, folder: str, suffix: str) -> list[Path]:
        """Each slurmd's file: `slurmd.pid` for the single node, `slurmd-n0.pid`, ... for several."""
        names = ["slurmd"] if self.nodes == ["localhost"] else [f"slurmd-{node}" for node in self.nodes]
        return [self.state / folder / f"{name}{suffix}" for name in names]

    def _node_state(self) -> str:
        """The nodes' state when all share one (sinfo prints a line per state), else their states on one line."""
        return " ".join(sorted(set(subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True,
                                                  text=True).stdout.split())))

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of slurmctld's and slurmd's logs: why a job failed to start, for a failing test's message."""
        parts = []
        for path in (self.state / "log" / "slurmctld.log", *self._slurmd_files("log", ".log")):
            name = path.name
            text = path.read_text(errors="replace").splitlines()[-lines:] if path.is_file() else ["(no log)"]
            parts.append(f"--- {name}\n" + "\n".join(text))
        return "\n".join(parts)

    def wait(self, job_id: int, states: set[str], timeout: float) -> dict[str, str]:
        """Poll until the job is in one of `states`; a clear error with the job record otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info["JobState"] in states:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info['JobState']} after {timeout:.0f} s (wanted {states})")
            time.sleep(1.0)


class HoldRankZero(L.Callback):
    """On a job's first start only (no SLURM_RESTART_COUNT), rank 0 stops at the end of training step `step`, creates
    `<folder>/held` and waits, in Python (signals are handled), until `<folder>/release` exists or `timeout` s pass.
    The other ranks run on into their next collective and wait there: a deterministic point mid-run with the ranks
    at different points of a step, which is where a signal usually finds them. Weights are not touched."""

    def __init__(self, folder: str, step: int, timeout: float = 300.0):
        self.folder, self.step, self.timeout = Path(folder), step, timeout
        faulthandler.register(signal.SIGUSR2, all_threads=True)  # `scancel --signal=USR2`: stacks to the job log

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        restarted = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        if trainer.global_step != self.step or not trainer.is_global_zero or restarted:
            return
        (self.folder / "held").touch()
        deadline = time.monotonic() + self.timeout
        while not (self.folder / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.1)


@dataclass(frozen=True)
class JobProcess:
    pid: int
    parent: int
    rank: int | None  # SLURM_PROCID of a task process or its loader worker; None for a slurmstepd
    command: str


def job_processes(job: int) -> list[JobProcess]:
    """The job's processes: its slurmstepds, and the `letstalk` processes whose environment names the job (task
    processes and their loader workers)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            env = dict(e.split("=", 1) for e in (proc / "environ").read_text().split("\0") if "=" in e)
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        if cmd.startswith(f"slurmstepd: [{job}.") or ("letstalk" in cmd and env.get("SLURM_JOB_ID") == str(job)):
            rank = env.get("SLURM_PROCID")
            found.append(JobProcess(int(proc.name), parent, None if rank is None else int(rank), cmd))
    return found

"""A SLURM training job that ends by a fault: what each rank records, and whether the job requeues itself.

`slurm/train.sbatch` runs `srun --kill-on-bad-exit=1 letstalk fit ...`, so one rank or loader worker that dies ends
every task of the step at once. SLURM's `--requeue` restarts a job only after preemption or a node failure; a job
that failed stays failed. So when `srun` ends non-zero and the batch script was not itself signalled (a preemption,
`scancel`, the USR1 requeue: SLURM decides those), the script asks `decide` (`python -m pipeline.faults`) and
requeues the job (`scontrol requeue`), which resumes from the newest complete checkpoint (`--ckpt_path last`).

The record: a JSON-lines file named by `LETSTALK_FAULTS` (train.sbatch: `letstalk-<job id>.faults.jsonl` in the
submit folder). Every rank whose fit raises appends one line, `{"attempt", "rank", "step", "kind", "error"}`
(`attempt` is SLURM_RESTART_COUNT; `kind` is "config" for a configuration error, which would fail again, "space"
for a checkpoint that found the disk full, else "crash"); a rank killed outright writes nothing. After each fault the script appends the decision,
`{"attempt", "decision", "reason"}`.

The rules, first match wins:
1. a configuration error, or a full disk at a checkpoint: stop (a restart would fail the same way again; once space
   is freed, `scontrol requeue <job>` resumes it from the newest complete checkpoint);
2. `LETSTALK_MAX_RESTARTS` (default 3) fault restarts already made: stop. Requeues on USR1 near the time limit and
   after preemption are not faults and do not count;
3. the same error at the same step as the previous attempt (a deterministic crash, e.g. a sample that always
   raises under `data.max_bad_samples: 0`): stop, after one restart;
4. else: requeue.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

MAX_RESTARTS = 3  # LETSTALK_MAX_RESTARTS
CONFIG = "config"
SPACE = "space"
CRASH = "crash"


def attempt() -> int:
    """This start of the job: SLURM_RESTART_COUNT (0 on the first)."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def record(error: BaseException, step: int | None, rank: int, kind: str = CRASH) -> None:
    """Append this rank's fault to `LETSTALK_FAULTS` (nothing when it is unset: not a train.sbatch job)."""
    path = os.environ.get("LETSTALK_FAULTS")
    if not path or getattr(error, "_fault_recorded", False):  # once: by FaultLog in fit, else by the CLI
        return
    error._fault_recorded = True
    line = {"attempt": attempt(), "rank": rank, "step": step, "kind": kind,
            "error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]}
    with open(path, "a") as file:  # one short line per write: appends from several ranks do not interleave
        file.write(json.dumps(line) + "\n")


def read(path: str | Path) -> list[dict[str, Any]]:
    """The file's records, in order; none if it does not exist. A line cut by a kill is ignored."""
    records = []
    if Path(path).is_file():
        for text in Path(path).read_text().splitlines():
            try:
                records.append(json.loads(text))
            except json.JSONDecodeError:
                continue
    return records


def _when(step: int | None) -> str:
    return "start" if step is None else f"step {step}"


def _signature(entry: dict[str, Any]) -> tuple[Any, str]:
    """(step, error type) of a fault: the same crash repeats both."""
    return entry.get("step"), str(entry.get("error", "")).split(":", 1)[0]


def decide(records: list[dict[str, Any]], now: int, max_restarts: int = MAX_RESTARTS) -> tuple[bool, str]:
    """(requeue?, why) for attempt `now`, which ended by a fault, given the file's records (module doc's rules)."""
    faults = [r for r in records if "decision" not in r and r.get("attempt") == now]
    seen = "; ".join(sorted({f"rank {r.get('rank')} at {_when(r.get('step'))}: {r.get('error')}" for r in faults}))
    seen = seen or "no rank recorded an error (a rank or the node was killed)"
    if any(r.get("kind") == CONFIG for r in faults):
        return False, f"a configuration error, which would fail again ({seen}): not requeued"
    if any(r.get("kind") == SPACE for r in faults):
        return False, (f"the disk is full where checkpoints go, and a restart would fail at the same save ({seen}): "
                       "not requeued; free space, then `scontrol requeue` the job to resume it")
    restarts = sum(1 for r in records if r.get("decision") == "requeue")
    if restarts >= max_restarts:
        return False, f"{restarts} restarts after faults already, LETSTALK_MAX_RESTARTS={max_restarts} ({seen})"
    before = {_signature(r) for r in records if "decision" not in r and r.get("attempt") == now - 1}
    again = sorted({_signature(r) for r in faults} & before, key=str)
    if again:
        step, error = again[-1]
        return False, f"the same {error} at {_when(step)} as the previous start, a deterministic crash ({seen})"
    return True, f"fault {restarts + 1} of at most {max_restarts} ({seen})"


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.faults FILE`: print the decision for this attempt and record it; exit 0 to requeue."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.faults", description=__doc__.split("\n\n")[0])
    parser.add_argument("file", help="the job's fault record (LETSTALK_FAULTS)")
    parser.add_argument("--status", type=int, required=True, help="srun's exit status")
    args = parser.parse_args(argv)
    limit = int(os.environ.get("LETSTALK_MAX_RESTARTS") or MAX_RESTARTS)
    requeue, why = decide(read(args.file), attempt(), limit)
    with open(args.file, "a") as file:
        file.write(json.dumps({"attempt": attempt(), "decision": "requeue" if requeue else "stop",
                               "reason": why}) + "\n")
    verb = "requeueing; it resumes from the newest complete checkpoint" if requeue else "stopping"
    print(f"letstalk: attempt {attempt()} ended by a fault (srun exit {args.status}): {why}; {verb}", flush=True)
    return 0 if requeue else 1


if __name__ == "__main__":
    sys.exit(main())

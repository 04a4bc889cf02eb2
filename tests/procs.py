"""Run a multi-process job (a `letstalk fit` whose ranks Lightning launches) so that a hang fails its test with
every rank's Python stack instead of stalling the suite: the job gets its own process group and faulthandler;
past `timeout` the group gets SIGABRT (each Python process prints its threads' stacks to the shared stderr),
then SIGKILL, so no rank outlives the test."""

from __future__ import annotations

import os
import signal
import subprocess


def run_job(argv: list[str], timeout: float, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    """`subprocess.run(argv, capture_output=True, text=True)` with the hang handling above."""
    env = {**(os.environ if env is None else env), "PYTHONFAULTHANDLER": "1"}
    with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True, **kw) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGABRT)
            try:
                out, err = process.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                out, err = process.communicate()
            raise AssertionError(f"{' '.join(argv[:4])} ... hung for {timeout:.0f} s; its stacks:\n{err[-8000:]}")
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # a rank the launcher left behind
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(argv, process.returncode, out, err)

"""`letstalk sweep`: one SLURM job per point of a grid over config keys (model sizes by default).

Each point gets its own run folder (`<runs>/<name>`) and the sweep's W&B group (WANDB_RUN_GROUP),
and is submitted as `sbatch slurm/train.sbatch <fit args> --<key> <value> ...`. `--dry-run`
prints the commands instead of submitting them.
"""

from __future__ import annotations

import itertools
import os
import shlex
import subprocess
from pathlib import Path

from pipeline.shipped import SBATCH_SCRIPT

DEFAULT_GRID = ["model.net.size=S,B,L,XL"]


def parse_grid(specs: list[str]) -> dict[str, list[str]]:
    """["model.net.size=S,B", "model.optim.lr=1e-4,3e-4"] -> {key: [values]}; clear errors for bad specs."""
    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        items = [v for v in values.split(",") if v]
        if not sep or not key or not items:
            raise ValueError(f"grid entry {spec!r}: expected KEY=VALUE[,VALUE...], e.g. model.net.size=S,B,L,XL")
        if key in grid:
            raise ValueError(f"grid entry {spec!r}: key {key} given twice")
        grid[key] = items
    return grid


def sweep_commands(fit_args: list[str], grid: dict[str, list[str]], runs: str | Path, name: str,
                   sbatch_args: list[str] = ()) -> list[tuple[str, list[str], dict[str, str]]]:
    """(run name, sbatch argv, extra environment) for each grid point, in grid order."""
    jobs = []
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values))
        run = "-".join(f"{key.rsplit('.', 1)[-1]}_{value}" for key, value in point.items())
        overrides = [arg for key, value in point.items() for arg in (f"--{key}", value)]
        argv = ["sbatch", f"--job-name={name}-{run}", *sbatch_args, str(SBATCH_SCRIPT), *fit_args, *overrides,
                "--trainer.default_root_dir", str(Path(runs) / run)]
        jobs.append((run, argv, {"WANDB_RUN_GROUP": name}))
    return jobs


def run_sweep(fit_args: list[str], grid_specs: list[str] | None, runs: str, name: str, sbatch_args: list[str],
              dry_run: bool) -> list[str]:
    """Submit (or print) one job per grid point; returns the printed command lines."""
    jobs = sweep_commands(fit_args, parse_grid(grid_specs or DEFAULT_GRID), runs, name, sbatch_args)
    lines = []
    for run, argv, env in jobs:
        line = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(argv)
        lines.append(line)
        print(line)
        if not dry_run:
            result = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True)
            if result.returncode:
                raise OSError(f"sbatch failed for {run}: {result.stderr.strip()}")
            print(f"  {result.stdout.strip()}")
    return lines

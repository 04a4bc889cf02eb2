"""`letstalk sweep`: one sbatch command per grid point, each a valid `letstalk fit` config with its own run folder."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.cli.sweep import SBATCH_SCRIPT, parse_grid, sweep_commands
from pipeline.shipped import CONFIGS



def test_default_grid_is_the_model_sizes_with_separate_runs_and_one_group(capsys):
    assert main(["sweep", "--dry-run", "--name", "sizes", "--sbatch=--nodes=2 --time=2:00:00", "--",
                 "--config", str(CONFIGS / "demo.yaml")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    for line, size in zip(lines, ["S", "B", "L", "XL"]):
        argv = shlex.split(line)
        assert argv[:4] == ["WANDB_RUN_GROUP=sizes", "sbatch", f"--job-name=sizes-size_{size}", "--nodes=2"]
        assert argv[argv.index(str(SBATCH_SCRIPT)) - 1] == "--time=2:00:00"
        assert argv[argv.index("--model.net.size") + 1] == size
        assert argv[-2:] == ["--trainer.default_root_dir", f"runs/sweep/size_{size}"]


def test_product_grid_and_each_point_parses_as_a_fit_config(tmp_path: Path):
    grid = parse_grid(["model.net.size=tiny,S", "model.optim.lr=1e-4,3e-4,1e-3"])
    jobs = sweep_commands(["--config", str(CONFIGS / "demo.yaml")], grid, tmp_path, "g")
    assert len(jobs) == 6 and len({run for run, _, _ in jobs}) == 6
    run, argv, env = jobs[4]
    assert (run, env) == ("size_S-lr_3e-4", {"WANDB_RUN_GROUP": "g"})
    fit_args = argv[argv.index(str(SBATCH_SCRIPT)) + 1:]
    printed = subprocess.run([sys.executable, "-m", "pipeline.cli", "fit", *fit_args, "--print_config"],
                             check=True, capture_output=True, text=True).stdout
    config = yaml.safe_load(printed)
    assert config["model"]["net"]["size"] == "S" and config["model"]["optim"]["lr"] == pytest.approx(3e-4)
    assert config["trainer"]["default_root_dir"] == str(tmp_path / run)
    assert config["trainer"]["callbacks"][0]["init_args"]["dirpath"] == str(tmp_path / run / "checkpoints")


@pytest.mark.parametrize("spec", ["model.net.size", "=S", "model.net.size="])
def test_bad_grid_entries_are_explained(spec: str):
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_grid([spec])
    with pytest.raises(ValueError, match="given twice"):
        parse_grid(["a=1", "a=2"])


def test_sbatch_script_launches_fit_with_srun_and_requeues():
    text = SBATCH_SCRIPT.read_text()
    assert "#SBATCH --signal=USR1@" in text and "#SBATCH --requeue" in text
    assert 'srun --kill-on-bad-exit=1 letstalk fit --ckpt_path last "$@"' in text  # one dead task ends them all
    assert 'python -m pipeline.faults "$LETSTALK_FAULTS"' in text  # after a fault: requeue or stop
    assert subprocess.run(["bash", "-n", str(SBATCH_SCRIPT)]).returncode == 0

"""The configs and SLURM scripts that ship with LetsTalk.

The repository's `configs/` and `slurm/` folders are installed as the data packages `letstalk_configs` and
`letstalk_slurm` (pyproject.toml), so a non-editable `pip install` has them too; in a checkout (an editable install)
they are the repository's folders themselves. `letstalk paths` prints where they are.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def _folder(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{package} is not installed: reinstall letstalk (`pip install .`)")
    return Path(next(iter(spec.submodule_search_locations)))


CONFIGS = _folder("letstalk_configs")  # base.yaml, demo.yaml, model/, trainer/, fusion/, init/
SLURM = _folder("letstalk_slurm")  # train.sbatch, prepare.sbatch, sweep_wandb.yaml
SBATCH_SCRIPT = SLURM / "train.sbatch"

"""A non-editable install works whole: the wheel built from this checkout, installed into a folder of its own and run
from another directory, finds its shipped configs and SLURM scripts (pipeline/shipped.py) and runs the demo.

The wheel is built without build isolation (setuptools from the `test` extra: nothing is downloaded) from a copy
of the sources, and installed with `--no-deps --target`: its dependencies are this venv's. The installed copy comes
first on PYTHONPATH, before this checkout's editable install, and the test checks that it is the one that runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "README.md", "pipeline", "datamodules", "lightning_modules", "configs", "slurm"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """(the install folder, the environment that runs it)."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-cache-dir"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "wheel"), str(src)],
                   check=True, capture_output=True, cwd=tmp)
    site = tmp / "site"
    wheel = next((tmp / "wheel").glob("letstalk-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "-q", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, cwd=tmp)
    env = {**os.environ, "PYTHONPATH": str(site), "WANDB_MODE": "offline"}
    return site, env


def _letstalk(installed: tuple[Path, dict], *args: str, cwd: Path) -> str:
    site, env = installed
    done = subprocess.run([str(site / "bin" / "letstalk"), *args], capture_output=True, text=True, env=env, cwd=cwd)
    assert done.returncode == 0, f"letstalk {' '.join(args)}: {done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def test_the_installed_package_finds_its_configs_and_scripts(installed, tmp_path: Path):
    site, _ = installed
    assert _letstalk(installed, "--version", cwd=tmp_path).strip() == "letstalk 0.1.0"
    paths = dict(line.split(maxsplit=1) for line in _letstalk(installed, "paths", cwd=tmp_path).splitlines())
    assert paths == {"configs": str(site / "letstalk_configs"), "slurm": str(site / "letstalk_slurm")}
    configs = Path(paths["configs"])
    assert {p.relative_to(configs) for p in configs.rglob("*.yaml")} == \
        {p.relative_to(REPO / "configs") for p in (REPO / "configs").rglob("*.yaml")}
    resolved = _letstalk(installed, "fit", "--config", str(configs / "base.yaml"), "--config",
                         str(configs / "model" / "b.yaml"), "--data.root", "/data/shards", "--print_config",
                         cwd=tmp_path)
    assert "size: B" in resolved and "motion_frames: 2" in resolved
    dry = _letstalk(installed, "sweep", "--dry-run", "--", "--config", str(configs / "demo.yaml"), cwd=tmp_path)
    assert str(site / "letstalk_slurm" / "train.sbatch") in dry and len(dry.splitlines()) == 4  # S, B, L, XL


def test_the_installed_package_runs_the_fast_demo(installed, tmp_path: Path):
    site, env = installed
    code = "import pipeline, json; print(pipeline.__file__)"
    where = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert where.stdout.strip() == str(site / "pipeline" / "__init__.py")  # the installed copy, not this checkout
    _letstalk(installed, "demo", "--fast", "--out", str(tmp_path / "demo"), cwd=tmp_path)
    assert (tmp_path / "demo" / "demo.json").exists() and list((tmp_path / "demo").glob("generated_*.mp4"))


def test_every_python_package_of_the_repository_is_in_the_wheel_list():
    """pyproject.toml lists its packages by name (configs/ and slurm/ ship under other names): a new subpackage
    missing from the list installs without its code and fails only outside a checkout."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(REPO).parts) for top in ("pipeline", "datamodules", "lightning_modules")
             for init in (REPO / top).rglob("__init__.py")}
    assert found - listed == set()

"""Benchmarks that must keep working where they cannot be measured here: the GPU check's dry run (its plan,
wheelhouse and size limits) and a few steps of the training throughput harness."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("install", "env", "gpu_tests", "train_throughput", "data", "zero2_fit", "generate_speed", "vae_encode")


def wheel_names() -> list[str]:
    """A wheel file name for each line of benchmarks/gpu_wheels.txt."""
    lines = [line.split("#")[0].strip() for line in (ROOT / "benchmarks" / "gpu_wheels.txt").read_text().splitlines()]
    return [f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
            for name, version in (line.split("==") for line in lines if line)]


def dry_run(wheels: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", str(out)],
                          env={"PATH": "/usr/bin:/bin", "GPU_WHEELS": str(wheels)}, capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def wheelhouse(tmp_path: Path) -> Path:
    folder = tmp_path / "wheels"
    folder.mkdir()
    for name in wheel_names():
        (folder / name).write_bytes(b"\0" * 1024)
    return folder


def test_gpu_check_dry_run_prints_the_plan_within_the_budget_and_a_complete_wheelhouse(wheelhouse, tmp_path):
    result = dry_run(wheelhouse, tmp_path / "out")
    assert result.returncode == 0, result.stdout + result.stderr
    plan = result.stdout
    for part in PARTS:
        assert f"  {part} " in plan
    total = int(plan.split("  total ")[1].split()[0])
    assert total <= 480
    assert "--sizes B XL --batch 8 --frames 16 --latent 32 --compile on" in plan  # B and XL at 16 x 256²
    assert "configs/model/b.yaml --config configs/trainer/zero2.yaml" in plan and "--trainer.max_steps 30" in plan
    assert "--steps 25" in plan and "vae_encode.py --size 512" in plan
    assert all(name in plan for name in wheel_names()) and "total 1 MiB (limit 60 MiB)" in plan  # du rounds up


def test_gpu_check_dry_run_fails_on_a_missing_wheel_or_an_oversized_wheelhouse(wheelhouse, tmp_path):
    (wheelhouse / wheel_names()[0]).unlink()
    result = dry_run(wheelhouse, tmp_path / "out")
    assert result.returncode == 1 and f"error: no wheel for: {wheel_names()[0].split('-')[0]}" in result.stdout
    (wheelhouse / wheel_names()[0]).write_bytes(b"")
    with open(wheelhouse / "big-1.0-py3-none-any.whl", "wb") as f:
        f.truncate(61 * 2**20)
    result = dry_run(wheelhouse, tmp_path / "out")
    assert result.returncode == 1 and "over 60 MiB" in result.stdout
    assert dry_run(tmp_path / "none", tmp_path / "out").returncode == 1


def test_train_throughput_times_the_variants_and_the_naive_baseline(tmp_path):
    out = tmp_path / "tt.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--sizes", "tiny", "--frames", "2",
                    "--latent", "8", "--batch", "1", "--steps", "2", "--warmup", "1", "--checkpointing", "both",
                    "--device", "cpu", "--json", str(out)], check=True, cwd=ROOT, timeout=300)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["checkpointing"], r["backend"], r["precision"]) for r in rows] == \
        [(False, "sdpa", "fp32"), (True, "sdpa", "fp32"), (False, "math", "fp32")]
    for r in rows:
        assert r["clips_per_s"] > 0 and r["tokens_per_s"] == pytest.approx(r["clips_per_s"] * 2 * 16)
        assert r["mfu"] is None and r["peak_mem_gib"] is None  # CPU: no peak FLOP/s, no GPU memory


@pytest.mark.slow
def test_gpu_check_rehearses_every_part_on_a_cpu(tmp_path):
    """GPU_CHECK_SMALL=1: the same parts at tiny sizes on the CPU (~4 min), each ok, and the outputs it promises."""
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_SMALL": "1", "GPU_WHEELS": str(tmp_path / "none"),
           "PYTHON": sys.executable, "GPU_CHECK_WORK": str(tmp_path / "work")}
    subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)], env=env, check=True, timeout=1800)
    parts = json.loads((out / "gpu_check.json").read_text())["parts"]
    assert [(p["part"], p["result"]) for p in parts] == [("install", "skipped")] + [(p, "ok") for p in PARTS[1:]]
    assert sorted(f.name for f in out.iterdir()) == sorted(
        ["summary.md", "gpu_check.json", "log.txt", "train_throughput.json", "fit_metrics.csv", "generate_speed.json",
         "vae_encode.json"])

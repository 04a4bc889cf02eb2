"""Shared fixtures: the fast demo's outputs, and a real single-node SLURM cluster (see tests/slurm_cluster.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from slurm_cluster import SlurmCluster, missing


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`letstalk demo --fast` once per session: every stage runs for real, briefly; its checkpoint,
    VAE, shards and videos serve the generation, export, app and evaluation tests (read only)."""
    from pipeline.cli.demo import run_demo

    return run_demo(tmp_path_factory.mktemp("demo"), fast=True)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """munge + slurmctld + slurmd on loopback for the whole session; skipped where SLURM is not installed."""
    reason = missing()
    if reason:
        pytest.skip(f"no SLURM: {reason}")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()

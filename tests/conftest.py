"""Shared fixtures: a real single-node SLURM cluster (see tests/slurm_cluster.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from slurm_cluster import SlurmCluster, missing


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

"""Throughput and MFU arithmetic, and where the peak FLOP/s comes from."""

from __future__ import annotations

import pytest
import torch

from pipeline.throughput import peak_flops, throughput


def test_rates_follow_from_clips_time_and_flops():
    rates = throughput(clips=32, seconds=2.0, train_flops_per_clip=3e12, tokens_per_clip=4096, peak=989e12)
    assert rates["clips_per_s"] == 16 and rates["tokens_per_s"] == 16 * 4096
    assert rates["tflops_per_s"] == pytest.approx(48.0)
    assert rates["mfu"] == pytest.approx(48e12 / 989e12)
    assert "mfu" not in throughput(1, 1.0, 1e9, 1, peak=None)


def test_peak_is_unknown_on_cpu_and_can_be_set(monkeypatch):
    monkeypatch.delenv("LETSTALK_PEAK_TFLOPS", raising=False)
    assert peak_flops(torch.device("cpu")) is None
    monkeypatch.setenv("LETSTALK_PEAK_TFLOPS", "756")
    assert peak_flops("cpu") == 756e12
    monkeypatch.setenv("LETSTALK_PEAK_TFLOPS", "fast")
    with pytest.raises(ValueError, match="LETSTALK_PEAK_TFLOPS='fast' is not a number"):
        peak_flops()

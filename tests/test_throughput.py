"""Throughput and MFU arithmetic, and where the peak FLOP/s comes from."""

from __future__ import annotations

import pytest
import torch

from pipeline.throughput import peak_flops, peak_for_name, throughput


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


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12),
                                        ("NVIDIA A100-SXM4-80GB", 312e12), ("Tesla T4", None)])
def test_each_h100_card_gets_its_own_peak(name, peak):
    """torch.cuda.get_device_name() of each card: the PCIe and NVL H100s are not the SXM's 989 TFLOP/s."""
    assert peak_for_name(name) == peak

"""Throughput and model FLOPs utilisation (MFU), from the model's own FLOP counter.

MFU = achieved training FLOP/s ÷ the device's peak dense FLOP/s. Training FLOPs per clip are
3× the forward (`LetsTalkDiT.flops_per_clip`; backward ≈ 2× forward), so activation
checkpointing's recomputation does not count as useful work, as in PaLM's definition.
"""

from __future__ import annotations

import os

import torch

# Datasheet peak dense bf16 tensor-core FLOP/s by a part of torch.cuda.get_device_name(); the first match wins, so
# the H100's PCIe and NVL cards come before the SXM one ("NVIDIA H100 80GB HBM3").
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
}


def peak_for_name(name: str) -> float | None:
    """The table's peak for a device name, None when no entry matches."""
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def peak_flops(device: torch.device | str | None = None) -> float | None:
    """The peak FLOP/s of `device`: LETSTALK_PEAK_TFLOPS if set, else the table; None when unknown (CPU)."""
    override = os.environ.get("LETSTALK_PEAK_TFLOPS")
    if override:
        try:
            return float(override) * 1e12
        except ValueError:
            raise ValueError(f"LETSTALK_PEAK_TFLOPS={override!r} is not a number (TFLOP/s, e.g. 989)") from None
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda":
        return None
    return peak_for_name(torch.cuda.get_device_name(device))


def throughput(clips: int, seconds: float, train_flops_per_clip: float, tokens_per_clip: int,
               peak: float | None) -> dict[str, float]:
    """Per-second rates for `clips` processed in `seconds` (all ranks): clips/s, tokens/s, TFLOP/s and MFU."""
    clips_per_s = clips / seconds
    rates = {"clips_per_s": clips_per_s, "tokens_per_s": clips_per_s * tokens_per_clip,
             "tflops_per_s": clips_per_s * train_flops_per_clip / 1e12}
    if peak:
        rates["mfu"] = rates["tflops_per_s"] * 1e12 / peak
    return rates

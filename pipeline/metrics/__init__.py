"""Evaluation metrics with the networks and conventions of the published reference implementations.

    frechet     Fréchet distance between Gaussians fitted to features (float64): FID and FVD
    inception   FID Inception-v3, pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` layout
    i3d         FVD I3D, the piergiaj/pytorch-i3d `InceptionI3d` layout (`i3d_pretrained_400.pt`)
    syncnet     SyncNet of syncnet_python (`syncnet_v2.model`): Sync-C / Sync-D

Weights are never downloaded: each loader takes a local file, reads it with
``torch.load(weights_only=True)`` (nothing is unpickled) and checks that its key names and
shapes are exactly those of the reference layout, so a wrong file fails loudly instead of
silently producing numbers that cannot be compared with published tables.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn


class MetricWeightsError(ValueError):
    """A metric weights file that is missing, unreadable or not in the expected layout."""


def load_reference_weights(module: nn.Module, path: str | os.PathLike, layout: str) -> nn.Module:
    """Load a state dict saved in a reference layout into `module` (eval mode, no grads) and return it.

    BatchNorm `num_batches_tracked` buffers may be absent (checkpoints from old torch versions lack
    them; they do not affect inference). Any other missing or unexpected key, or a shape mismatch,
    raises `MetricWeightsError` naming the file and `layout` (what the file should be).
    """
    path = Path(path)
    if not path.is_file():
        raise MetricWeightsError(f"{path}: {layout} weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad or unsafe file
        raise MetricWeightsError(f"{path}: not a readable {layout} state dict ({type(err).__name__}: {err})") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MetricWeightsError(f"{path}: expected a {layout} state dict (name -> tensor), got {type(state).__name__}")
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        found = (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        problems = [f"{name} ({len(keys)}): {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
                    for name, keys in found if keys]
        raise MetricWeightsError(f"{path}: not the {layout} layout; " + "; ".join(problems))
    module.load_state_dict(state, strict=False)
    return module.eval().requires_grad_(False)

"""Reading trained weights safely, and exporting them for generation.

A `letstalk fit` checkpoint holds the network (`net.*`), its EMA copy (`ema.*`), the optimizer
and the configs (`hyper_parameters`: net, diffusion, data_info). `letstalk export` turns one, or a
sharded DeepSpeed checkpoint folder, into `model.safetensors` (the network only) plus
`model.json` (the configs), which `letstalk generate` loads like a checkpoint. Nothing is
unpickled: `.ckpt` files are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CONFIG_KEYS = ("net", "diffusion", "data_info")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unreadable, or not written by `letstalk fit`."""


def _load_lightning(path: Path) -> dict[str, Any]:
    if path.is_dir():  # a DeepSpeed checkpoint folder: gather the shards into one fp32 state dict
        try:
            from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict
        except ImportError as err:
            raise CheckpointError(f"{path}: a DeepSpeed checkpoint folder needs `pip install deepspeed`") from err
        with tempfile.TemporaryDirectory() as tmp:
            convert_zero_checkpoint_to_fp32_state_dict(path, Path(tmp) / "fp32.ckpt")
            return _load_lightning(Path(tmp) / "fp32.ckpt")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from err


def read_weights(checkpoint: str | os.PathLike, ema: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(configs {net, diffusion, data_info}, network state dict) from a `.ckpt`, a DeepSpeed folder or an export.

    `ema` picks the EMA weights of a training checkpoint; an export holds the weights it was made with.
    """
    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        config_path = path.with_suffix(".json")
        if not config_path.is_file():
            raise CheckpointError(f"{path}: its config {config_path.name} is missing (export writes both)")
        try:
            return json.loads(config_path.read_text()), load_file(path)
        except Exception as err:  # noqa: BLE001 - safetensors/json raise several kinds
            raise CheckpointError(f"{path}: cannot read the export ({type(err).__name__}: {err})") from err
    ckpt = _load_lightning(path)
    hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if "net" not in hparams or not hparams.get("data_info"):
        raise CheckpointError(f"{path}: no LetsTalk model config in the checkpoint (was it written by `letstalk fit`?)")
    prefix = "ema." if ema else "net."
    state = {k[len(prefix):]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(f"{path}: no `{prefix}*` weights in the checkpoint")
    return {key: hparams[key] for key in CONFIG_KEYS if key in hparams}, state


def export(checkpoint: str | os.PathLike, out: str | os.PathLike, ema: bool = False) -> Path:
    """Write the network weights to `out` (.safetensors) and the configs beside it (.json), each atomically."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise CheckpointError(f"{out}: the export must be a .safetensors file")
    config, state = read_weights(checkpoint, ema=ema)
    config["source"] = {"checkpoint": str(Path(checkpoint).resolve()), "weights": "ema" if ema else "live"}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp)
    os.replace(tmp, out)
    config_path = out.with_suffix(".json")
    config_path.with_name(config_path.name + ".tmp").write_text(json.dumps(config, indent=2, sort_keys=True))
    os.replace(config_path.with_name(config_path.name + ".tmp"), config_path)
    size = out.stat().st_size / 2**20
    print(f"exported {len(state)} tensors ({size:.1f} MiB, {config['source']['weights']} weights) -> {out} + {config_path.name}")
    return out

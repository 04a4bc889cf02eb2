"""Where the encoders a model needs live: the VAE and audio-encoder folders recorded by name, path and content hash.

`letstalk prepare` records each encoder folder in the manifest (and so in every checkpoint's `data_info`) with its
folder name, absolute path and `fingerprint`, so a run, a checkpoint or an export moved to another machine can
be pointed at a copy of the same weights, and a different copy is noticed.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path


def fingerprint(folder: str | os.PathLike) -> str:
    """sha1 over the names and bytes of a Hugging Face model folder's files (config and weights; a diffusers
    pipeline folder's `vae/` subfolder when the folder itself has no config.json), so a retrained model saved
    under the same name is told apart from the one earlier data was made with."""
    root = Path(folder)
    root = root if (root / "config.json").is_file() or not (root / "vae" / "config.json").is_file() else root / "vae"
    digest = hashlib.sha1()
    for file in sorted(p for p in root.iterdir() if p.is_file()):
        digest.update(file.name.encode("utf-8"))
        with open(file, "rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha1").digest())
    return digest.hexdigest()


FLAGS = {"vae": "--vae", "audio_encoder": "--audio-encoder-path"}  # the command-line override of each encoder


class EncoderNotFoundError(ValueError):
    """An encoder folder a model needs is missing; the message names the encoder, the path, where that path came
    from, and the flag that points to another copy."""


class EncoderMismatchWarning(UserWarning):
    """An encoder folder's fingerprint differs from the one recorded when the training data was made."""


def locate_encoders(data_info: dict, origin: str, vae: str | os.PathLike | None = None,
                    audio_encoder: str | os.PathLike | None = None, recorded: bool = True) -> dict:
    """`data_info` (a checkpoint's or an export's) with the VAE and audio-encoder folders it will be used with.

    An override (`vae`, `audio_encoder`) wins; else the recorded path, relative ones from the current folder. The
    folders are checked and their paths made absolute; the log-mel encoder has none. `origin` says where the
    recorded paths came from, for the error a missing folder raises (`EncoderNotFoundError`). Where the record holds
    a `sha1` and the folder's `fingerprint` differs, `EncoderMismatchWarning`: a different VAE or audio encoder
    gives garbage, but a re-saved copy of the same weights may differ in bytes, so it is not refused. Name and sha1
    are kept. `recorded=False` leaves encoders without an override as recorded (re-homing only what is given).
    """
    info = dict(data_info)
    for key, override in (("vae", vae), ("audio_encoder", audio_encoder)):
        spec = dict(info[key])
        label = f"VAE {spec.get('id')}" if key == "vae" else f"audio encoder {spec.get('name')}"
        if key == "audio_encoder" and spec.get("name") == "mel":
            if override is not None:
                raise EncoderNotFoundError(f"{FLAGS[key]} {override}: the model's audio encoder is the log-mel "
                                           "spectrogram, which has no folder; leave the flag out")
            continue
        if override is None and not recorded:
            continue
        if override is not None:
            folder, source = Path(override), f"that path was given with {FLAGS[key]}"
        elif spec.get("path"):
            folder, source = Path(spec["path"]), f"that path is recorded in {origin}"
            if not folder.is_absolute():
                source += f", relative to the current folder {Path.cwd()}"
        else:
            raise EncoderNotFoundError(f"{origin} records no folder for the {label}; pass {FLAGS[key]} DIR")
        problem = _not_a_model_folder(folder)
        if problem:
            sha1 = f" (sha1 {spec['sha1']})" if spec.get("sha1") else ""
            raise EncoderNotFoundError(f"{label} folder {folder} {problem}; {source}. Pass {FLAGS[key]} DIR with the "
                                       f"folder of the {label} the model was trained with{sha1}")
        if spec.get("sha1"):
            actual = fingerprint(folder)
            if actual != spec["sha1"]:
                warnings.warn(f"{folder}: this {label} folder's fingerprint {actual} differs from {spec['sha1']}, the "
                              f"one recorded in {origin}; a different {label} gives garbage, a re-saved copy of the "
                              "same weights may differ in bytes only", EncoderMismatchWarning, stacklevel=2)
        info[key] = {**spec, "path": str(folder.resolve())}
    return info


def _not_a_model_folder(folder: Path) -> str | None:
    """Why `folder` is no Hugging Face model folder (no folder, no config.json), or None."""
    if not folder.is_dir():
        return "does not exist"
    if not (folder / "config.json").is_file() and not (folder / "vae" / "config.json").is_file():
        return "has no config.json (not a saved model folder)"
    return None

"""Where the encoders a model needs live: the VAE and audio-encoder folders recorded by name, path and content hash.

`letstalk prepare` records each encoder folder in the manifest (and so in every checkpoint's `data_info`) with its
folder name, absolute path and `fingerprint`, so a run, a checkpoint or an export moved to another machine can
be pointed at a copy of the same weights, and a different copy is noticed.
"""

from __future__ import annotations

import hashlib
import os
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

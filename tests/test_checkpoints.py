"""`letstalk export`: a training checkpoint -> safetensors + config that `generate` loads; safe reading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline import media
from pipeline.checkpoints import CheckpointError, export, read_weights
from pipeline.cli import main
from pipeline.generate import generate
from pipeline.options import Framing, Provenance, Sampling


@pytest.fixture(scope="module")
def checkpoint(demo: dict) -> Path:
    return Path(demo["checkpoint"])


def test_export_holds_exactly_the_chosen_weights_and_the_configs(checkpoint: Path, tmp_path: Path):
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    for ema, prefix in ((True, "ema."), (False, "net.")):
        out = export(checkpoint, tmp_path / f"{prefix}safetensors", ema=ema)
        weights = load_file(out)
        expected = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
        assert weights.keys() == expected.keys()
        assert all(torch.equal(weights[k], expected[k]) for k in expected)
        config = json.loads(out.with_suffix(".json").read_text())
        assert config["net"] == ckpt["hyper_parameters"]["net"]
        assert config["data_info"] == ckpt["hyper_parameters"]["data_info"]
        assert config["source"]["weights"] == ("ema" if ema else "live")
    assert not list(tmp_path.glob("*.tmp"))


def test_export_ships_the_ema_weights_unless_told_otherwise(checkpoint: Path, tmp_path: Path):
    """The EMA by default, as generate uses it; --no-ema for the live weights; the JSON says which."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    for flags, prefix, weights in (([], "ema.", "ema"), (["--ema"], "ema.", "ema"), (["--no-ema"], "net.", "live")):
        out = tmp_path / f"{weights}{len(flags)}.safetensors"
        assert main(["export", str(checkpoint), "--out", str(out), *flags]) == 0
        exported = load_file(out)
        assert all(torch.equal(v, ckpt["state_dict"][prefix + k]) for k, v in exported.items())
        assert json.loads(out.with_suffix(".json").read_text())["source"]["weights"] == weights


def test_generate_from_the_export_equals_generate_from_the_checkpoint(checkpoint: Path, tmp_path: Path):
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "model.safetensors")]) == 0
    portrait = checkpoint.parents[2] / "heldout" / "clip_0000.mp4"
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    # without provenance marks: the watermark's id comes from the file's hash, which differs by design
    generate(checkpoint, portrait, portrait, a, sampling=Sampling(steps=2, ema=True), framing=Framing(crop="center"),
             marks=Provenance(marks=False))
    generate(tmp_path / "model.safetensors", portrait, portrait, b, sampling=Sampling(steps=2),
             framing=Framing(crop="center"), marks=Provenance(marks=False))
    assert np.array_equal(media.read_video(a), media.read_video(b))


def test_bad_exports_and_checkpoints_are_named(checkpoint: Path, tmp_path: Path, capsys):
    out = export(checkpoint, tmp_path / "m.safetensors")
    out.with_suffix(".json").unlink()
    with pytest.raises(CheckpointError, match="m.safetensors: its config m.json is missing"):
        read_weights(out)
    with pytest.raises(CheckpointError, match="must be a .safetensors file"):
        export(checkpoint, tmp_path / "m.pt")
    assert main(["export", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "x.safetensors")]) == 1
    assert "nope.ckpt: checkpoint not found" in capsys.readouterr().err
    pickled = tmp_path / "evil.ckpt"
    torch.save({"hyper_parameters": {"net": {}, "data_info": {"x": 1}}, "payload": Path("x")}, pickled)
    with pytest.raises(CheckpointError, match="evil.ckpt: not a readable checkpoint"):
        read_weights(pickled)  # weights_only refuses arbitrary objects

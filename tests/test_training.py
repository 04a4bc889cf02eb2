"""LetsTalkModule under Lightning and `letstalk fit`: loss goes down, checkpoints, exact resume, W&B/CSV logs."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch

from datamodules import LetsTalkDataModule
from lightning_modules.letstalk import LetsTalkModule
from pipeline.cli import main
from pipeline.shards import AtomicShardWriter, Manifest, Segment, sample_key

C, HW, K, D, FRAMES = 4, 8, 2, 8, 12


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 videos × 2 segments of smooth random latents and audio, in 2 shards."""
    root = tmp_path_factory.mktemp("train_shards")
    rng = np.random.default_rng(0)
    flac = io.BytesIO()
    sf.write(flac, np.zeros(640 * FRAMES, np.float32), 16000, format="FLAC")
    with AtomicShardWriter(root, max_samples=8) as writer:
        for v in range(8):
            for s in range(2):
                latents = rng.normal(size=(1, C, HW, HW)) + 0.1 * rng.normal(size=(FRAMES, C, HW, HW))
                audio = rng.normal(size=(FRAMES, K, D))
                writer.write(Segment(sample_key(f"v{v}", s), latents.astype(np.float16), audio.astype(np.float16),
                                     flac.getvalue(), {"frames": FRAMES, "fps": 25.0}))
    Manifest(shards=writer.shards, size=32,
             vae={"id": "none", "scaling_factor": 1.0, "shift_factor": 0.0, "latent_channels": C, "downsample": 4},
             audio_encoder={"id": "mel-8", "name": "mel", "K": K, "D": D, "sample_rate": 16000}).save(root)
    return root


def _data(root: Path) -> LetsTalkDataModule:
    return LetsTalkDataModule(str(root), clip_frames=4, audio_radius=1, batch_size=4, num_workers=0, val_percent=20)


def _trainer(tmp: Path, max_steps: int, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_steps=max_steps, default_root_dir=tmp, logger=False,
                     enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0, **kw)


def test_network_is_sized_from_the_manifest_and_loss_goes_down(shards: Path, tmp_path: Path):
    L.seed_everything(0)
    module = LetsTalkModule(optim={"lr": 2e-3, "warmup_steps": 1})
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    _trainer(tmp_path, 40, callbacks=[Record()], enable_checkpointing=False).fit(module, _data(shards))
    assert module.net.config.latent_channels == C and module.net.config.audio_dim == D
    assert module.net.config.audio_tokens == 3 * K  # (2·radius + 1)·K
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5])
    # EMA follows the live weights but is not equal to them
    live = torch.cat([p.flatten() for p in module.net.parameters()])
    ema = torch.cat([p.flatten() for p in module.ema.parameters()])
    assert not torch.equal(live, ema) and torch.isfinite(ema).all()


def _state(ckpt: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}


def test_resume_continues_at_the_saved_step_with_the_saved_weights(shards: Path, tmp_path: Path):
    L.seed_everything(0)
    ckpt_dir = tmp_path / "ckpt"
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_last=True, save_top_k=-1)
    _trainer(tmp_path, 3, callbacks=[saver]).fit(LetsTalkModule(), _data(shards))
    saved = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 3

    seen = {}

    class Inspect(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["step"] = trainer.global_step
            seen["state"] = {k: v.clone() for k, v in pl_module.state_dict().items()}
            seen["lr"] = trainer.optimizers[0].param_groups[0]["lr"]
            seen["adam_steps"] = {float(s["step"]) for s in trainer.optimizers[0].state.values()}

    resumed = LetsTalkModule()
    _trainer(tmp_path, 5, callbacks=[Inspect()], enable_checkpointing=False).fit(
        resumed, _data(shards), ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert seen["step"] == 3
    for prefix in ("net.", "ema."):
        for key, value in _state(saved, prefix).items():
            assert torch.equal(seen["state"][key], value), key
    assert seen["adam_steps"] == {3.0}
    assert seen["lr"] == pytest.approx(LetsTalkModule().optim.lr * 4 / 100)  # warm-up step 4 of 100
    assert resumed.global_step == 5


def test_letstalk_fit_cli_writes_checkpoints_logs_and_resumes(shards: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    common = ["--model.net.size", "tiny", "--data.root", str(shards), "--data.clip_frames", "4",
              "--data.audio_radius", "1", "--data.batch_size", "4", "--data.num_workers", "0",
              "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(run),
              "--trainer.enable_progress_bar", "false", "--trainer.val_check_interval", "2",
              "--trainer.check_val_every_n_epoch", "null", "--trainer.log_every_n_steps", "1",
              "--trainer.logger+=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={run}",
              "--trainer.logger+=lightning.pytorch.loggers.WandbLogger", f"--trainer.logger.save_dir={run}",
              "--trainer.logger.offline=true",
              "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
              f"--trainer.callbacks.dirpath={run / 'checkpoints'}", "--trainer.callbacks.save_last=true",
              "--trainer.callbacks.every_n_train_steps=2"]
    assert main(["fit", *common, "--trainer.max_steps", "4"]) == 0
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert main(["fit", *common, "--trainer.max_steps", "6", "--ckpt_path", "last"]) == 0
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 6
    assert last["hyper_parameters"]["data_info"]["audio_tokens"] == 3 * K
    metrics = [row for path in sorted(run.glob("lightning_logs/version_*/metrics.csv"))
               for row in csv.DictReader(open(path))]
    keys = {key for row in metrics for key, value in row.items() if value}
    assert {"train/loss", "train/lr", "train/grad_norm", "train/clips_per_s", "train/tokens_per_s",
            "train/tflops_per_s", "val/loss"} <= keys
    assert "train/mfu" not in keys  # no peak FLOP/s is known for a CPU
    rates = [r for r in metrics if r.get("train/tokens_per_s")]
    tokens_per_clip = 4 * (HW // 2) ** 2  # 4 frames of 8x8 latents, patch 2
    assert all(float(r["train/tokens_per_s"]) == pytest.approx(float(r["train/clips_per_s"]) * tokens_per_clip, rel=1e-4)
               for r in rates)
    steps = [int(r["step"]) for r in metrics if r.get("train/loss")]
    assert max(steps) >= 4  # the resumed run logged past the saved step
    assert list(run.glob("wandb/offline-run-*/run-*.wandb"))

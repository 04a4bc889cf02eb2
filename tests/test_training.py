"""LetsTalkModule under Lightning and `letstalk fit`: loss goes down, checkpoints, exact resume, W&B/CSV logs,
NaN guards, refusals of unworkable configs, EMA on ZeRO-3 shards."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from torch import nn
from wandb.proto import wandb_internal_pb2

from datamodules import LetsTalkDataModule
from lightning_modules.ema import EMA_KEY, ema_state_dict, with_ema
from lightning_modules.letstalk import LetsTalkModule
from pipeline.cli import main
from pipeline.shards import AtomicShardWriter, Manifest, Segment, sample_key
from pipeline.shipped import CONFIGS
from procs import run_job

C, HW, K, D, FRAMES = 4, 8, 2, 8, 12


def write_shards(root: Path) -> Path:
    """8 videos × 2 segments of smooth random latents and audio, in 2 shards (also used by test_slurm)."""
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


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shards(tmp_path_factory.mktemp("train_shards"))


TINY_FIT = """\
model: {net: {size: tiny}}
data: {root: SHARDS, clip_frames: 4, audio_radius: 1, batch_size: 4, num_workers: 0}
trainer:
  accelerator: cpu
  enable_progress_bar: false
  val_check_interval: 2
  check_val_every_n_epoch: null
  log_every_n_steps: 1
  logger:
    - class_path: lightning.pytorch.loggers.CSVLogger
      init_args: {save_dir: "${trainer.default_root_dir}"}
    - class_path: lightning_modules.wandb_logger.WandbLogger
      init_args: {save_dir: "${trainer.default_root_dir}", project: letstalk-test, offline: true}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: "${trainer.default_root_dir}/checkpoints", every_n_train_steps: EVERY, save_last: true}
"""


def fit_args(shards: Path, run: Path | None, every: int = 2) -> list[str]:
    """`letstalk fit` flags for the tiny model on `shards` on CPU: CSV + offline W&B logs and checkpoints
    (every `every` steps) under trainer.default_root_dir, which is `run` (None: left to later flags)."""
    config = shards.parent / f"{shards.name}-fit-every{every}.yaml"
    config.write_text(TINY_FIT.replace("SHARDS", str(shards)).replace("EVERY", str(every)))
    return ["--config", str(config)] + (["--trainer.default_root_dir", str(run)] if run else [])


def _data(root: Path, **kw) -> LetsTalkDataModule:
    return LetsTalkDataModule(str(root), clip_frames=4, audio_radius=1, batch_size=4, num_workers=0, val_percent=20,
                              **kw)


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
    ema = torch.cat([p.flatten() for p in module.ema_network().parameters()])
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
            seen["state"].update({f"ema.{k}": v for k, v in pl_module.ema_network().state_dict().items()})
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


def wandb_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """The records of an offline run's `run-<id>.wandb`, decoded with wandb's own protobuf `Record`.

    wandb >= 0.2x dropped its Python reader (the Go core writes and syncs these files); the framing is
    LevelDB's log format after a 7-byte `:W&B` header: 32 KiB blocks of [crc32 u32, length u16, type u8]
    chunks, type 1 = a whole record, 2/3/4 = its first/middle/last piece.
    """
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    records, pos, payload = [], 7, b""
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if room < 7 or kind == 0:  # block trailer / zero padding
            pos += room
            continue
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
            payload = b""
    return records


def test_letstalk_fit_cli_writes_checkpoints_logs_and_resumes(shards: Path, tmp_path: Path, monkeypatch):
    """Also: the W&B run continues with the same id, holds the metrics and the resolved config, and the API key
    (from the environment) is written nowhere in the run folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_API_KEY", "secret-xyz")
    run = tmp_path / "run"
    common = fit_args(shards, run)
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
    assert "train/mfu" not in keys and "train/gpu_mem_gb" not in keys  # CPU: no peak FLOP/s, no GPU memory
    rates = [r for r in metrics if r.get("train/tokens_per_s")]
    tokens_per_clip = 4 * (HW // 2) ** 2  # 4 frames of 8x8 latents, patch 2
    assert all(float(r["train/tokens_per_s"]) == pytest.approx(float(r["train/clips_per_s"]) * tokens_per_clip, rel=1e-4)
               for r in rates)
    steps = [int(r["step"]) for r in metrics if r.get("train/loss")]
    assert max(steps) >= 4  # the resumed run logged past the saved step
    run_id = (run / "wandb_run_id").read_text()
    folders = sorted(run.glob("wandb/offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(f"-{run_id}") for f in folders)
    records = [r for f in folders for r in wandb_records(f / f"run-{run_id}.wandb")]
    kinds = [r.WhichOneof("record_type") for r in records]
    assert {r.run.run_id for r, k in zip(records, kinds) if k == "run"} == {run_id}
    logged = {item.key or "/".join(item.nested_key) for r, k in zip(records, kinds) if k == "history"
              for item in r.history.item}
    assert {"train/loss", "train/lr", "train/grad_norm", "train/clips_per_s", "train/tokens_per_s", "val/loss"} <= logged
    config = {item.key: json.loads(item.value_json) for r, k in zip(records, kinds) if k == "config"
              for item in r.config.update}
    resolved = config["config"].get("value", config["config"])
    assert resolved["model"]["net"]["size"] == "tiny" and resolved["trainer"]["max_steps"] in (4, 6)
    for path in run.rglob("*"):
        assert not path.is_file() or b"secret-xyz" not in path.read_bytes(), f"API key written to {path}"


@pytest.mark.parametrize("flags, message", [
    (["--trainer.strategy", "lightning.pytorch.strategies.DeepSpeedStrategy"],
     "runs on CUDA GPUs only; lightning_modules.strategies.DeepSpeedStrategy .* also runs on CPU processes"),
    (["--model.net.head_dim", "48"], "cannot use head_dim 48; set head_dim to an even divisor of 128"),
    (["--data.clip_frames", "20"], "clip_frames=20 is longer than every segment .* set clip_frames <= 12"),
    (["--model.optim.nan_policy", "ignore"], r"optim.nan_policy must be one of \('stop', 'skip'\)"),
])
def test_unworkable_configs_are_refused_at_start_with_what_to_change(shards: Path, tmp_path: Path, capsys,
                                                                    flags: list[str], message: str):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *fit_args(shards, tmp_path / "run"), "--trainer.max_steps", "2", *flags])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert re.search(f"letstalk fit: error: .*{message}", err, re.S), err[-2000:]
    left = {p.name for p in (tmp_path / "run").iterdir()} if (tmp_path / "run").exists() else set()
    assert left <= {"wandb_run_id"}, left  # refused before the loggers start: no log folder, no W&B run


def _fit_job(args: list[str], *flags: str) -> subprocess.CompletedProcess:
    """`letstalk fit` on 2 CPU ranks (DDP, Lightning launches the second) with stderr a pipe, as in a batch job."""
    env = {**os.environ, "WANDB_MODE": "offline"}
    return run_job([sys.executable, "-m", "pipeline.cli", "fit", *args, "--trainer.accelerator", "cpu",
                    "--trainer.devices", "2", "--trainer.strategy", "ddp", *flags], timeout=240, env=env)


def test_a_two_rank_job_checks_first_says_each_thing_once_and_records_what_ran(shards: Path, tmp_path: Path):
    """What a user reads in the log of a job nobody watches, and what the run records."""
    run = tmp_path / "run"
    config = Path(fit_args(shards, run)[1])
    with_eval = config.with_name("with-eval.yaml")  # EvalCallback needs a VAE the test data does not name
    with_eval.write_text(config.read_text() + "    - class_path: lightning_modules.eval_callback.EvalCallback\n"
                                              "      init_args: {every_n_steps: 2, num_clips: 1}\n")
    args = ["--config", str(with_eval), "--trainer.default_root_dir", str(run)]

    refused = _fit_job(args, "--evaluation", "false", "--model.net.latent_channels", "16", "--data.num_workers", "8")
    assert refused.returncode == 1
    assert refused.stderr.count("letstalk fit: error: this run cannot start (2 problems)") == 1, refused.stderr[-3000:]
    assert "1. model.net.latent_channels=16, but the data's VAE (none) makes 4-channel latents" in refused.stderr
    assert "2. " in refused.stderr and "training segments are too few for 16 loader slots" in refused.stderr
    assert not (run / "checkpoints").exists() and not list(run.glob("lightning_logs/*/config.yaml"))

    done = _fit_job(args, "--evaluation", "false", "--trainer.max_steps", "3", "--trainer.log_every_n_steps", "50",
                    "--trainer.val_check_interval", "100")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("letstalk fit: step 1/3, epoch 0, loss ") == 1  # rank 0's lines only
    assert done.stderr.count("letstalk fit: step 3/3, epoch ") == 1
    assert "Epoch 0/-2" not in done.stderr and "\r" not in done.stderr  # no progress bar without a terminal
    (version,) = [config.parent for config in run.glob("lightning_logs/version_*/config.yaml")]
    rows = list(csv.DictReader(open(version / "metrics.csv")))
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == [0, 2]  # first and last, though 3 < 50 steps
    ran = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["hyper_parameters"]
    assert (ran["net"]["latent_channels"], ran["net"]["audio_dim"], ran["net"]["audio_tokens"]) == (C, D, 3 * K)
    recorded = yaml.safe_load((version / "config.yaml").read_text())
    assert recorded["model"]["net"] == ran["net"] and recorded["evaluation"] is False
    assert yaml.safe_load((version / "hparams.yaml").read_text())["net"] == ran["net"]

    resumed = _fit_job(args, "--evaluation", "false", "--trainer.max_steps", "4", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.count("letstalk fit: resuming from") == 1, resumed.stderr[-3000:]


def test_the_production_recipe_is_the_papers_long_video_model(capsys):
    """The cluster command of the README and docs/training.md (base + a size + a ZeRO preset) trains with motion
    frames and a memory bank, the settings configs/long_video.yaml adds to the demo."""
    long_video = yaml.safe_load((CONFIGS / "long_video.yaml").read_text())["model"]["net"]
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "model" / "xl.yaml"),
              "--config", str(CONFIGS / "trainer" / "zero2.yaml"), "--data.root", "/data/shards", "--print_config"])
    net = yaml.safe_load(capsys.readouterr().out)["model"]["net"]
    assert long_video["motion_frames"] > 0 and long_video["memory_frames"] > 0
    assert {key: net[key] for key in long_video} == long_video and net["size"] == "XL"


def test_the_optimizer_keeps_an_fp32_ema_that_follows_its_updates_with_the_warmup_decay():
    """EMA state beside Adam's: starts at the weights after update 1, then decay min(d, (1+n)/(10+n)) after update n;
    read back by parameter name; in the optimizer's state_dict, so every strategy checkpoints it."""
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    opt = with_ema(torch.optim.SGD)(net.parameters(), ema_decay=0.5, lr=0.1)
    assert ema_state_dict(net, opt)["weight"].data_ptr() != net.weight.data_ptr()  # a copy, before any update
    assert torch.equal(ema_state_dict(net, opt)["weight"], net.weight)  # no update yet: the weights
    expected = None
    for n in range(1, 5):
        net(torch.randn(4, 3)).square().sum().backward()
        opt.step()
        opt.zero_grad()
        w = net.weight.detach().clone()
        decay = min(0.5, (1 + n) / (10 + n))
        expected = w if expected is None else decay * expected + (1 - decay) * w
    ema = ema_state_dict(net, opt)
    assert torch.allclose(ema["weight"], expected) and not torch.allclose(ema["weight"], net.weight)
    assert opt.state[net.weight][EMA_KEY].dtype == torch.float32
    saved = opt.state_dict()
    assert all(EMA_KEY in state for state in saved["state"].values())
    fresh = with_ema(torch.optim.SGD)(net.parameters(), ema_decay=0.5, lr=0.1)
    fresh.load_state_dict(saved)
    assert torch.equal(ema_state_dict(net, fresh)["weight"], ema["weight"])


def _fit(shards: Path, tmp: Path, steps: int, ckpt: str | None = None, module: LetsTalkModule | None = None,
         data: dict | None = None, **kw) -> LetsTalkModule:
    L.seed_everything(0)
    module = module or LetsTalkModule(net={"size": "tiny"}, optim={"lr": 1e-3, "warmup_steps": 2})
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp / "ckpt", every_n_train_steps=3, save_last=True,
                                                save_top_k=-1)
    _trainer(tmp, steps, callbacks=[saver], **kw).fit(module, _data(shards, **(data or {})), ckpt_path=ckpt)
    return module


def test_interrupted_and_resumed_run_ends_with_the_uninterrupted_weights(shards: Path, tmp_path: Path):
    """Same seed: 6 steps in one go == 3 steps, then a fresh process state resumed from the step-3 checkpoint to 6
    (net, EMA): the noise is drawn per (seed, step, rank) and the data stream fast-forwards past consumed batches."""
    whole = _fit(shards, tmp_path / "whole", 6)
    _fit(shards, tmp_path / "parts", 3)
    torch.manual_seed(1234)  # a resumed process starts with unrelated global RNG state
    resumed = _fit(shards, tmp_path / "parts", 6, ckpt=str(tmp_path / "parts" / "ckpt" / "last.ckpt"))
    assert resumed.global_step == whole.global_step == 6
    for name, (a, b) in {"net": (whole.net, resumed.net), "ema": (whole.ema_network(), resumed.ema_network())}.items():
        for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), f"{name}.{key} differs after resume"


class _NaNAt(LetsTalkModule):
    """The real module whose loss is NaN on the given steps (a stand-in for a diverging run)."""

    def __init__(self, bad_steps: set[int], **kw):
        super().__init__(net={"size": "tiny"}, **kw)
        self.bad_steps = bad_steps

    def _loss(self, batch, generator=None, dropout=True):
        loss = super()._loss(batch, generator, dropout)
        return loss * float("nan") if self.global_step in self.bad_steps else loss


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(shards: Path, tmp_path: Path):
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 4.*nan_policy=skip"):
        _fit(shards, tmp_path, 10, module=_NaNAt({4}))
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 3


def test_nan_policy_skip_leaves_weights_alone_counts_and_stops_after_k_in_a_row(shards: Path, tmp_path: Path):
    seen: dict[int, dict[str, torch.Tensor]] = {}

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen[trainer.global_step] = {k: v.clone() for k, v in pl_module.state_dict().items()}
            seen[trainer.global_step]["skipped"] = trainer.callback_metrics.get("train/skipped_steps")

    module = _NaNAt({2}, optim={"nan_policy": "skip", "lr": 1e-3})
    L.seed_everything(0)
    _trainer(tmp_path / "a", 5, callbacks=[Snapshot()], enable_checkpointing=False).fit(module, _data(shards))
    # the batch of step 2 (NaN loss) counted as a step but changed neither the live nor the EMA weights
    assert module.global_step == 5 and module._skipped_total == 1
    weights = [k for k in seen[2] if k != "skipped"]
    assert all(torch.equal(seen[2][k], seen[3][k]) for k in weights)
    assert not all(torch.equal(seen[3][k], seen[4][k]) for k in weights)
    assert float(seen[3]["skipped"]) == 1.0
    with pytest.raises(FloatingPointError, match="3 consecutive non-finite steps"):
        _fit(shards, tmp_path / "b", 10, module=_NaNAt({2, 3, 4, 5}, optim={"nan_policy": "skip",
                                                                             "max_skipped_steps": 3}))


def test_throughput_rates_leave_validation_and_checkpoint_stalls_out(shards: Path, tmp_path: Path):
    """On a clock the test moves (1 s + 10 ms x step for a training step, 100 s in every validation and checkpoint
    save), every logged clips/s is one step's worth: the stalls never enter it (the step after a stall logs no
    rate)."""
    now = [0.0]
    implied: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            now[0] += 1.0 + 0.01 * trainer.global_step  # a step time of its own, so repeats can be told apart

        def on_validation_epoch_end(self, trainer, pl_module):
            now[0] += 100.0

        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            now[0] += 100.0

    class Rates(L.Callback):  # a step that logs no rate leaves the previous one in callback_metrics: skip repeats
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            rate = trainer.callback_metrics.get("train/clips_per_s")
            if rate is not None and (not implied or 4 / float(rate) != implied[-1]):
                implied.append(4 / float(rate))  # seconds per step of batch 4

    module = LetsTalkModule(net={"size": "tiny"})
    module.clock = lambda: now[0]
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2)
    L.Trainer(accelerator="cpu", max_steps=8, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
              num_sanity_val_steps=0, val_check_interval=2, check_val_every_n_epoch=None, limit_val_batches=1,
              callbacks=[Clock(), Rates(), saver]).fit(module, _data(shards))
    steps = {round(1.0 + 0.01 * step, 6) for step in range(8)}
    assert len(implied) >= 3 and all(round(seconds, 6) in steps for seconds in implied), implied

"""EvalCallback in real short fits: W&B offline run and CSV hold the same `eval/*` numbers and a video with
audio; training ends with the same weights as without the callback; 2-process DDP (gloo) gathers exactly
what `letstalk evaluate` computes in one process on the checkpoint of the same step, and so does DeepSpeed
ZeRO-3 on 2 CPU processes.

Data: `letstalk synth` faces (8 frames each, so one clip per generation), a random demo-size VAE,
`prepare`. Video ids clip_0000 and clip_0002 hash into the 40 % validation split.
"""

from __future__ import annotations

import csv
import itertools
import json
import random
import struct
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import wandb
from diffusers import AutoencoderKL
from torch import nn
from wandb.proto import wandb_internal_pb2

from datamodules.letstalk import LetsTalkDataModule
from lightning_modules.eval_callback import EvalCallback
from lightning_modules.letstalk import LetsTalkModule
from pipeline import media
from pipeline.checkpoints import export
from pipeline.evaluate import SOURCE_VIDEO, MetricsConfig, evaluate
from pipeline.generate import generate
from pipeline.metrics import MetricWeightsError
from pipeline.metrics.inception import FIDInceptionV3
from pipeline.options import Encoders, Framing, Provenance, Sampling, Segments
from pipeline.prepare import prepare
from pipeline.shards import DataWarning
from pipeline.synth import synthesize
from pipeline.vae import demo_vae_config
from procs import run_job

FRAMES = 8
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval_callback")
    synthesize(root / "videos", clips=4, seconds=FRAMES / 25, size=64, fps=25, seed=0)
    torch.manual_seed(0)
    AutoencoderKL(**demo_vae_config()).save_pretrained(root / "vae")
    prepare(root / "videos", root / "shards", encoders=Encoders(vae=str(root / "vae")),
            segments=Segments(segment_seconds=FRAMES / 25, min_segment_seconds=0.2), progress=False)
    return root / "shards"


def _data(root: Path) -> LetsTalkDataModule:
    return LetsTalkDataModule(str(root), clip_frames=FRAMES, audio_radius=2, batch_size=2, num_workers=0,
                              val_percent=40)


def _fit(root: Path, run: Path, callbacks: list, logger=False) -> LetsTalkModule:
    L.seed_everything(0)
    module = LetsTalkModule(net={"size": "tiny", "patch_size": 4}, optim={"lr": 1e-3, "warmup_steps": 1})
    trainer = L.Trainer(accelerator="cpu", max_steps=4, default_root_dir=run, logger=logger, callbacks=callbacks,
                        enable_progress_bar=False, enable_checkpointing=False, num_sanity_val_steps=0,
                        limit_val_batches=0, log_every_n_steps=1)
    trainer.fit(module, _data(root))
    return module


class RngProbe(L.Callback):
    """Records the global torch / numpy / python random states after each step's other callbacks."""

    def __init__(self) -> None:
        self.states: list[tuple] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.states.append((torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()))


def wandb_records(path: Path):
    """The records of an offline `.wandb` file (W&B's LevelDB-style log of `wandb_internal_pb2.Record`s)."""
    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    block, pos, parts = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is zero padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 or pos + 7 + length > len(data):  # the end, or a record the writer has not finished
            break
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def _history(run: Path) -> list[dict]:
    """The run's history rows, once its file is complete (W&B's writer may still flush after `wandb.finish()`)."""
    (path,) = run.glob("wandb/offline-run-*/run-*.wandb")
    for _ in range(300):
        records = list(wandb_records(path))
        if any(record.WhichOneof("record_type") == "exit" for record in records):
            break
        time.sleep(0.1)
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for record in records if record.WhichOneof("record_type") == "history"]


def test_logged_to_wandb_and_csv_and_training_is_undisturbed(shards: Path, tmp_path: Path):
    run = tmp_path / "run"
    callback, probe = EvalCallback(every_n_steps=2, num_clips=3, steps=1, log_videos=1), RngProbe()
    loggers = [L.pytorch.loggers.CSVLogger(run, name="logs"),
               L.pytorch.loggers.WandbLogger(save_dir=run, project="letstalk", offline=True)]
    with_eval = _fit(shards, run, [callback, probe], loggers)
    wandb.finish()

    # the validation split (2 videos) only, though 3 clips were asked for; steps 2 and 4 (fit end adds none)
    assert callback.keys == ["clip_0000/0000", "clip_0002/0000"]
    assert [r["step"] for r in callback.results] == [2, 4]
    for result in callback.results:
        assert {k for k in result["metrics"] if not k.startswith("appearance/")} == {"sync_synthetic",
                                                                                    "sync_synthetic_real"}
        assert set(result["skipped"]) == {"fid", "fvd", "sync_c", "sync_d"}
        assert result["metrics"]["sync_synthetic_real"] > 0.9  # the ground truth's mouths follow the audio
        appearance = {k: v for k, v in result["metrics"].items() if k.startswith("appearance/")}
        assert len(appearance) == 3 * (1 + 2) * 3 * 2  # (generated, static, ceiling) x (all, first, last clip)
        # x 3 regions x (PSNR, SSIM)
        assert 5 < appearance["appearance/generated/frame/psnr"] < appearance["appearance/ceiling/frame/psnr"]
    first, second = (r["metrics"] for r in callback.results)
    assert first["sync_synthetic"] != second["sync_synthetic"]
    assert first["appearance/generated/mouth/psnr"] != second["appearance/generated/mouth/psnr"]
    for name in ("static", "ceiling"):  # the references do not depend on the model
        assert first[f"appearance/{name}/frame/ssim"] == second[f"appearance/{name}/frame/ssim"]

    history = _history(run)
    scalars = {row["trainer/global_step"]: row for row in history if "eval/sync_synthetic" in row}
    assert sorted(scalars) == [2, 4], "W&B scalars"
    for result in callback.results:
        row = scalars[result["step"]]
        assert row["eval/sync_synthetic"] == result["metrics"]["sync_synthetic"]
        assert row["eval/sync_synthetic_real"] == result["metrics"]["sync_synthetic_real"]
    videos = [row for row in history if row.get("eval/videos/_type") == "videos"]
    assert [row["trainer/global_step"] for row in videos] == [2, 4], "W&B videos"
    assert videos[0]["eval/videos/captions"] == ["clip_0000/0000"]
    (media_file,) = run.glob(f"wandb/offline-run-*/files/{videos[0]['eval/videos/videos'][0]['path']}")
    streams = media.media_streams(media_file)  # W&B's copy of our mp4: video and its audio
    assert (streams["video_codec"], streams["audio_codec"], streams["num_frames"]) == ("h264", "aac", FRAMES)
    assert media_file.read_bytes() == Path(callback.results[0]["videos"][0]).read_bytes()
    sheets = [row for row in history if row.get("eval/contact_sheets/_type") == "images/separated"]
    assert [row["trainer/global_step"] for row in sheets] == [2, 4], "W&B contact sheets"
    (sheet,) = callback.results[0]["contact_sheets"]
    assert media.read_image(sheet).shape == (3 * 64 + 2 * 2, 64, 3)  # portrait | real | generated of 8 frames: 1 column

    rows = [r for r in csv.DictReader(open(run / "logs" / "version_0" / "metrics.csv")) if r["eval/sync_synthetic"]]
    assert [int(r["step"]) for r in rows] == [2, 4], "CSV"
    for row, result in zip(rows, callback.results):
        assert float(row["eval/sync_synthetic"]) == pytest.approx(result["metrics"]["sync_synthetic"], abs=1e-12)

    plain = RngProbe()
    without = _fit(shards, tmp_path / "plain", [plain])
    for name, value in without.state_dict().items():
        assert torch.equal(with_eval.state_dict()[name], value), name
    assert len(probe.states) == len(plain.states) == 4
    for (torch_a, numpy_a, python_a), (torch_b, numpy_b, python_b) in zip(probe.states, plain.states):
        assert torch.equal(torch_a, torch_b) and np.array_equal(numpy_a, numpy_b) and python_a == python_b


DDP_SCRIPT = """
import json, sys
import lightning as L
sys.path.insert(0, {repo!r})
from datamodules.letstalk import LetsTalkDataModule
from lightning_modules.eval_callback import EvalCallback
from lightning_modules.letstalk import LetsTalkModule
from lightning_modules.strategies import DeepSpeedStrategy

shards, run, metrics = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
L.seed_everything(0)
callback = EvalCallback(every_n_steps=2, num_clips=3, data=shards, metrics=metrics, steps=1, log_videos=3)
saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=run + "/checkpoints", every_n_train_steps=2, save_top_k=-1)
trainer = L.Trainer(accelerator="cpu", strategy={strategy}, devices=2, max_steps=2, default_root_dir=run, logger=False,
                    callbacks=[callback, saver], enable_progress_bar=False, num_sanity_val_steps=0,
                    limit_val_batches=0)
data = LetsTalkDataModule(shards, clip_frames={frames}, audio_radius=2, batch_size=1, num_workers=0, val_percent=40)
trainer.fit(LetsTalkModule(net={{"size": "tiny", "patch_size": 4}}), data)
if trainer.is_global_zero:
    json.dump({{"keys": callback.keys, "results": callback.results}}, open(run + "/eval.json", "w"))
"""


def _random_inception(path: Path) -> str:
    """He-initialised Inception weights in the pytorch-fid layout (features neither vanish nor explode)."""
    torch.manual_seed(0)
    net = FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
    torch.save(net.state_dict(), path)
    return str(path)


STRATEGIES = {"ddp": '"ddp"', "zero3": "DeepSpeedStrategy(stage=3)"}
EXPORTS: dict[str, Path] = {}  # strategy -> its step-2 EMA export, for the generation test below


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_ranks_share_the_clips_and_gather_what_evaluate_computes(shards: Path, tmp_path: Path, strategy: str):
    """3 clips on 2 ranks (uneven shares), FID features gathered as arrays: equal to `evaluate` on the step-2
    checkpoint in one process, over the same seeded clips (~18 s on 2 idle cores). Under DeepSpeed ZeRO-3 the
    EMA weights are gathered from the optimizer's partitions, and `evaluate` reads the `letstalk export` of the
    sharded checkpoint folder."""
    metrics = {"fid_weights": _random_inception(tmp_path / "pt_inception.pth"), "fid_frames_per_clip": 2}
    script = tmp_path / "ddp_eval.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(repo=str(REPO), frames=FRAMES, strategy=STRATEGIES[strategy])))
    run = tmp_path / "run"
    done = run_job([sys.executable, str(script), str(shards), str(run), json.dumps(metrics)], timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "EvalCallback: loading the ground truth of 3 evaluation clips, 2 of them on rank 0" in done.stderr
    for line in ("EvalCallback: loading the ground truth", "EvalCallback: ground truth ready in",
                 "EvalCallback: step 2: 3 clips in"):
        assert done.stderr.count(line) == 1, line  # rank 0 only, once
    assert len(list((run / "eval_cache").glob("*.npz"))) == 3  # by default in the run's folder; each rank its share
    logged = json.loads((run / "eval.json").read_text())
    (result,) = logged["results"]
    assert result["step"] == 2 and len(result["videos"]) == 3  # clips 0 and 2 from rank 0, clip 1 from rank 1
    assert all(media.media_streams(v)["audio_streams"] == 1 for v in result["videos"])

    (checkpoint,) = (run / "checkpoints").glob("*step=2.ckpt")
    assert checkpoint.is_dir() == (strategy == "zero3")  # ZeRO: a folder of per-rank shards
    checkpoint = export(checkpoint, tmp_path / "export.safetensors", ema=True)
    EXPORTS[strategy] = checkpoint
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as Lightning's CPU DDP gives each of the 2 ranks: the same float reductions
    try:
        single = evaluate(checkpoint, shards, sampling=Sampling(seed=0, steps=1), num_clips=3,
                          metrics=MetricsConfig(**metrics))
    finally:
        torch.set_num_threads(threads)
    assert [c["key"] for c in single["clips"]] == logged["keys"]
    assert set(result["metrics"]) == set(single["metrics"])
    assert {k for k in single["metrics"] if not k.startswith("appearance/")} == {"fid", "sync_synthetic",
                                                                                "sync_synthetic_real"}
    for name, value in single["metrics"].items():  # appearance included: gathered scores equal `evaluate`'s
        assert result["metrics"][name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
    assert result["metrics"]["fid"] > 0


def test_generation_from_a_zero3_export_equals_generation_from_the_ddp_checkpoint(shards: Path, tmp_path: Path):
    """The same 2 steps under DDP and ZeRO-3 (fp32, same seed and data order) give the same EMA network up to float
    summation order, and so the same video (uint8 frames within one level)."""
    if set(EXPORTS) != set(STRATEGIES):
        pytest.skip("needs both runs of test_ranks_share_the_clips_and_gather_what_evaluate_computes")
    portrait = next(shards.parent.joinpath("videos").glob("*.mp4"))
    frames = {}
    for name, checkpoint in EXPORTS.items():
        out = tmp_path / f"{name}.mp4"
        generate(checkpoint, portrait, portrait, out, sampling=Sampling(steps=2), framing=Framing(crop="center"),
                 marks=Provenance(marks=False))
        frames[name] = media.read_video(out).astype(int)
    assert frames["ddp"].shape == frames["zero3"].shape
    assert np.abs(frames["ddp"] - frames["zero3"]).max() <= 1


class FirstSteps(L.Callback):
    """Records, before each training step up to the first evaluation, whether EvalCallback has loaded its clips
    and what its cache folder holds."""

    def __init__(self, callback: EvalCallback, cache: Path) -> None:
        self.callback, self.cache, self.seen = callback, cache, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step < self.callback.every_n_steps:
            files = sorted(p.name for p in self.cache.iterdir()) if self.cache.exists() else []
            self.seen.append((trainer.global_step, self.callback._clips is not None, files))


def test_clips_load_at_the_first_evaluation_into_a_cache_that_later_fits_reuse(shards: Path, tmp_path: Path, capsys):
    cache = tmp_path / "shared_cache"
    first = EvalCallback(every_n_steps=2, num_clips=2, steps=1, log_videos=0, cache_dir=str(cache))
    first.clock = itertools.count(0.0, 10.0).__next__  # 0 at the start, then +10 s per reading
    probe = FirstSteps(first, cache)
    _fit(shards, tmp_path / "run1", [first, probe])
    # nothing decoded, cropped or VAE-encoded before the first evaluation (step 2): no clips, no cache file
    assert probe.seen == [(0, False, []), (1, False, [])]
    files = sorted(cache.glob("*.npz"))
    assert len(files) == 2 and first.preload["built"] == 2 and first.preload["cached"] == 0
    assert [r["reference_frames"] for r in first.results] == [{SOURCE_VIDEO: 2}] * 2
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("EvalCallback:")]
    assert said[:4] == [f"EvalCallback: loading the ground truth of 2 evaluation clips, 2 of them on rank 0 "
                        f"(cache: {cache})",
                        "EvalCallback: ground truth 1/2 clips, 10s elapsed, ETA 10s",
                        "EvalCallback: ground truth 2/2 clips, 20s elapsed, ETA 0s",
                        "EvalCallback: ground truth ready in 40s (rank 0: 2 built, 0 read from the cache)"]
    steps = [line for line in said if line.startswith("EvalCallback: step ")]
    assert len(steps) == 2 and steps[0].startswith("EvalCallback: step 2: 2 clips in ")
    assert f"(2 from {SOURCE_VIDEO}); sync_synthetic " in steps[0] and "appearance/generated/mouth/psnr" in steps[0]

    stamps = [f.stat().st_mtime_ns for f in files]
    second = EvalCallback(every_n_steps=4, num_clips=2, steps=1, log_videos=0, cache_dir=str(cache))
    _fit(shards, tmp_path / "run2", [second])
    assert second.preload["built"] == 0 and second.preload["cached"] == 2  # read back, not rebuilt
    assert [f.stat().st_mtime_ns for f in files] == stamps and sorted(cache.glob("*.npz")) == files
    assert second.results[0]["metrics"] == first.results[-1]["metrics"]  # step 4, the same scores

    files[0].write_bytes(files[0].read_bytes()[:1000])  # a torn file
    third = EvalCallback(every_n_steps=4, num_clips=2, steps=1, log_videos=0, cache_dir=str(cache))
    with pytest.warns(DataWarning, match=rf"{files[0].name}: evaluation cache file ignored and rebuilt"):
        _fit(shards, tmp_path / "run3", [third])
    assert third.preload["built"] == 1 and third.preload["cached"] == 1
    assert third.results[0]["metrics"] == first.results[-1]["metrics"]
    assert np.load(files[0], allow_pickle=False)["real"].shape == (FRAMES, 64, 64, 3)  # whole again


def test_bad_settings_are_refused_clearly(shards: Path, tmp_path: Path):
    with pytest.raises(ValueError, match=r"every_n_steps=0.*num_clips=0"):
        EvalCallback(every_n_steps=0, num_clips=0)
    with pytest.raises(ValueError, match="unknown MetricsConfig keys"):
        EvalCallback(metrics={"fid_weight": "x.pth"})
    missing = tmp_path / "nothere.pth"
    with pytest.raises(MetricWeightsError, match="nothere.pth"):  # at fit start, not at the first evaluation
        _fit(shards, tmp_path / "run", [EvalCallback(metrics={"fid_weights": str(missing)})])


def test_an_empty_validation_split_evaluates_training_segments_with_a_warning():
    from types import SimpleNamespace

    from pipeline.shards import DataWarning

    sample = SimpleNamespace(key="v0/0000")
    trainer = SimpleNamespace(datamodule=SimpleNamespace(root="/data/shards", val_percent=None, val_samples=[],
                                                         train_samples=[sample]))
    with pytest.warns(DataWarning, match="/data/shards: the validation split is empty .* on training segments"):
        assert EvalCallback()._candidate_keys(trainer) == ("/data/shards", {"v0/0000"})

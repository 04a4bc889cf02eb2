"""DeepSpeed ZeRO for real on 2 CPU processes (gloo), through `letstalk fit` and the trainer presets:
ZeRO-2 and ZeRO-3 train the same network and EMA as DDP, resume exactly, log the same gradient norm, export
without unpickling what they hold in memory, keep the NaN guard, and refuse a resume on another rank count.

Each run is a `letstalk fit` subprocess of the tiny model on tests/test_training.py's shards (~20-40 s on 2
cores, most of it start-up); runs are shared by the tests of this module through `fit`'s cache.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path
from subprocess import CompletedProcess

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

pytest.importorskip("deepspeed")

from pipeline.checkpoints import no_unpickling, read_weights  # noqa: E402
from pipeline.shards import AtomicShardWriter, Manifest, Segment, sample_key  # noqa: E402
from pipeline.shipped import CONFIGS  # noqa: E402
from procs import run_job  # noqa: E402
from test_training import C, D, FRAMES, HW, K, write_shards  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TRAINER = CONFIGS / "trainer"
STEPS = 4  # checkpoints at steps 2 and 4; 3 batches per rank and epoch, so step 2 is mid-epoch

CONFIG = """\
seed_everything: 0
model: {net: {size: tiny}, optim: {lr: 1.0e-3, warmup_steps: 2}}
data: {root: SHARDS, clip_frames: 4, audio_radius: 1, batch_size: 2, num_workers: 0}
trainer:
  accelerator: cpu
  enable_progress_bar: false
  val_check_interval: 2
  limit_val_batches: 1
  check_val_every_n_epoch: null
  num_sanity_val_steps: 0
  log_every_n_steps: 1
  gradient_clip_val: 1.0  # as every preset: clipping acts at step 4 (grad norm 1.02)
  logger:
    - class_path: lightning.pytorch.loggers.CSVLogger
      init_args: {save_dir: "${trainer.default_root_dir}", name: logs}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: "${trainer.default_root_dir}/checkpoints", every_n_train_steps: 2, save_top_k: -1}
    - class_path: ds_probe.SaveGathered
      init_args: {path: "${trainer.default_root_dir}/gathered.safetensors"}
    - class_path: ds_probe.RecordBatches
      init_args: {path: "${trainer.default_root_dir}/batches.jsonl"}
"""

PRESETS = {  # name -> flags after the base config
    "ddp": ["--trainer.strategy", "ddp", "--trainer.precision", "32-true"],
    "zero2": ["--config", str(TRAINER / "zero2.yaml"), "--trainer.precision", "32-true"],
    "zero3": ["--config", str(TRAINER / "zero3.yaml"), "--trainer.precision", "32-true"],
    "zero2-bf16": ["--config", str(TRAINER / "zero2.yaml")],
    "zero3-bf16": ["--config", str(TRAINER / "zero3.yaml")],
    "zero3_offload-bf16": ["--config", str(TRAINER / "zero3_offload.yaml")],
}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("deepspeed")
    write_shards(root / "shards")
    (root / "fit.yaml").write_text(CONFIG.replace("SHARDS", str(root / "shards")))
    return root


def run_fit(work: Path, name: str, preset: str, *flags: str, devices: int = 2, steps: int = STEPS,
            config: Path | None = None) -> CompletedProcess:
    """`letstalk fit` as a subprocess (Lightning launches the second rank) into `work/name`."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "WANDB_MODE": "offline"}
    argv = [sys.executable, "-m", "pipeline.cli", "fit", "--config", str(config or work / "fit.yaml"), *PRESETS[preset],
            "--trainer.accelerator", "cpu", "--trainer.devices", str(devices), "--trainer.max_steps", str(steps),
            "--trainer.default_root_dir", str(work / name), *flags]
    return run_job(argv, timeout=300, cwd=work, env=env)


_RUNS: dict[str, Path | str] = {}  # name -> its folder, or why it failed (so the tests sharing it fail at once)


def fit(work: Path, name: str, preset: str, *flags: str, **kw) -> Path:
    """A run that must succeed, made once per module and shared."""
    if name not in _RUNS:
        try:
            done = run_fit(work, name, preset, *flags, **kw)
            _RUNS[name] = work / name if done.returncode == 0 else done.stderr[-4000:]
        except AssertionError as hung:
            _RUNS[name] = str(hung)
    assert isinstance(_RUNS[name], Path), f"the {name} run failed:\n{_RUNS[name]}"
    return _RUNS[name]


def checkpoint(run: Path, step: int) -> Path:
    (path,) = (run / "checkpoints").glob(f"*step={step}.ckpt")
    return path


def weights(path: Path) -> dict[str, torch.Tensor]:
    """`net.*` and `ema.*` of a checkpoint file or DeepSpeed folder, as `letstalk export` reads them."""
    _, net = read_weights(path, ema=False)
    _, ema = read_weights(path, ema=True)
    return {**{f"net.{k}": v for k, v in net.items()}, **{f"ema.{k}": v for k, v in ema.items()}}


def logged(run: Path, key: str) -> dict[int, float]:
    rows = [row for path in sorted(run.glob("logs/version_*/metrics.csv")) for row in csv.DictReader(open(path))]
    return {int(row["step"]): float(row[key]) for row in rows if row.get(key)}


def test_ddp_zero2_and_zero3_train_the_same_network_ema_and_gradient_norm(work: Path):
    """fp32, one init, one data order: the only differences are float summation orders (DDP all-reduces gradient
    buckets, ZeRO reduce-scatters flat partitions; the grad norm sums per tensor vs per partition), ~1e-7
    relative per step, which Adam's normalised steps (lr 1e-3) keep near 1e-7 absolute after 4 steps (measured:
    1.2e-7 at most, most weights bit-equal): 2e-6 absolute is ~10x that and far below what a wrong data order,
    init, clipping or EMA would give (>1e-6; without clipping in the DDP run: 9e-6)."""
    runs = {name: fit(work, name, name) for name in ("ddp", "zero2", "zero3")}
    final = {name: weights(checkpoint(run, STEPS)) for name, run in runs.items()}
    assert checkpoint(runs["zero3"], STEPS).is_dir() and not checkpoint(runs["ddp"], STEPS).is_dir()
    first = {name: weights(checkpoint(run, 2)) for name, run in runs.items()}
    ema_moved = max(float((final["ddp"][k] - first["ddp"][k]).abs().max()) for k in final["ddp"] if k[:4] == "ema.")
    assert ema_moved > 1e-3  # the EMA follows training, so comparing it means something
    for name in ("zero2", "zero3"):
        assert final[name].keys() == final["ddp"].keys()
        worst = max(float((final[name][k] - v).abs().max()) for k, v in final["ddp"].items())
        assert worst < 2e-6, f"{name} differs from DDP by {worst:.2e}"
        norms, ddp_norms = logged(runs[name], "train/grad_norm"), logged(runs["ddp"], "train/grad_norm")
        assert sorted(norms) == sorted(ddp_norms) == list(range(STEPS))
        assert all(norms[s] == pytest.approx(ddp_norms[s], rel=1e-5) for s in norms), (norms, ddp_norms)
        assert logged(runs[name], "val/loss")  # validation with the EMA network ran under ZeRO too


@pytest.mark.parametrize("preset", ["zero2", "zero3"])
def test_export_of_a_zero_folder_equals_what_deepspeed_gathers_in_memory(work: Path, preset: str):
    """The folder reader (DeepSpeed's zero_to_fp32 layout, weights_only loads) and DeepSpeed's in-memory gathers
    (GatheredParameters for ZeRO-3 weights, the tensor-fragment API for the EMA) are independent paths: bit-equal."""
    run = fit(work, preset, preset)
    gathered = load_file(run / "gathered.safetensors")
    exported = weights(checkpoint(run, STEPS))
    assert exported.keys() == gathered.keys()
    assert all(torch.equal(exported[k], gathered[k]) for k in gathered)
    assert not all(torch.equal(exported[f"ema.{k[4:]}"], v) for k, v in exported.items() if k[:4] == "net.")


def test_deepspeed_folders_are_read_without_unpickling(work: Path, monkeypatch):
    """Every torch.load of the folder goes through weights_only, DeepSpeed's own (it asks for weights_only=False)."""
    run = fit(work, "zero3", "zero3")
    calls = []
    load = torch.load

    def spy(*args, **kwargs):
        calls.append(os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") == "1" or kwargs.get("weights_only") is True)
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    weights(checkpoint(run, STEPS))
    assert calls and all(calls)
    folder = checkpoint(run, STEPS) / "checkpoint"
    with pytest.raises(Exception, match="Weights only load failed"):  # a crafted pickle in a shard is refused
        with no_unpickling():
            torch.save({"evil": Path("x")}, folder / "evil.pt")
            torch.load(folder / "evil.pt", weights_only=False)


def _optimizer_shards(path: Path) -> list[dict]:
    with no_unpickling():
        return [torch.load(f, map_location="cpu", weights_only=True)["optimizer_state_dict"]
                for f in sorted((path / "checkpoint").glob("*_optim_states.pt"))]


def _tensors(tree) -> list[torch.Tensor]:
    if torch.is_tensor(tree):
        return [tree]
    if isinstance(tree, dict):
        return [t for key in sorted(tree, key=str) for t in _tensors(tree[key])]
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in _tensors(item)]
    return []


@pytest.mark.parametrize("preset", ["zero2", "zero3-bf16"])
def test_zero_resume_from_mid_epoch_equals_the_uninterrupted_run(work: Path, preset: str):
    """Resumed from the step-2 folder (mid-epoch) to step 4: the same network, EMA (fp32 in the optimizer state,
    also under bf16), Adam state, LR schedule and batches as the run that never stopped; bit-equal."""
    whole = fit(work, preset, preset)
    resumed = fit(work, f"{preset}-resumed", preset, "--ckpt_path", str(checkpoint(whole, 2)))
    a, b = weights(checkpoint(whole, STEPS)), weights(checkpoint(resumed, STEPS))
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    for x, y in zip(_optimizer_shards(checkpoint(whole, STEPS)), _optimizer_shards(checkpoint(resumed, STEPS))):
        tx, ty = _tensors(x), _tensors(y)
        assert len(tx) == len(ty) > 3 and all(torch.equal(u, v) for u, v in zip(tx, ty))
    with no_unpickling():
        states = [torch.load(checkpoint(r, STEPS) / "checkpoint" / name, weights_only=True)
                  for r in (whole, resumed) for name in [sorted(p.name for p in (checkpoint(r, STEPS) / "checkpoint")
                                                                .glob("*model_states.pt"))[0]]]
    assert states[0]["lr_schedulers"] == states[1]["lr_schedulers"]
    assert states[0]["lr_schedulers"][0]["last_epoch"] == STEPS
    batches = [[json.loads(line) for line in (r / "batches.jsonl").read_text().splitlines()] for r in (whole, resumed)]
    assert [b for b in batches[0] if b["step"] > 2] == batches[1]  # steps 3, 4 saw the same clips


def _epochs(run: Path) -> dict[int, int]:
    return {step: int(epoch) for step, epoch in logged(run, "epoch").items()}


def test_zero_resume_after_the_last_batch_of_an_epoch_keeps_the_epoch_count(work: Path):
    """Batch 8 on 2 ranks: each loader slot holds less than a batch (it re-reads its run), so an epoch is one step and
    the step-2 checkpoint is written after an epoch's last batch. Resumed from it: the same losses, batches, epoch
    numbers and checkpoint names as the run that never stopped (the epoch counter ran one ahead before)."""
    flags = ("--data.batch_size", "8")
    whole = fit(work, "zero2-epoch-end", "zero2", *flags)
    resumed = fit(work, "zero2-epoch-end-resumed", "zero2", *flags, "--ckpt_path", str(checkpoint(whole, 2)))
    assert checkpoint(whole, 2).name == "epoch=1-step=2.ckpt"  # one batch an epoch
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["epoch=3-step=4.ckpt"]
    assert {s: e for s, e in _epochs(whole).items() if s >= 2} == _epochs(resumed) == {2: 2, 3: 3}
    losses = logged(whole, "train/loss"), logged(resumed, "train/loss")
    assert {s: v for s, v in losses[0].items() if s >= 2} == losses[1]
    batches = [[json.loads(line) for line in (r / "batches.jsonl").read_text().splitlines()] for r in (whole, resumed)]
    assert [b for b in batches[0] if b["step"] > 2] == batches[1]
    a, b = weights(checkpoint(whole, STEPS)), weights(checkpoint(resumed, STEPS))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_zero3_offload_trains_with_deepspeeds_cpu_adam_and_exports(work: Path):
    """ZeRO-3 with optimizer and parameters in CPU memory, bf16: DeepSpeed requires its own CPU Adam (a JIT-built
    C++ op, ~1 min the first time), which keeps the EMA like any optimizer."""
    run = fit(work, "zero3_offload-bf16", "zero3_offload-bf16", steps=2)
    exported = weights(checkpoint(run, 2))
    gathered = load_file(run / "gathered.safetensors")
    assert exported.keys() == gathered.keys()
    for key, value in gathered.items():  # the module holds bf16 copies of the fp32 master weights; the EMA is fp32
        expected = exported[key].bfloat16().float() if key.startswith("net.") else exported[key]
        assert torch.equal(expected, value), key
    assert all(torch.isfinite(v).all() for v in exported.values())
    assert any(not torch.equal(exported[f"ema.{k[4:]}"], v) for k, v in exported.items() if k[:4] == "net.")
    assert all(np.isfinite(list(logged(run, "train/loss").values())))
    assert logged(run, "train/grad_norm")


def _nan_shards(root: Path) -> Path:
    """The test shards plus 8 videos whose latents are NaN: a training batch that holds one has a NaN loss."""
    write_shards(root)
    flac = io.BytesIO()
    sf.write(flac, np.zeros(640 * FRAMES, np.float32), 16000, format="FLAC")
    manifest = Manifest.load(root)
    with AtomicShardWriter(root, max_samples=8, start_index=len(manifest.shards)) as writer:
        for s in range(8):
            writer.write(Segment(sample_key(f"bad{s}", 0), np.full((FRAMES, C, HW, HW), np.nan, np.float16),
                                 np.zeros((FRAMES, K, D), np.float16), flac.getvalue(), {"frames": FRAMES, "fps": 25.0}))
    manifest.shards += writer.shards
    manifest.save(root)
    return root


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_the_nan_guard_holds_under_deepspeed(work: Path, policy: str):
    """A NaN batch under ZeRO-2: `skip` makes no update on any rank and the run goes on (Lightning's DeepSpeed
    precision would raise on the skipped backward); `stop` ends the run with the clear message."""
    shards = _nan_shards(work / f"nan-shards-{policy}")
    config = work / f"nan-{policy}.yaml"
    config.write_text(CONFIG.replace("SHARDS", str(shards)))
    done = run_fit(work, f"nan-{policy}", "zero2", "--model.optim.nan_policy", policy, config=config, steps=6)
    if policy == "stop":
        assert done.returncode == 1 and "letstalk fit: error: loss is nan at step" in done.stderr, done.stderr[-3000:]
        return
    assert done.returncode == 0, done.stderr[-3000:]
    run = work / "nan-skip"
    skipped = logged(run, "train/skipped_steps")
    assert skipped and max(skipped.values()) >= 1
    final = weights(checkpoint(run, 6))
    assert all(torch.isfinite(v).all() for v in final.values())


def test_resume_on_another_number_of_ranks_is_refused_with_the_way_out(work: Path):
    """ZeRO partitions optimizer state by rank; a DDP checkpoint's data position belongs to its rank count."""
    zero2 = fit(work, "zero2", "zero2")
    done = run_fit(work, "zero2-on-1", "zero2", "--ckpt_path", str(checkpoint(zero2, 2)), devices=1)
    assert done.returncode == 1
    assert "written by 2 ranks and cannot resume on 1" in done.stderr and "letstalk export" in done.stderr
    single = fit(work, "ddp-1", "ddp", devices=1, steps=2)
    done = run_fit(work, "ddp-on-2", "ddp", "--ckpt_path", str(checkpoint(single, 2)), devices=2)
    assert done.returncode == 1
    assert "written by 1 ranks in the middle of an epoch and cannot resume on 2" in done.stderr, done.stderr[-3000:]
